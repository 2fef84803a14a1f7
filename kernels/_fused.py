"""The fusion sites of kernels.patch: block forwards that launch fewer, fatter kernels.

Each fusion is a name of `patch.FUSIONS`, switched by `kernels.patch(model, fusions=(...))`.
Like every site, a fused forward is bound to the instance, reads weights and biases from the
module at call time (so `.to()`, `.half()`, `load_state_dict` keep working), and calls the
module's submodules as modules where it keeps them (their own patched forwards still apply).
Where a fusion does not apply (layout, rank, mask) the original forward runs and the reason is
counted; `strict=True` raises instead.

* conv_bias (ResBlock): both 3x3 convolutions and the skip convolution run with bias=None. The
  first bias goes into the GroupNorm that reads the output (group_norm's `add_c`, next to the
  emb add it already had), the second and the skip's into one bias + residual kernel.
* spatial_transformer: proj_in / proj_out as GEMMs on the [B, H·W, C] token view (a view of a
  channels_last map: no layout copies; upstream's `.contiguous()` to NCHW and back costs two
  copies per block), proj_in's bias in cuBLAS's epilogue, proj_out's bias and the `+ x_in`
  residual in one bias + residual kernel.
* qkv: self-attention's three projections as one GEMM against the concatenated weight; q, k, v
  are strided views of its output (SDPA and the Triton kernel take strides). The concatenated
  weight is cached on the handle, keyed on the three weights' (data_ptr, _version, dtype), so
  an in-place or replaced weight rebuilds it; `undo()` drops the cache. Cost: a second copy of
  the self-attention q/k/v weights (~110 MB in fp16 for UNet + ControlNet) for 46 GEMMs a step.
* add_layer_norm (BasicTransformerBlock): `x = attn(...) + x; norm(x)` as one LayerNorm kernel
  that also writes the sum (twice per block).
* ff_residual (with add_layer_norm): the feed-forward's `ff(h) + s` without an add kernel: the
  second LayerNorm kernel writes s + the output Linear's bias, and that GEMM accumulates into it
  in place (cuBLAS beta=1: `addmm_`). Rounding: s + b is rounded before the GEMM adds to it
  (upstream rounds the GEMM + b, then the sum): not bit-identical to the unfused path.
* conv1x1_bias: a 1x1 Conv2d on a channels_last input as F.linear on its [B, H, W, C] view, which
  gets cuBLAS's bias epilogue (H200, [2,320,64,64]: 9.5 µs against 6.1 + 7.1 µs for GEMM + bias
  pass). Used by the ControlNet's zero convolutions; NCHW inputs (the VAE) run the conv as is.
* conv_gemm: a 3x3 convolution with a small channels_last output map (Ho·Wo <= platform's
  "conv_gemm" MAX_HW: the 4x4 maps of the 256² UNet's 1280-channel level) as im2col + one cuBLAS
  GEMM (kernels/conv.py), where cuDNN's implicit GEMM leaves most SMs idle; nn.Conv2d sites and
  the fused ResBlock's bias-free convolutions alike. Larger maps, NCHW maps and targets with
  MAX_HW 0 run cuDNN (counted "unfused"). Not a default fusion: +89 kernels a step at 256² for
  -0.11 ms of GPU time (platform.py has the numbers); a one-kernel split-K convolution is the
  real fix for these maps.
* geglu_gemm (GEGLU): the feed-forward projection and GEGLU in one Triton GEMM whose epilogue
  adds the bias, splits value and gate and applies the GELU (kernels/geglu.py geglu_linear): the
  [.., 2F] projection (2x the GEGLU output) is never written nor read back, and one kernel
  replaces cuBLAS's GEMM + the GEGLU pass. fp32 on AMD runs the per-op path (no fp32 dot there).
  Only projections of at most platform's MAX_K input features take it (H100: 1.27x cuBLAS + the
  GEGLU kernel at K=320, 0.77-0.99x at 640 and 1280; MAX_K=0 on AMD, not measured there); the
  others run F.linear + the GEGLU kernel (counted as unfused). A default fusion.
* skip_cat has no site here: fast mode's decoder (runtime/fast/split.py) calls kernels.residual's
  skip_cat through `handle.run("skip_cat", ...)` when the handle lists it; likewise ddim_update
  (kernels/ddim.py), the guidance combine and DDIM update of fast mode's step (runtime/fast/step.py).
Measured on the H200 (benchmarks/results/fusions_h200.md): the first six defaults take a 512² step
from 1150 to 849 kernels and the 20-step graph loop from 189 to 163 ms.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import platform
from .attention import attention
from .conv import conv2d_gemm
from .geglu import geglu, geglu_linear
from .group_norm import group_norm
from .layer_norm import MAX_N as LN_MAX_N
from .layer_norm import layer_norm
from .patch import _dense_reason, _tensor_reason
from .residual import bias_residual


def _conv(handle, conv, x):
    """conv(x) without its bias (the caller adds it inside a fused kernel); on a small map as a
    GEMM when the handle has "conv_gemm"."""
    if "conv_gemm" in handle.fusions and conv_gemm_ok(conv):
        return _conv_gemm(handle, conv, x, None)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _is_conv2d(m):
    return type(m) is nn.Conv2d and m.padding_mode == "zeros"


# -- ResBlock ------------------------------------------------------------------------------------
def resblock_ok(m):
    return (type(m).__name__ == "ResBlock" and hasattr(m, "_forward") and not m.use_scale_shift_norm
            and len(m.in_layers) == 3 and isinstance(m.in_layers[0], nn.GroupNorm)
            and _is_conv2d(m.in_layers[2]) and len(m.out_layers) == 4
            and isinstance(m.out_layers[0], nn.GroupNorm) and type(m.out_layers[1]) is nn.SiLU
            and _is_conv2d(m.out_layers[3])
            and (isinstance(m.skip_connection, nn.Identity) or _is_conv2d(m.skip_connection)))


def patch_resblock(handle, rb):
    orig = rb._forward

    def _forward(self, x, emb):
        def fast():
            gn1, conv1 = self.in_layers[0], self.in_layers[2]
            h = group_norm(x, gn1.num_groups, gn1.weight, gn1.bias, gn1.eps, silu=True)
            h = _conv(handle, conv1, h)
            emb_out = self.emb_layers(emb).type(h.dtype)
            gn2 = self.out_layers[0]
            h = group_norm(h, gn2.num_groups, gn2.weight, gn2.bias, gn2.eps, silu=True,
                           add=emb_out, add_c=conv1.bias)
            h = _conv(handle, self.out_layers[3], self.out_layers[2](h))
            skip = self.skip_connection
            if isinstance(skip, nn.Identity):
                res, b2 = x, None
            else:
                res, b2 = _conv(handle, skip, x), skip.bias
            return bias_residual(h, self.out_layers[3].bias, res, b2)

        r = _dense_reason(x) or (None if x.dim() == 4 and emb.dim() == 2 else "rank")
        return handle.run("conv_bias", r, fast, lambda: orig(x, emb))
    handle._set(rb, "_forward", _forward, "conv_bias")


# -- SpatialTransformer --------------------------------------------------------------------------
def spatial_transformer_ok(m):
    return (type(m).__name__ == "SpatialTransformer" and hasattr(m, "transformer_blocks")
            and (m.use_linear or (_is_conv2d(m.proj_in) and _is_conv2d(m.proj_out)
                                  and m.proj_in.kernel_size == (1, 1)
                                  and m.proj_out.kernel_size == (1, 1))))


def patch_spatial_transformer(handle, st):
    orig = st.forward

    def forward(self, x, context=None):
        def fast():
            ctx = context if isinstance(context, list) else [context]
            b, c, h, w = x.shape
            # a view for channels_last; a copy for NCHW (upstream's .contiguous() makes it too)
            t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
            w_in = self.proj_in.weight
            t = F.linear(t, w_in.reshape(w_in.shape[0], -1), self.proj_in.bias)
            for i, block in enumerate(self.transformer_blocks):
                t = block(t, context=ctx[i])
            w_out = self.proj_out.weight
            p = F.linear(t, w_out.reshape(w_out.shape[0], -1))
            p = p.view(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, H, W] with channels_last strides
            return bias_residual(p, self.proj_out.bias, x)

        r = _dense_reason(x) or (None if x.dim() == 4 else "rank")
        return handle.run("spatial_transformer", r, fast, lambda: orig(x, context))
    handle._set(st, "forward", forward, "spatial_transformer")


# -- self-attention: one GEMM for q, k, v --------------------------------------------------------
def _qkv_weight(handle, m):
    """[3·H·d, D]: to_q, to_k and to_v's weights one above the other. Weights that already lie
    so in memory (fast mode's flat layout, runtime/fast/flat.py) give a view of them; others a
    concatenated copy, cached per module and rebuilt when a weight changes."""
    ws = (m.to_q.weight, m.to_k.weight, m.to_v.weight)
    view = _adjacent_rows(ws)
    if view is not None:
        return view
    key = tuple((w.data_ptr(), w._version) for w in ws) + (ws[0].dtype, ws[0].device)
    hit = handle._qkv_cache.get(m)
    if hit is None or hit[0] != key:
        hit = (key, torch.cat(ws, 0))
        handle._qkv_cache[m] = hit
    return hit[1]


def _adjacent_rows(ws):
    """The [sum of rows, cols] view that torch.cat(ws, 0) would copy, when the contiguous 2-D
    tensors `ws` lie one after another in one storage; else None."""
    w0 = ws[0]
    if not all(w.dim() == 2 and w.is_contiguous() and w.dtype == w0.dtype
               and w.shape[1] == w0.shape[1] and w.device == w0.device
               and w.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr()
               for w in ws):
        return None
    end = w0.data_ptr()
    for w in ws:
        if w.data_ptr() != end:
            return None
        end += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in ws)
    return w0.as_strided((rows, w0.shape[1]), (w0.shape[1], 1))


def qkv_ok(m):
    return (type(m).__name__ == "CrossAttention" and hasattr(m, "to_q")
            and m.to_q.bias is None and m.to_k.bias is None and m.to_v.bias is None
            and m.to_k.in_features == m.to_q.in_features)


def patch_qkv(handle, m, use_kernel):
    orig = m.forward

    def forward(self, x, context=None, mask=None):
        def fast():
            qkv = F.linear(x, _qkv_weight(handle, self))  # [B, N, 3·H·d]
            q, k, v = qkv.chunk(3, dim=-1)                 # strided [B, N, H·d] views
            if use_kernel:
                return self.to_out(attention(q, k, v, self.heads, scale=self.scale))
            b, n, _ = q.shape
            q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            return self.to_out(o.transpose(1, 2).reshape(b, n, -1))

        r = _tensor_reason(x)
        if context is not None:
            r = "context (cross-attention)"
        elif mask is not None:
            r = "mask"
        elif r is None and x.dim() != 3:
            r = "rank"
        return handle.run("qkv", r, fast, lambda: orig(x, context=context, mask=mask))
    handle._set(m, "forward", forward, "qkv")


# -- BasicTransformerBlock: residual add + LayerNorm ----------------------------------------------
def transformer_block_ok(m):
    return (type(m).__name__ == "BasicTransformerBlock" and hasattr(m, "_forward")
            and all(isinstance(getattr(m, f"norm{i}", None), nn.LayerNorm) for i in (1, 2, 3)))


def ff_residual_ok(blk):
    """FeedForward as upstream builds it: (project_in, Dropout, Linear with a bias)."""
    net = getattr(getattr(blk, "ff", None), "net", None)
    return (isinstance(net, nn.Sequential) and len(net) == 3 and type(net[1]) is nn.Dropout
            and type(net[2]) is nn.Linear and net[2].bias is not None)


def patch_transformer_block(handle, blk, ff_residual=False):
    """add_layer_norm; with `ff_residual` also the feed-forward's output GEMM taking
    s + its bias (written by the second LayerNorm kernel) as its accumulator input, in place."""
    orig = blk._forward

    def _forward(self, x, context=None):
        def fast():
            a = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
            n2 = self.norm2
            s, h = layer_norm(a, n2.weight, n2.bias, n2.eps, residual=x)
            a = self.attn2(h, context=context)
            n3 = self.norm3
            if not ff_residual:
                s, h = layer_norm(a, n3.weight, n3.bias, n3.eps, residual=s)
                return self.ff(h) + s
            net = self.ff.net
            out = net[2]
            s, h = layer_norm(a, n3.weight, n3.bias, n3.eps, residual=s, sum_bias=out.bias)
            g = net[1](net[0](h))
            s.view(-1, s.shape[-1]).addmm_(g.reshape(-1, g.shape[-1]), out.weight.t())
            handle.counts["ff_residual"]["calls"] += 1
            return s

        r = _tensor_reason(x)
        if r is None and (x.dim() != 3 or x.shape[-1] > LN_MAX_N or x.stride(-1) != 1):
            r = "shape"
        return handle.run("add_layer_norm", r, fast, lambda: orig(x, context))
    handle._set(blk, "_forward", _forward, "add_layer_norm")
    if ff_residual:
        handle.counts["ff_residual"]["sites"] += 1


# -- 1x1 convolution on channels_last as a GEMM with the bias in its epilogue --------------------
def conv1x1_ok(m):
    return (_is_conv2d(m) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1
            and m.bias is not None)


def patch_conv1x1(handle, conv):
    orig = conv.forward

    def forward(self, x):
        r = _tensor_reason(x)
        if r is None and not (x.dim() == 4 and not x.is_contiguous()
                              and x.is_contiguous(memory_format=torch.channels_last)):
            # NCHW (the VAE): nothing to fuse, cuDNN's own 1x1 path is used; not a failure
            handle.counts["conv1x1_bias"]["unfused"] += 1
            return orig(x)

        def fast():
            w = self.weight
            return F.linear(x.permute(0, 2, 3, 1), w.reshape(w.shape[0], -1),
                            self.bias).permute(0, 3, 1, 2)
        return handle.run("conv1x1_bias", r, fast, lambda: orig(x))
    handle._set(conv, "forward", forward, "conv1x1_bias")


# -- small maps: 3x3 convolution as im2col + GEMM -------------------------------------------------
def conv_gemm_ok(m):
    return (_is_conv2d(m) and m.kernel_size == (3, 3) and m.dilation == (1, 1) and m.groups == 1)


def _out_pixels(conv, x):
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)


def _conv_gemm(handle, conv, x, bias):
    """conv(x) with `bias` as im2col + GEMM on a small channels_last map, else F.conv2d."""
    def slow():
        return F.conv2d(x, conv.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    r = _tensor_reason(x)
    max_hw = platform.config("conv_gemm")["MAX_HW"]
    if r is None and not (x.dim() == 4 and _out_pixels(conv, x) <= max_hw
                          and not x.is_contiguous()
                          and x.is_contiguous(memory_format=torch.channels_last)):
        handle.counts["conv_gemm"]["unfused"] += 1  # large or NCHW map: cuDNN's case
        return slow()
    return handle.run("conv_gemm", r, lambda: conv2d_gemm(x, conv.weight, bias, conv.stride,
                                                         conv.padding), slow)


def patch_conv_gemm(handle, conv):
    def forward(self, x):
        return _conv_gemm(handle, self, x, self.bias)
    handle._set(conv, "forward", forward, "conv_gemm")


# -- GEGLU: projection GEMM + GEGLU in one kernel ---------------------------------------------------
def geglu_gemm_ok(m):
    return (type(m).__name__ == "GEGLU" and type(getattr(m, "proj", None)) is nn.Linear
            and m.proj.bias is not None)


def run_geglu(handle, m, x, orig, reason=None):
    """GEGLU `m` as its projection GEMM, then the GEGLU kernel: the plain "geglu" site, and
    geglu_gemm's path for the projections it leaves to cuBLAS."""
    return handle.run("geglu", reason, lambda: geglu(m.proj(x).contiguous()), lambda: orig(x))


def patch_geglu_gemm(handle, m):
    orig = m.forward

    def forward(self, x):
        r = _tensor_reason(x)
        if r is None and x.stride(-1) != 1:
            r = "layout"
        if r is None and (x.shape[-1] > platform.config("geglu_gemm")["MAX_K"] or
                          (x.dtype == torch.float32 and not platform.fp32_dot_ok())):
            # a wide projection (cuBLAS's GEMM + the GEGLU kernel measured faster), or fp32
            # where Triton has no fp32 dot: the GEMM, then the GEGLU kernel
            handle.counts["geglu_gemm"]["unfused"] += 1
            return run_geglu(handle, self, x, orig)
        return handle.run("geglu_gemm", r,
                          lambda: geglu_linear(x, self.proj.weight, self.proj.bias),
                          lambda: orig(x))
    handle._set(m, "forward", forward, "geglu_gemm")
