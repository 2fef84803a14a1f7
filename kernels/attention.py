"""Flash-style attention forward for the port's layout: out = softmax(q·kᵀ·scale) · v per head.

Layout: q [B, Lq, H·d], k/v [B, Lk, H·d], out [B, Lq, H·d], channel = head·d + j (head-major,
upstream's `rearrange(t, 'b n (h d) -> (b h) n d')`). Heads are split and merged through strides:
no copies, no transposes; any strides are accepted (Triton specialises the stride-1 case).

Algorithm: one program per (BLOCK_M queries, batch·head); it walks the keys in BLOCK_N tiles
with an online softmax (running max m, running sum l, fp32 accumulator): no N×N matrix exists in
memory. Statistics, logits and the accumulator are fp32; P is rounded to v's dtype before P·V
(fp16/bf16; the same rounding upstream's autocast einsum does). fp32 inputs use
input_precision="ieee" (no TF32), matching upstream's ATTN_PRECISION="fp32" on GPU.
Scale: s = (q·kᵀ)·scale·log2(e), applied after the product as upstream does, then exp2.

Head dims that are not powers of two (40, 80, 160) are padded to the next power of two with
masked loads (64, 128, 256; d 40 costs what d 64 does). A split into two power-of-two slices
(80 = 64 + 16) was tried and removed: right in the interpreter, wrong fp16 tail slice and an
illegal address on H100/H200 with Triton 3.6 (issue 8); CPU and GPU now run one path.

Dot precision: every tl.dot says input_precision="ieee". For fp16/bf16 inputs every target uses
its 16-bit matrix unit whatever the setting (mma/wgmma, WMMA on RDNA3, MFMA on CDNA), and "ieee"
is the only value all three backends accept (Triton's AMD backend rejects "tf32" except on gfx942);
for fp32 inputs it means true fp32 products (upstream's ATTN_PRECISION="fp32"). On AMD, fp32 inputs
go to SDPA (platform.fp32_dot_ok: RDNA3 has no fp32 WMMA).

d > 256 (the VAE's single 512-wide head, one call per image decode) goes to PyTorch's
scaled_dot_product_attention instead: a [BLOCK_M, 512] fp32 accumulator does not fit in
registers next to the Q tile, and a d-split flash kernel recomputes Q·Kᵀ per split (1.5-2x the
FLOPs). The call is ~35 GFLOP (0.1-0.2 ms of a ~22 ms decode); SDPA's memory-efficient kernel
handles it without the N×N matrix. The patch handle counts these calls as "sdpa".

Interpreter (CPU CI): bf16 tl.dot returns garbage there, so bf16 tiles are upcast to fp32.
References: FlashAttention (Dao et al. 2022), FlashAttention-2 (Dao 2023), Triton's fused
attention tutorial (structure only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import platform

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q,  # [B, Lq, H*HEAD_DIM]
    K,  # [B, Lk, H*HEAD_DIM]
    V,  # [B, Lk, H*HEAD_DIM]
    O,  # [B, Lq, H*HEAD_DIM]
    stride_qb, stride_ql, stride_qc,
    stride_kb, stride_kl, stride_kc,
    stride_vb, stride_vl, stride_vc,
    stride_ob, stride_ol, stride_oc,
    H, Lq, Lk,
    qk_scale,  # scale * log2(e), fp32
    HEAD_DIM: tl.constexpr,
    DP: tl.constexpr,  # HEAD_DIM padded to a power of two >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_N: tl.constexpr,  # Lk % BLOCK_N == 0 and not CAUSAL: no key mask needed
    UPCAST: tl.constexpr,  # interpreter + bf16: compute the dots in fp32
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, DP)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < Lq

    q_base = Q + b.to(tl.int64) * stride_qb + h * HEAD_DIM * stride_qc
    k_base = K + b.to(tl.int64) * stride_kb + h * HEAD_DIM * stride_kc
    v_base = V + b.to(tl.int64) * stride_vb + h * HEAD_DIM * stride_vc

    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qc,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = Lk
    if CAUSAL:
        # keys after the block's last query contribute nothing: stop early
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)

    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        if EVEN_N:
            kv_mask = d_valid[None, :]
        else:
            kv_mask = (kn < Lk)[:, None] & d_valid[None, :]
        # K tile [BLOCK_N, DP] straight from the head-major layout, transposed for the product
        k = tl.load(k_base + kn[:, None] * stride_kl + offs_d[None, :] * stride_kc,
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        if not EVEN_N:
            keep = (kn < Lk)[None, :]
            if CAUSAL:
                keep = keep & (kn[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))

        # Online softmax on s·scale (one FMA per logit). Every row sees key 0 in its first tile
        # (causal included), so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        v = tl.load(v_base + kn[:, None] * stride_vl + offs_d[None, :] * stride_vc,
                    mask=kv_mask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")

    out = acc * (1.0 / l_i)[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h * HEAD_DIM * stride_oc
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_oc,
             out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


# Head dims above this go to SDPA (see the header); patch.py counts those calls as "sdpa".
MAX_KERNEL_HEAD_DIM = 256


def uses_sdpa(d: int, dtype: torch.dtype) -> bool:
    """Does `attention` hand this call to PyTorch's SDPA? (d > 256, or fp32 where fp32 dots
    have no matrix unit: platform.fp32_dot_ok)."""
    return d > MAX_KERNEL_HEAD_DIM or (dtype == torch.float32 and not platform.fp32_dot_ok())


def pick_config(d: int, Lk: int) -> dict:
    """The launch configuration for head dim d over Lk keys (platform tables, by padded d)."""
    bucket = max(64, triton.next_power_of_2(d))
    cfg = platform.config("attention_short_kv" if Lk <= 128 else "attention", bucket)
    if Lk <= 128:  # one or two key tiles: no wider than the keys
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(Lk)))
    return cfg


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
              scale: float | None = None, causal: bool = False,
              out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale [+ causal mask]) · v for q [B, Lq, H·d], k/v [B, Lk, H·d] → [B, Lq, H·d].
    `config` overrides the platform's launch configuration (benchmark sweeps)."""
    B, Lq, C = q.shape
    Lk = k.shape[1]
    if C % heads or k.shape != (B, Lk, C) or v.shape != (B, Lk, C):
        raise ValueError(f"attention: bad shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                         f"v {tuple(v.shape)} heads {heads}")
    if causal and Lq != Lk:
        raise ValueError("attention: causal needs Lq == Lk")
    d = C // heads
    scale = d ** -0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty((B, Lq, C), dtype=q.dtype, device=q.device)

    if uses_sdpa(d, q.dtype):
        qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        out.copy_(o.transpose(1, 2).reshape(B, Lq, C))
        return out

    cfg = dict(config) if config is not None else pick_config(d, Lk)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(Lq, BLOCK_M), B * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, Lq, Lk, scale * _LOG2E,
        HEAD_DIM=d, DP=max(16, triton.next_power_of_2(d)), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        CAUSAL=causal, EVEN_N=(Lk % BLOCK_N == 0 and not causal),
        UPCAST=platform.is_interpreter() and q.dtype == torch.bfloat16,
        **platform.launch_options(cfg),
    )
    return out
