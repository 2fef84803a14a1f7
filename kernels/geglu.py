"""GEGLU: out = value · GELU_erf(gate) for the projection output x [..., 2F]: value = x[..., :F],
gate = x[..., F:] (upstream's `x, gate = proj(x).chunk(2, dim=-1); x * F.gelu(gate)`).

One pass: reads 2F and writes F elements per row instead of eager's chunk + gelu (read F,
write F) + mul (read 2F, write F). Exact GELU through erf, computed in fp32. Rounding points follow
upstream: GELU(gate) is rounded to the I/O dtype (eager materialises it), then the product is
computed in fp32 and rounded once. Interpreter-safe (erf, no libdevice tanh).
Shapes here: [2, 4096, 2·1280], [2, 1024, 2·2560], [2, 256, 2·5120], [2, 64, 2·5120].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform


@triton.jit
def _geglu_fwd_kernel(
    X,  # [M, 2F], last dim contiguous
    Y,  # [M, F] contiguous
    stride_xm, stride_ym,
    M, F,
    BLOCK_F: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)
    xp = X + rows64[:, None] * stride_xm + cols[None, :]
    val = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(xp + F, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    gelu = gelu.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], (val * gelu).to(Y.dtype.element_ty),
             mask=mask)


def _rows(x, n_in, n_out, out):
    """(x as [M, n_in] rows, the [..., n_out] output (`out` or a new one), it as [M, n_out])."""
    if out is None:
        out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    return x.reshape(-1, n_in), out, out.view(-1, n_out)


def geglu(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2F] → [..., F]."""
    two_f = x.shape[-1]
    if two_f % 2 or x.stride(-1) != 1:
        raise ValueError("geglu: needs an even, contiguous last dim")
    F = two_f // 2
    x2, out, y2 = _rows(x, two_f, F, out)
    M = x2.shape[0]
    cfg = platform.config("elementwise")
    block_f = min(triton.next_power_of_2(F), 1024)
    rows = max(1, cfg["BLOCK"] // block_f)
    grid = (triton.cdiv(M, rows), triton.cdiv(F, block_f))
    _geglu_fwd_kernel[grid](x2, y2, x2.stride(0), y2.stride(0), M, F,
                            BLOCK_F=block_f, ROWS=rows, **platform.launch_options(cfg))
    return out


# -- fusion geglu_gemm: the projection GEMM with GEGLU in its epilogue ---------------------------
@triton.jit
def _geglu_linear_kernel(
    X,  # [M, K], last dim contiguous
    W,  # [2F, K] (nn.Linear's weight), last dim contiguous: rows [0, F) value, [F, 2F) gate
    B,  # [2F]
    Y,  # [M, F] contiguous
    stride_xm, stride_wn, stride_ym,
    M, F, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # grouped order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(F, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < F
    xp = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    wv = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]      # [BLOCK_K, BLOCK_N] of W^T
    wg = wv + F * stride_wn
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(xp, mask=m_ok[:, None], other=0.0)
            bv = tl.load(wv, mask=n_ok[None, :], other=0.0)
            bg = tl.load(wg, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k * BLOCK_K + rk) < K
            a = tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bv = tl.load(wv, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bg = tl.load(wg, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_v = tl.dot(a, bv, acc_v, input_precision="ieee")
        acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
        xp += BLOCK_K
        wv += BLOCK_K
        wg += BLOCK_K
    # Upstream's rounding points: the projection (bias added in fp32) rounded to the I/O dtype,
    # GELU(gate) rounded, their product computed in fp32 and rounded once.
    out_t = Y.dtype.element_ty
    v = (acc_v + tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_t)
    g = (acc_g + tl.load(B + F + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]).to(out_t)
    g = g.to(tl.float32)
    gelu = (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))).to(out_t)
    y = (v.to(tl.float32) * gelu.to(tl.float32)).to(out_t)
    tl.store(Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], y,
             mask=m_ok[:, None] & n_ok[None, :])


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 *, out: torch.Tensor | None = None) -> torch.Tensor:
    """GEGLU(F.linear(x, weight, bias)) for x [..., K], weight [2F, K], bias [2F] → [..., F], in
    one kernel: the [.., 2F] projection is never written."""
    K = x.shape[-1]
    two_f = weight.shape[0]
    if two_f % 2 or weight.shape[1] != K or bias is None or bias.shape != (two_f,):
        raise ValueError("geglu_linear: needs weight [2F, K] and bias [2F]")
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or not bias.is_contiguous():
        raise ValueError("geglu_linear: needs contiguous last dims")
    F = two_f // 2
    x2, out, y2 = _rows(x, K, F, out)
    M = x2.shape[0]
    cfg = platform.config("geglu_gemm")
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(F, bn),)
    _geglu_linear_kernel[grid](x2, weight, bias, y2, x2.stride(0), weight.stride(0), y2.stride(0),
                               M, F, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                               GROUP_M=cfg["GROUP_M"], EVEN_K=K % bk == 0,
                               **platform.launch_options(cfg))
    return out
