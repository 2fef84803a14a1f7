"""The one per-dtype tolerance table for kernel tests, and fp64 references.

Rule (after flash-attention's tests): a kernel's error against an fp64 reference must be no worse
than TOL[dtype] and, where PyTorch's own low-precision result is at hand, no worse than
2x PyTorch's error + a small floor. Numbers: fp16 has 11 significant bits (ulp 2^-10 at 1.0),
bf16 8 bits (2^-7); fp32 kernels are checked to ~1e-5 relative (no TF32 anywhere).
"""

import math

import torch

# (atol, rtol) for outputs of magnitude ~1 (normalised activations, attention outputs).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype=None, scale=1.0, torch_result=None):
    """actual vs an fp64/fp32 expected; `scale` widens the table for derived quantities."""
    dtype = dtype or actual.dtype
    atol, rtol = TOL[dtype]
    assert not torch.isnan(actual).any(), "kernel left NaN (poisoned output not fully written?)"
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bound = atol * scale + rtol * scale * e.abs()
    if torch_result is not None:
        # no worse than 2x PyTorch's own error in the same dtype
        bound = torch.maximum(bound, 2 * (torch_result.double() - e).abs() + atol * 0.5)
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements off ({dtype}); max err {err.max().item():.3g}; "
            f"first at flat {i}: got {a.flatten()[i].item():.6g} want {e.flatten()[i].item():.6g}")


def poison(shape, dtype, device="cpu", **kw):
    """An output buffer full of NaN: any element the kernel forgets to write fails the test."""
    return torch.full(shape, math.nan, dtype=dtype, device=device, **kw)


def ref_attention(q, k, v, heads, scale=None, causal=False):
    """Upstream CrossAttention's math in fp64: split heads, (q·kᵀ)·scale, softmax, ·v, merge."""
    B, Lq, C = q.shape
    d = C // heads
    scale = d ** -0.5 if scale is None else scale
    qh, kh, vh = (t.double().unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(Lq, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, -math.inf)
    return (s.softmax(-1) @ vh).transpose(1, 2).reshape(B, Lq, C)


def ref_group_norm(x, groups, weight, bias, eps, silu=False, add=None):
    """fp64 GroupNorm (+ per-(sample, channel) pre-add, + SiLU)."""
    x = x.double()
    if add is not None:
        x = x + add.double()[:, :, None, None]
    y = torch.nn.functional.group_norm(x, groups, weight.double(), bias.double(), eps)
    return y * torch.sigmoid(y) if silu else y
