"""LayerNorm forward over the last dimension: y = (x - mean) / sqrt(var + eps) · w + b.

Used by BasicTransformerBlock.norm1/2/3 (N = 320/640/1280 at [2, 4096/1024/256/64, N]) and the
CLIP text model (N = 768 at [B, 77, 768]). Statistics in fp32 from centred values (the whole row
sits in registers: two passes over registers, one read and one write of memory); the output is
rounded once to the input dtype, which is what PyTorch's own LayerNorm does for fp16/bf16.
Each program normalises ROWS rows at once (a [ROWS, BLOCK_N] tile of ~ELEMS_PER_PROGRAM elements)
so short rows (320) still give every warp enough bytes in flight.
Rows must be contiguous in the last dimension; the row stride is free (Triton specialises 1).

With `residual=r` it is the transformer block's `s = x + r; norm(s)` in one pass (fusion
"add_layer_norm"): s is rounded to the I/O dtype (the eager add materialises it), written out
(the residual stream goes on) and normalised; one read of x and r, two writes, instead of an add
kernel (read 2, write 1) and a LayerNorm kernel (read 1, write 1). With `sum_bias=b` too, the
sum is written as s + b (rounded once more; the norm still reads s): fusion "ff_residual" hands
that to the feed-forward's last GEMM as its accumulator input (C, beta=1), so the GEMM adds its
bias and the residual, and no add kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import platform

MAX_N = 16384  # one row in registers; larger rows (none in this model) are refused


@triton.jit
def _layer_norm_fwd_kernel(
    X,     # [M, N], last dim contiguous
    R,     # [M, N] residual added to X first, or dummy (HAS_R)
    S,     # [M, N] contiguous out: X + R (the residual stream) [+ SB], or dummy
    SB,    # [N] added to the S written out (HAS_SB), or dummy
    W,     # [N] or dummy
    Bias,  # [N] or dummy
    Y,     # [M, N] contiguous
    stride_xm, stride_ym, stride_rm, stride_sm,
    M, N, eps,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr, HAS_SB: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(R + rows64[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        sm = (x + r.to(tl.float32)).to(S.dtype.element_ty)
        x = sm.to(tl.float32)
        if HAS_SB:
            sb = tl.load(SB + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            sm = (x + sb).to(S.dtype.element_ty)
        tl.store(S + rows64[:, None] * stride_sm + cols[None, :], sm, mask=mask)
    mean = tl.sum(x, 1) / N
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, *, out: torch.Tensor | None = None,
               residual: torch.Tensor | None = None, sum_bias: torch.Tensor | None = None):
    """LayerNorm of x [..., N] over N; out (optional) is a contiguous [..., N] buffer.
    With residual (x's shape): returns (x + residual, LayerNorm(x + residual)); with sum_bias
    ([N]) too, (x + residual + sum_bias, LayerNorm(x + residual))."""
    N = x.shape[-1]
    if N > MAX_N or x.stride(-1) != 1:
        raise ValueError(f"layer_norm: needs a contiguous last dim <= {MAX_N}")
    x2 = x.reshape(-1, N)  # a view for every layout the model produces
    M = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = out.view(-1, N)
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1:
            raise ValueError("layer_norm: residual must have x's shape, last dim contiguous")
        r2 = residual.reshape(-1, N)
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = s.view(-1, N)
    else:
        r2 = s2 = x2
    if sum_bias is not None and (residual is None or sum_bias.shape != (N,)
                                 or not sum_bias.is_contiguous()):
        raise ValueError("layer_norm: sum_bias must be a contiguous [N], with a residual")
    cfg = platform.config("layer_norm")
    block_n = triton.next_power_of_2(N)
    rows = max(1, min(64, cfg["ELEMS_PER_PROGRAM"] // block_n))
    opts = platform.launch_options(dict(cfg, num_warps=min(cfg["num_warps"],
                                                           max(1, rows * block_n // 256))))
    _layer_norm_fwd_kernel[(triton.cdiv(M, rows),)](
        x2, r2, s2, sum_bias if sum_bias is not None else x2,
        weight if weight is not None else x2, bias if bias is not None else x2, y2,
        x2.stride(0), y2.stride(0), r2.stride(0), s2.stride(0), M, N, float(eps),
        BLOCK_N=block_n, ROWS=rows, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_R=residual is not None, HAS_SB=sum_bias is not None, **opts)
    return out if residual is None else (s, out)
