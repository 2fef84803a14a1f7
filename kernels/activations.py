"""Elementwise x·sigmoid(a·x) activations: SiLU (a = 1; nn.SiLU and the VAE's x·sigmoid(x)) and
quick-GELU (a = 1.702; CLIP's MLP). Computed in fp32, no libdevice (sigmoid only), so the
interpreter runs them too.

Rounding points follow the eager code being replaced, so fp16 results match it bit for bit in
most elements: "silu" rounds once (F.silu computes in fp32); "swish" (the VAE's
`x * torch.sigmoid(x)`) rounds sigmoid(x) first; "quick_gelu" (`x * torch.sigmoid(1.702 * x)`)
rounds 1.702·x and the sigmoid first. In fp32 all three are plain fp32 math.
Works on any dense tensor (contiguous or channels_last) by running over its storage in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform

_MODES = {"silu": 0, "swish": 1, "quick_gelu": 2}


@triton.jit
def _act_fwd_kernel(
    X,  # [n] dense storage of the input
    Y,  # [n] dense storage of the output, same strides as the input
    n,
    MODE: tl.constexpr,  # 0 silu, 1 swish (rounded sigmoid), 2 quick_gelu
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    if MODE == 0:
        y = x * tl.sigmoid(x)
    elif MODE == 1:
        y = x * tl.sigmoid(x).to(dt).to(tl.float32)
    else:
        u = (x * 1.702).to(dt).to(tl.float32)
        y = x * tl.sigmoid(u).to(dt).to(tl.float32)
    tl.store(Y + offs, y.to(dt), mask=mask)


def activation(x: torch.Tensor, mode: str = "silu", *, out: torch.Tensor | None = None) -> torch.Tensor:
    """mode: 'silu' | 'swish' | 'quick_gelu'. x contiguous or channels_last; out like x."""
    if x.is_contiguous():
        flat = x.view(-1)
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        flat = x.permute(0, 2, 3, 1).view(-1)
    else:
        raise ValueError("activation: x must be contiguous or channels_last")
    if out is None:
        out = torch.empty_like(x)
    if out.stride() != x.stride():
        raise ValueError("activation: out must have x's strides")
    out_flat = out.view(-1) if x.is_contiguous() else out.permute(0, 2, 3, 1).view(-1)
    cfg = platform.config("elementwise")
    n = flat.numel()
    _act_fwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        flat, out_flat, n, MODE=_MODES[mode], BLOCK=cfg["BLOCK"], **platform.launch_options(cfg))
    return out
