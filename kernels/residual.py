"""Bias + residual epilogue: out = round(h + bias[c]) [+ round(r + bias2[c])] for 4-D maps.

Why: cuDNN's convolution and cuBLAS's GEMM for a 1x1 convolution on channels_last run without
their bias, and PyTorch then adds the [1, C, 1, 1] bias in a broadcast pass of its own (H200,
512², one fast step: 151 such passes, 0.69 ms; the single costliest elementwise kernel), followed
by the residual `skip + h` in another pass (0.36 ms). Here the convolution runs with bias=None
and this kernel does both in one read of each operand and one write.

Numerics: the rounding points of the unfused fp16 path, so results are bit-identical to it:
h + bias is rounded to h's dtype (PyTorch's add_ of the bias), so is r + bias2, and their sum is
computed in fp32 and rounded once (the residual add).

`skip_cat(h, skip, ctrl, scale)` is the decoder's `cat([h, skip + ctrl · scale], dim=1)` (the
ControlNet residual scaled by its strength, added to the UNet's skip, concatenated after h) as
one kernel writing the concatenation: eager makes it in three passes and a cat (mul, add, cat
copy), each over the full map; rounding as eager: ctrl·scale, then + skip, each to the dtype.

Layouts: each operand is addressed as (n, c, p) with its own three strides, p the flattened
spatial index (dense NCHW, channels_last, or a [B, H·W, C] token tensor viewed as
[B, C, H, W] through .view(b, h, w, c).permute(0, 3, 1, 2)). Tiles are [BLOCK_P, BLOCK_C] at one
n; Triton vectorises along whichever axis has stride 1 (it specialises stride-1 arguments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform


@triton.jit
def _bias_residual_kernel(
    H,      # [N, C, P] via strides (sh_n, sh_c, sh_p)
    BIAS,   # [C] added to H, or dummy
    R,      # [N, C, P] via strides (sr_n, sr_c, sr_p), or dummy
    BIAS2,  # [C] added to R, or dummy
    OUT,    # [N, C, P] via strides (so_n, so_c, so_p)
    C, P,
    sh_n, sh_c, sh_p, sr_n, sr_c, sr_p, so_n, so_c, so_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_R: tl.constexpr, HAS_BIAS2: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    cmask = c < C
    mask = (p < P)[:, None] & cmask[None, :]
    p64 = p.to(tl.int64)
    dt = OUT.dtype.element_ty
    h = tl.load(H + n * sh_n + p64[:, None] * sh_p + c[None, :] * sh_c, mask=mask, other=0.0)
    h = h.to(tl.float32)
    if HAS_BIAS:
        h = (h + tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[None, :]).to(dt)
        h = h.to(tl.float32)
    if HAS_R:
        r = tl.load(R + n * sr_n + p64[:, None] * sr_p + c[None, :] * sr_c, mask=mask, other=0.0)
        r = r.to(tl.float32)
        if HAS_BIAS2:
            r = (r + tl.load(BIAS2 + c, mask=cmask, other=0.0).to(tl.float32)[None, :]).to(dt)
            r = r.to(tl.float32)
        h = h + r
    tl.store(OUT + n * so_n + p64[:, None] * so_p + c[None, :] * so_c, h.to(dt), mask=mask)


def _ncp(t: torch.Tensor):
    """(n, c, p) strides of a 4-D tensor whose two spatial dims collapse into one."""
    if t.dim() != 4:
        raise ValueError(f"bias_residual: expected a 4-D tensor, got {tuple(t.shape)}")
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h > 1 and w > 1 and sh != w * sw:
        raise ValueError("bias_residual: spatial dims must be dense (NCHW, NHWC or tokens)")
    return sn, sc, (sw if w > 1 else sh)


def bias_residual(h: torch.Tensor, bias: torch.Tensor | None, res: torch.Tensor | None = None,
                  bias2: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """round(h + bias) [+ round(res + bias2)] for 4-D h/res [B, C, H, W] (any dense layout);
    bias/bias2 [C]. out defaults to a tensor with res's layout (h's without res)."""
    if res is not None and res.shape != h.shape:
        raise ValueError(f"bias_residual: shapes {tuple(h.shape)} and {tuple(res.shape)} differ")
    if bias2 is not None and res is None:
        raise ValueError("bias_residual: bias2 needs res")
    for b in (bias, bias2):
        if b is not None and (b.dim() != 1 or b.shape[0] != h.shape[1]):
            raise ValueError("bias_residual: biases must be [C]")
    if out is None:
        out = torch.empty_like(res if res is not None else h)
    N, C, Hh, W = h.shape
    P = Hh * W
    sh, so = _ncp(h), _ncp(out)
    sr = _ncp(res) if res is not None else (0, 0, 0)
    cfg = platform.config("residual")
    block_c = min(64, triton.next_power_of_2(C))
    block_p = max(1, cfg["BLOCK"] // block_c)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c), N)
    _bias_residual_kernel[grid](
        h, bias if bias is not None else h, res if res is not None else h,
        bias2 if bias2 is not None else h, out, C, P, *sh, *sr, *so,
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, HAS_R=res is not None,
        HAS_BIAS2=bias2 is not None, **platform.launch_options(cfg))
    return out


@triton.jit
def _skip_cat_kernel(
    H,      # [N, C1, P] via strides (sh_n, sh_c, sh_p): the first C1 channels of OUT
    SKIP,   # [N, C2, P] via strides (ss_n, ss_c, ss_p)
    CTRL,   # [N, C2, P] via strides (sc_n, sc_c, sc_p), or dummy (HAS_CTRL)
    SCALE,  # [1] scale of CTRL (a device scalar: graph replays read its current value), or dummy
    OUT,    # [N, C1 + C2, P] via strides (so_n, so_c, so_p)
    C1, C2, P,
    sh_n, sh_c, sh_p, ss_n, ss_c, ss_p, sc_n, sc_c, sc_p, so_n, so_c, so_p,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_CTRL: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    p64 = p.to(tl.int64)
    pm = (p < P)[:, None]
    dt = OUT.dtype.element_ty
    in_h = pm & (c < C1)[None, :]
    c2 = c - C1
    in_s = pm & ((c2 >= 0) & (c2 < C2))[None, :]
    x = tl.load(H + n * sh_n + p64[:, None] * sh_p + c[None, :] * sh_c, mask=in_h, other=0.0)
    y = tl.load(SKIP + n * ss_n + p64[:, None] * ss_p + c2[None, :] * ss_c, mask=in_s, other=0.0)
    if HAS_CTRL:
        r = tl.load(CTRL + n * sc_n + p64[:, None] * sc_p + c2[None, :] * sc_c, mask=in_s, other=0.0)
        if HAS_SCALE:
            r = (r.to(tl.float32) * tl.load(SCALE).to(tl.float32)).to(dt)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
    v = tl.where(in_h, x.to(dt), y.to(dt))
    tl.store(OUT + n * so_n + p64[:, None] * so_p + c[None, :] * so_c, v, mask=in_h | in_s)


def skip_cat(h: torch.Tensor, skip: torch.Tensor, ctrl: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """cat([h, skip + ctrl · scale], dim=1) for 4-D maps (any dense layouts); scale is a
    one-element tensor (or None: 1). out defaults to h's memory format."""
    N, C1, Hh, W = h.shape
    C2 = skip.shape[1]
    if skip.shape != (N, C2, Hh, W) or (ctrl is not None and ctrl.shape != skip.shape):
        raise ValueError(f"skip_cat: shapes {tuple(h.shape)}, {tuple(skip.shape)} do not match")
    if scale is not None and (ctrl is None or scale.numel() != 1):
        raise ValueError("skip_cat: scale must be one element, with ctrl")
    if out is None:
        cl = not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
        out = torch.empty((N, C1 + C2, Hh, W), dtype=h.dtype, device=h.device,
                          memory_format=torch.channels_last if cl else torch.contiguous_format)
    P = Hh * W
    sc = _ncp(ctrl) if ctrl is not None else (0, 0, 0)
    cfg = platform.config("residual")
    block_c = min(64, triton.next_power_of_2(C1 + C2))
    block_p = max(1, cfg["BLOCK"] // block_c)
    grid = (triton.cdiv(P, block_p), triton.cdiv(C1 + C2, block_c), N)
    _skip_cat_kernel[grid](
        h, skip, ctrl if ctrl is not None else skip, scale if scale is not None else skip, out,
        C1, C2, P, *_ncp(h), *_ncp(skip), *sc, *_ncp(out),
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_CTRL=ctrl is not None,
        HAS_SCALE=scale is not None, **platform.launch_options(cfg))
    return out
