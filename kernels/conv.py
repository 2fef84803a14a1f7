"""A 2-D convolution as im2col + one GEMM, for the small maps where cuDNN leaves the GPU idle.

At 256² the UNet's lowest levels are 4x4 and 8x8 maps with 1280 channels (CFG batch 2): a 3x3
convolution there is a GEMM of M = N·H·W = 32-128 rows, K = 9·1280 = 11520 and 1280 columns.
cuDNN's implicit-GEMM kernel tiles M and N only (64x64 tiles: 20-40 CTAs for 132 SMs) and walks
all of K in each, so most of the GPU waits; cuBLAS picks split-K / stream-K for such a GEMM.

    y = conv2d_gemm(x, weight, bias, stride, padding)

x: [N, C, H, W] (channels_last is the case it is for: the map's [N, H, W, C] view needs no copy);
weight: [O, C, kh, kw] (channels_last: its [O, kh·kw·C] view needs no copy). The padded map
(F.pad) and its columns [N·Ho·Wo, kh·kw·C] (one strided copy) are the only extra traffic: 9x a
small map, ~3 MB at [2, 1280, 8, 8] fp16. The result is the GEMM's [N, Ho, Wo, O] output seen as
[N, O, Ho, Wo] with channels_last strides (what cuDNN returns for channels_last input), the bias in
cuBLAS's epilogue. Same operands and products as the convolution, accumulated in cuBLAS's order
(fp32 accumulation; another summation order than cuDNN's, same error vs fp32).

Plain PyTorch (no Triton): where it is used is decided by kernels._fused (fusion "conv_gemm").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, bias=None, stride=1, padding=0):
    """F.conv2d(x, weight, bias, stride, padding) (dilation 1, groups 1) as im2col + GEMM."""
    n, c, h, w = x.shape
    o, ci, kh, kw = weight.shape
    if ci != c:
        raise ValueError(f"conv2d_gemm: input has {c} channels, weight expects {ci}")
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xh = x.permute(0, 2, 3, 1)                      # [N, H, W, C]: a view of a channels_last map
    if ph or pw:
        xh = F.pad(xh, (0, 0, pw, pw, ph, ph))
    s_n, s_h, s_w, s_c = xh.stride()
    cols = xh.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h, s_w, s_c))
    a = cols.reshape(n * ho * wo, kh * kw * c)      # the one copy: im2col
    wm = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)  # a view of a channels_last weight
    y = F.linear(a, wm, bias)                       # [N·Ho·Wo, O]
    return y.view(n, ho, wo, o).permute(0, 3, 1, 2)
