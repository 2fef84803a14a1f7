"""GroupNorm forward: y = (x' - mean_g) / sqrt(var_g + eps) · w_c + b_c  [· sigmoid(·)],
with x' = x, or x' = x + add[b, c] (ResBlock's h + emb_out, fused before the norm).

Numerics: statistics in fp32, always from centred values (two passes over registers inside a
tile, Chan's parallel combination across tiles and splits), never E[x²]−E[x]². The normalised
value is computed in fp32 and rounded once to the output dtype (= input dtype). That is exactly
upstream's GroupNorm32 (compute in fp32, cast back) and, for the plain nn.GroupNorm(eps=1e-6)
used by SpatialTransformer and the VAE, what PyTorch's own CUDA kernel does for fp16/bf16 inputs
(fp32 accumulate-type math, one rounding); the two variants differ only in eps, which the caller
passes. With the fused SiLU the normalised value is first rounded to the output dtype (upstream
materialises the GroupNorm output in that dtype before nn.SiLU / x·sigmoid(x)), then
y·sigmoid(y) is computed in fp32 and rounded once; upstream's VAE x·sigmoid(x) rounds the sigmoid
separately in fp16, so fp16 results may differ from it in the last ulp. The pre-add is rounded to
the input dtype before the statistics, as upstream's `h + emb_out` is a tensor in h's dtype.

Layouts: NCHW-contiguous (a group is one contiguous run of Cg·HW elements) and channels_last
(a group is Cg contiguous channels at each of HW positions); any spatial rank for NCHW. Elements
of a group are addressed by a flat index e, so any group size works and tiles never straddle
groups.

The element addressing is written out in each kernel rather than in a shared @triton.jit helper:
the CPU interpreter re-patches triton.language on every nested jit call (0.5 s per tiny launch).

Parallelism: two paths, chosen per shape from kernels/platform.py's table.
* one pass (group ≤ ONE_PASS_MAX elements, e.g. every UNet map at 16×16 and 8×8): one program per
  (sample, group) holds the whole group in registers: one read, one write, one launch.
* split (larger groups: 64×64 UNet maps, all of the VAE): B·G·S programs per kernel. Kernel 1
  writes each split's (mean, M2) to a small fp32 workspace; kernel 2 combines the S partials of
  its group (a few hundred bytes, L2-resident) and normalises its split. S is chosen so both
  kernels have ~8 programs per SM: [2,320,64,64] is 64 groups, 64 programs would leave half of an
  H100's 132 SMs idle. Kernel 2 re-reads x, mostly from L2 (50 MB on H100) right after kernel 1.
References: Wu & He 2018 (GroupNorm); Chan, Golub & LeVeque 1979 (pairwise variance);
Liger-Kernel's group norm and PyTorch's group_norm_kernel.cu (structure only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform


@triton.jit
def _gn_one_pass_kernel(
    X,     # [B, C, *spatial] NCHW-contiguous or [B, C, H, W] channels_last
    ADD,   # [B, C] (strided) pre-norm addend, or a dummy when not HAS_ADD
    ADD_C,  # [C] pre-norm per-channel addend (a convolution's bias), or a dummy
    W,     # [C] weight, or dummy
    Bias,  # [C] bias, or dummy
    Y,     # same shape and strides as X
    stride_xb, stride_ab, stride_ac,
    C, CG, HW, G, eps,
    BLOCK: tl.constexpr,  # next power of two >= CG*HW: the whole group in registers
    CHANNELS_LAST: tl.constexpr, HAS_ADD: tl.constexpr, HAS_ADD_C: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    SILU: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    n = CG * HW
    e = tl.arange(0, BLOCK)
    mask = e < n
    if CHANNELS_LAST:
        c = g * CG + e % CG
        off = (e // CG) * C + c
    else:
        c = g * CG + e // HW
        off = g * CG * HW + e  # the whole group is contiguous
    x = tl.load(X + b.to(tl.int64) * stride_xb + off, mask=mask, other=0.0)
    if HAS_ADD_C:
        # the convolution's bias, rounded as PyTorch's separate bias pass rounds it
        x = (x.to(tl.float32) + tl.load(ADD_C + c, mask=mask, other=0.0).to(tl.float32)
             ).to(X.dtype.element_ty)
    if HAS_ADD:
        a = tl.load(ADD + b * stride_ab + c * stride_ac, mask=mask, other=0.0)
        # upstream's h + emb_out is a tensor in h's dtype: round the sum before the statistics
        x = (x.to(tl.float32) + a.to(tl.float32)).to(X.dtype.element_ty)
    x = x.to(tl.float32)
    mean = tl.sum(x, 0) / n
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / n + eps)
    y = (x - mean) * rstd
    if HAS_AFFINE:
        y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) \
            + tl.load(Bias + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        # upstream materialises the norm's output in the I/O dtype before the activation
        y = y.to(Y.dtype.element_ty).to(tl.float32)
        y = y * tl.sigmoid(y)
    tl.store(Y + b.to(tl.int64) * stride_xb + off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_stats_kernel(
    X,     # [B, C, *spatial] as in _gn_one_pass_kernel
    ADD,   # [B, C] or dummy
    ADD_C,  # [C] or dummy
    MEAN,  # [B*G, S] fp32 out: mean of each split
    M2,    # [B*G, S] fp32 out: sum of squared deviations of each split
    stride_xb, stride_ab, stride_ac,
    C, CG, HW, G, S, CHUNK,
    BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_ADD: tl.constexpr,
    HAS_ADD_C: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // G
    g = pid % G
    n_group = CG * HW
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, n_group)
    mean = 0.0
    m2 = 0.0
    cnt = 0.0
    for t in range(start, end, BLOCK):
        e = t + tl.arange(0, BLOCK)
        mask = e < end
        if CHANNELS_LAST:
            c = g * CG + e % CG
            off = (e // CG) * C + c
        else:
            c = g * CG + e // HW
            off = g * CG * HW + e  # the whole group is contiguous
        x = tl.load(X + b.to(tl.int64) * stride_xb + off, mask=mask, other=0.0)
        if HAS_ADD_C:
            # the convolution's bias, rounded as PyTorch's separate bias pass rounds it
            x = (x.to(tl.float32) + tl.load(ADD_C + c, mask=mask, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty)
        if HAS_ADD:
            a = tl.load(ADD + b * stride_ab + c * stride_ac, mask=mask, other=0.0)
            # upstream's h + emb_out is a tensor in h's dtype: round the sum before the statistics
            x = (x.to(tl.float32) + a.to(tl.float32)).to(X.dtype.element_ty)
        x = x.to(tl.float32)
        nt = tl.minimum(end - t, BLOCK).to(tl.float32)
        mt = tl.sum(x, 0) / nt
        d = tl.where(mask, x - mt, 0.0)
        # Chan et al.: merge (cnt, mean, m2) with the tile's exact (nt, mt, m2t)
        tot = cnt + nt
        delta = mt - mean
        mean = mean + delta * (nt / tot)
        m2 = m2 + tl.sum(d * d, 0) + delta * delta * (cnt * nt / tot)
        cnt = tot
    tl.store(MEAN + pid * S + s, mean)
    tl.store(M2 + pid * S + s, m2)


@triton.jit
def _gn_apply_kernel(
    X,     # [B, C, *spatial]
    ADD,   # [B, C] or dummy
    ADD_C,  # [C] or dummy
    MEAN,  # [B*G, S] fp32 split means from _gn_stats_kernel
    M2,    # [B*G, S] fp32 split M2s
    W,     # [C] or dummy
    Bias,  # [C] or dummy
    Y,     # like X
    stride_xb, stride_ab, stride_ac,
    C, CG, HW, G, S, CHUNK, eps,
    BLOCK: tl.constexpr, S_P2: tl.constexpr,  # S_P2: next power of two >= S
    CHANNELS_LAST: tl.constexpr, HAS_ADD: tl.constexpr, HAS_ADD_C: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    SILU: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    b = pid // G
    g = pid % G
    n_group = CG * HW
    # combine all splits of this group (exact pairwise formula, all at once)
    si = tl.arange(0, S_P2)
    smask = si < S
    means = tl.load(MEAN + pid * S + si, mask=smask, other=0.0)
    m2s = tl.load(M2 + pid * S + si, mask=smask, other=0.0)
    ns = tl.where(smask, tl.minimum(n_group - si * CHUNK, CHUNK), 0).to(tl.float32)
    # pivot on split 0's mean: the sum then runs over small differences, so a large common
    # offset (mean 1000, std 2) does not cost the mean its low digits
    m0 = tl.sum(tl.where(si == 0, means, 0.0), 0)
    mean = m0 + tl.sum(ns * (means - m0), 0) / n_group
    dm = means - mean
    var = (tl.sum(m2s, 0) + tl.sum(ns * dm * dm, 0)) / n_group
    rstd = 1.0 / tl.sqrt(var + eps)

    start = s * CHUNK
    end = tl.minimum(start + CHUNK, n_group)
    for t in range(start, end, BLOCK):
        e = t + tl.arange(0, BLOCK)
        mask = e < end
        if CHANNELS_LAST:
            c = g * CG + e % CG
            off = (e // CG) * C + c
        else:
            c = g * CG + e // HW
            off = g * CG * HW + e  # the whole group is contiguous
        x = tl.load(X + b.to(tl.int64) * stride_xb + off, mask=mask, other=0.0)
        if HAS_ADD_C:
            # the convolution's bias, rounded as PyTorch's separate bias pass rounds it
            x = (x.to(tl.float32) + tl.load(ADD_C + c, mask=mask, other=0.0).to(tl.float32)
                 ).to(X.dtype.element_ty)
        if HAS_ADD:
            a = tl.load(ADD + b * stride_ab + c * stride_ac, mask=mask, other=0.0)
            # upstream's h + emb_out is a tensor in h's dtype: round the sum before the statistics
            x = (x.to(tl.float32) + a.to(tl.float32)).to(X.dtype.element_ty)
        x = x.to(tl.float32)
        y = (x - mean) * rstd
        if HAS_AFFINE:
            y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) \
                + tl.load(Bias + c, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            # upstream materialises the norm's output in the I/O dtype before the activation
            y = y.to(Y.dtype.element_ty).to(tl.float32)
            y = y * tl.sigmoid(y)
        tl.store(Y + b.to(tl.int64) * stride_xb + off, y.to(Y.dtype.element_ty), mask=mask)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, *, silu: bool = False,
               add: torch.Tensor | None = None, add_c: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm(x [+ add_c[c]] [+ add[:, :, None, None]]) [→ SiLU] for x [B, C, *spatial];
    add is [B, C] (or [B, C, 1, 1]), add_c is [C] (a bias of the convolution that made x, added
    and rounded first). x must be contiguous or 4-D channels_last; out gets x's strides."""
    B, C = x.shape[0], x.shape[1]
    G = int(num_groups)
    if x.dim() < 3 or C % G:
        raise ValueError(f"group_norm: bad shape {tuple(x.shape)} for {G} groups")
    if x.is_contiguous():
        channels_last = False
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        raise ValueError("group_norm: x must be contiguous or channels_last")
    CG = C // G
    HW = x[0, 0].numel()
    n = CG * HW
    if out is None:
        out = torch.empty_like(x)  # preserve_format: same strides as x
    elif out.shape != x.shape or out.stride() != x.stride():
        raise ValueError("group_norm: out must have x's shape and strides")
    if add is not None:
        add = add.reshape(B, C)
        stride_ab, stride_ac = add.stride()
    else:
        stride_ab, stride_ac = 0, 0
    has_affine = weight is not None
    dummy = x  # never read: the corresponding constexpr flag is off
    args_add = add if add is not None else dummy
    w = weight if has_affine else dummy
    bb = bias if bias is not None else dummy
    if has_affine and bias is None:
        bb = torch.zeros_like(weight)
    cfg = platform.config("group_norm")
    if add_c is not None and (add_c.dim() != 1 or add_c.shape[0] != C):
        raise ValueError("group_norm: add_c must be [C]")
    flags = dict(CHANNELS_LAST=channels_last, HAS_ADD=add is not None, HAS_ADD_C=add_c is not None)
    args_add_c = add_c if add_c is not None else dummy

    if n <= cfg["ONE_PASS_MAX"]:
        block = max(16, triton.next_power_of_2(n))
        opts = platform.launch_options(dict(
            num_warps=max(1, min(cfg["one_pass_warps"], block // 512))))
        _gn_one_pass_kernel[(B * G,)](
            x, args_add, args_add_c, w, bb, out, x.stride(0), stride_ab, stride_ac, C, CG, HW, G,
            float(eps),
            BLOCK=block, HAS_AFFINE=has_affine, SILU=silu, **flags, **opts)
        return out

    block = cfg["BLOCK"]
    target = platform.num_sms() * cfg["PROGRAMS_PER_SM"]
    splits = min(cfg["MAX_SPLITS"], max(1, triton.cdiv(target, B * G)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    splits = triton.cdiv(n, chunk)
    mean_ws = torch.empty((B * G, splits), dtype=torch.float32, device=x.device)
    m2_ws = torch.empty_like(mean_ws)
    opts = platform.launch_options(cfg)
    grid = (B * G, splits)
    _gn_stats_kernel[grid](
        x, args_add, args_add_c, mean_ws, m2_ws, x.stride(0), stride_ab, stride_ac,
        C, CG, HW, G, splits, chunk, BLOCK=block, **flags, **opts)
    _gn_apply_kernel[grid](
        x, args_add, args_add_c, mean_ws, m2_ws, w, bb, out, x.stride(0), stride_ab, stride_ac,
        C, CG, HW, G, splits, chunk, float(eps),
        BLOCK=block, S_P2=max(2, triton.next_power_of_2(splits)),
        HAS_AFFINE=has_affine, SILU=silu, **flags, **opts)
    return out
