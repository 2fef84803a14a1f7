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

Head dims that are not powers of two are covered by two dot products instead of padding to the
next power of two: d = D0 + D1 with D0 the largest power of two ≤ d and D1 the tail rounded up
to a power of two ≥ 16 (tl.dot's minimum): 40 = 32+16 (48 computed, not 64), 80 = 64+16 (exact,
not 128), 160 = 128+32 (exact, not 256). 64 (CLIP) is a single dot.
Status: the split is validated in the interpreter only. On H100 with Triton 3.6 the fp16 tail
slice came out wrong (every channel of the D1 slice; fp32 was right) and a later launch hit an
illegal address, so platform.py switches the split off on GPUs (plain power-of-two padding with
masks, the layout of Triton's tutorial) until that is understood.

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
    D0: tl.constexpr,  # first head-dim slice (power of two >= 16)
    D1: tl.constexpr,  # tail slice, 0 = none
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_N: tl.constexpr,  # Lk % BLOCK_N == 0 and not CAUSAL: no key mask needed
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (ignored for 16-bit)
    UPCAST: tl.constexpr,  # interpreter + bf16: compute the dots in fp32
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    m_valid = offs_m < Lq

    q_base = Q + b.to(tl.int64) * stride_qb + h * HEAD_DIM * stride_qc
    k_base = K + b.to(tl.int64) * stride_kb + h * HEAD_DIM * stride_kc
    v_base = V + b.to(tl.int64) * stride_vb + h * HEAD_DIM * stride_vc

    q0 = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d0[None, :] * stride_qc,
                 mask=m_valid[:, None] & (offs_d0[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d1[None, :] * stride_qc,
                     mask=m_valid[:, None] & (offs_d1[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = Lk
    if CAUSAL:
        # keys after the block's last query contribute nothing: stop early
        hi = tl.minimum(Lk, (pid_m + 1) * BLOCK_M)

    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        n_valid = kn < Lk
        # K loaded transposed ([D, BLOCK_N]) straight from the head-major layout
        k0 = tl.load(k_base + kn[None, :] * stride_kl + offs_d0[:, None] * stride_kc,
                     mask=n_valid[None, :] & (offs_d0[:, None] < HEAD_DIM), other=0.0)
        if UPCAST:
            k0 = k0.to(tl.float32)
        s = tl.dot(q0, k0, input_precision=PRECISION)
        if D1 > 0:
            k1 = tl.load(k_base + kn[None, :] * stride_kl + offs_d1[:, None] * stride_kc,
                         mask=n_valid[None, :] & (offs_d1[:, None] < HEAD_DIM), other=0.0)
            if UPCAST:
                k1 = k1.to(tl.float32)
            s += tl.dot(q1, k1, input_precision=PRECISION)
        s = s * qk_scale
        if not EVEN_N:
            keep = n_valid[None, :]
            if CAUSAL:
                keep = keep & (kn[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))

        # Online softmax. Every row sees key 0 in its first tile (causal included), so m_new is
        # finite from the first iteration on and exp2(-inf - finite) = 0 is the only -inf case.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        v0 = tl.load(v_base + kn[:, None] * stride_vl + offs_d0[None, :] * stride_vc,
                     mask=n_valid[:, None] & (offs_d0[None, :] < HEAD_DIM), other=0.0)
        if UPCAST:
            v0 = v0.to(tl.float32)
        p_v = p.to(v0.dtype)
        acc0 = acc0 * alpha[:, None] + tl.dot(p_v, v0, input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(v_base + kn[:, None] * stride_vl + offs_d1[None, :] * stride_vc,
                         mask=n_valid[:, None] & (offs_d1[None, :] < HEAD_DIM), other=0.0)
            if UPCAST:
                v1 = v1.to(tl.float32)
            acc1 = acc1 * alpha[:, None] + tl.dot(p_v, v1, input_precision=PRECISION)

    inv_l = 1.0 / l_i
    o_base = O + b.to(tl.int64) * stride_ob + h * HEAD_DIM * stride_oc
    out0 = acc0 * inv_l[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d0[None, :] * stride_oc,
             out0.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if D1 > 0:
        out1 = acc1 * inv_l[:, None]
        tl.store(o_base + offs_m[:, None] * stride_ol + offs_d1[None, :] * stride_oc,
                 out1.to(O.dtype.element_ty), mask=m_valid[:, None] & (offs_d1[None, :] < HEAD_DIM))


def _split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): cover d with one or two power-of-two slices, each >= 16 (tl.dot's minimum)."""
    p2 = max(16, triton.next_power_of_2(d))
    d0 = max(16, 1 << (d.bit_length() - 1))
    if d0 >= d:
        return p2, 0
    d1 = max(16, triton.next_power_of_2(d - d0))
    if d0 + d1 >= p2:
        return p2, 0
    return d0, d1


# Head dims above this go to SDPA (see the header); patch.py counts those calls as "sdpa".
MAX_KERNEL_HEAD_DIM = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
              scale: float | None = None, causal: bool = False,
              out: torch.Tensor | None = None, split_head_dim: bool | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale [+ causal mask]) · v for q [B, Lq, H·d], k/v [B, Lk, H·d] → [B, Lq, H·d]."""
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

    if d > MAX_KERNEL_HEAD_DIM:
        qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
        out.copy_(o.transpose(1, 2).reshape(B, Lq, C))
        return out

    if split_head_dim is None:
        split_head_dim = platform.config("attention_split_head_dim")
    D0, D1 = _split_head_dim(d) if split_head_dim else (max(16, triton.next_power_of_2(d)), 0)
    bucket = max(64, triton.next_power_of_2(d))
    family = "attention_short_kv" if Lk <= 128 else "attention"
    cfg = platform.config(family, bucket)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if Lk <= 128:
        BLOCK_N = min(BLOCK_N, max(16, triton.next_power_of_2(Lk)))
    interp = platform.is_interpreter()
    grid = (triton.cdiv(Lq, BLOCK_M), B * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, Lq, Lk, scale * _LOG2E,
        HEAD_DIM=d, D0=D0, D1=D1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        CAUSAL=causal, EVEN_N=(Lk % BLOCK_N == 0 and not causal),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interp and q.dtype == torch.bfloat16,
        **platform.launch_options(cfg),
    )
    return out

