"""The guidance combine and the DDIM update of one step, in one kernel.

Why: fast mode's step ends with classifier-free guidance and the DDIM update in fp32
(runtime/fast/step.py): eager PyTorch makes them in ~24 small kernels (the eps cast, three for
the combine, four scalar ops and twelve map-sized ones for the update, four for the non-finite
check, two copies into the static buffers), each a full pass over a [B, 4, h, w] map that is
only 64 KB at 512². Here one kernel reads the model's output (fp16, any dense layout), the
latents and the noise once and writes the new latents, eps and the non-finite flag.

Numerics: bit-identical to the eager fp32 path. Each operation is rounded as PyTorch rounds it
(one op per kernel there): the kernel is compiled with `enable_fp_fusion=False` (no
multiply-add contraction), divides with `div_rn` and takes square roots with `sqrt_rn` (Triton's
`/` and `sqrt` are the fast approximations on GPUs), in the same order of operations:

    eps    = e_u + g · (e_c − e_u)                       (eps = e_c without guidance)
    pred   = (x − s1m · eps) / √a_t
    dir    = √(1 − a_prev − σ²) · eps
    x_prev = √a_prev · pred + dir + σ · noise

with (a_t, a_prev, σ, s1m) the step's float32 scalars and g the guidance scale, read from device
buffers (a graph replay reads their current values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform


@triton.jit
def _ddim_kernel(
    X,      # [B, C, H, W] fp32, contiguous: the latents, updated in place
    EU,     # [B, C, H, W] via strides (su_*): the uncond eps (model dtype), or dummy (HAS_U)
    EC,     # [B, C, H, W] via strides (sc_*): the cond eps (model dtype)
    NOISE,  # [B, C, H, W] fp32, contiguous (zeros at eta = 0, as the eager path adds them)
    SC,     # [4] fp32: a_t, a_prev, sigma, sqrt(1 - a_t)
    G,      # [] fp32: the guidance scale, or dummy (HAS_U)
    EPS,    # [B, C, H, W] fp32, contiguous: eps out
    BAD,    # [] bool: set when eps has a non-finite value, or dummy (HAS_BAD)
    N, C, H, W,
    su_b, su_c, su_h, su_w, sc_b, sc_c, sc_h, sc_w,
    BLOCK: tl.constexpr, HAS_U: tl.constexpr, HAS_BAD: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    w = i % W
    h = (i // W) % H
    c = (i // (W * H)) % C
    b = i // (W * H * C)
    e = tl.load(EC + b * sc_b + c * sc_c + h * sc_h + w * sc_w, mask=m, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(EU + b * su_b + c * su_c + h * su_h + w * su_w, mask=m, other=0.0).to(tl.float32)
        e = u + tl.load(G) * (e - u)
    a_t = tl.load(SC)
    a_prev = tl.load(SC + 1)
    sigma = tl.load(SC + 2)
    s1m = tl.load(SC + 3)
    x = tl.load(X + i, mask=m, other=0.0)
    pred = tl.math.div_rn(x - s1m * e, tl.math.sqrt_rn(a_t))
    dir_xt = tl.math.sqrt_rn(1.0 - a_prev - sigma * sigma) * e
    x_prev = tl.math.sqrt_rn(a_prev) * pred + dir_xt + sigma * tl.load(NOISE + i, mask=m, other=0.0)
    tl.store(EPS + i, e, mask=m)
    tl.store(X + i, x_prev, mask=m)
    if HAS_BAD:
        bad = tl.sum((((e != e) | (tl.abs(e) == float("inf"))) & m).to(tl.int32), axis=0)
        tl.store(BAD, bad > 0, mask=bad > 0)


def _strides(t):
    return tuple(t.stride())


def ddim_update(x: torch.Tensor, eps_c: torch.Tensor, scalars: torch.Tensor, noise: torch.Tensor,
                eps_out: torch.Tensor, eps_u: torch.Tensor | None = None,
                gscale: torch.Tensor | None = None, bad: torch.Tensor | None = None) -> None:
    """One DDIM step in place: x <- x_prev, eps_out <- eps (the guided one when eps_u is given,
    with the scale `gscale`, a one-element fp32 tensor), bad |= any non-finite eps.

    x, eps_out, noise: fp32 [B, C, H, W], contiguous; eps_c, eps_u: x's shape, any strides and
    float dtype; scalars: fp32 [4] (a_t, a_prev, sigma, sqrt(1 - a_t)); bad: a bool scalar."""
    shape = x.shape
    if x.dim() != 4 or eps_c.shape != shape:
        raise ValueError(f"ddim_update: x {tuple(shape)}, eps {tuple(eps_c.shape)}: 4-D maps of "
                         "one shape")
    for name, t in (("x", x), ("eps_out", eps_out), ("noise", noise)):
        if (t.shape != shape or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"ddim_update: {name} must be a contiguous fp32 {tuple(shape)} tensor")
    if (eps_u is None) != (gscale is None) or (eps_u is not None and eps_u.shape != shape):
        raise ValueError("ddim_update: eps_u and gscale go together, eps_u shaped as x")
    if scalars.numel() != 4 or scalars.dtype != torch.float32 or (
            gscale is not None and (gscale.numel() != 1 or gscale.dtype != torch.float32)):
        raise ValueError("ddim_update: scalars must be fp32 [4], gscale one fp32 element")
    if bad is not None and (bad.numel() != 1 or bad.dtype != torch.bool):
        raise ValueError("ddim_update: bad must be one bool element")
    B, C, H, W = shape
    n = x.numel()
    cfg = platform.config("elementwise")
    grid = (triton.cdiv(n, cfg["BLOCK"]),)
    _ddim_kernel[grid](
        x, eps_u if eps_u is not None else eps_c, eps_c, noise,
        scalars, gscale if gscale is not None else scalars, eps_out,
        bad if bad is not None else scalars, n, C, H, W,
        *_strides(eps_u if eps_u is not None else eps_c), *_strides(eps_c),
        BLOCK=cfg["BLOCK"], HAS_U=eps_u is not None, HAS_BAD=bad is not None, enable_fp_fusion=False, **platform.launch_options(cfg))
