"""kernels.patch fusions (kernels/_fused.py) and their kernels against unfused references.

CPU (interpreter, tiny shapes, fp32): each kernel against fp64 math; each fused block forward
(strict=True, so nothing passes on a fallback) against the same module unpatched in fp64.
GPU (`gpu`, real shapes of the 512² UNet, fp16 channels_last as fast mode runs it): each fused
block against the fp32 module, no worse than 2x the unfused fp16 path's error (+ floor).
"""

import copy

import pytest
import torch
import torch.nn as nn

import kernels
from kernels import platform
from kernels.group_norm import group_norm
from kernels.layer_norm import layer_norm
from kernels.residual import bias_residual, skip_cat
from tolerances import assert_close, ref_group_norm

DEV = "cpu" if platform.is_interpreter() else "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references on a GPU must be fp32: cuDNN convolutions default to TF32 (10-bit
    mantissa), which failed the fp32 ResBlock comparison on the H200 by 8e-4."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


OTHERS = dict(attention=True, group_norm=True, layer_norm=True, geglu=True, silu=True)


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


# -- kernels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "tokens"])
@pytest.mark.parametrize("with_res,with_b2", [(False, False), (True, False), (True, True)])
def test_bias_residual(layout, with_res, with_b2):
    B, C, H, W = 2, 12, 5, 7
    h = _rand(B, C, H, W, seed=1)
    if layout == "nhwc":
        h = h.contiguous(memory_format=torch.channels_last)
    elif layout == "tokens":  # [B, H·W, C] GEMM output viewed as a map
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C).view(B, H, W, C).permute(0, 3, 1, 2)
    b, b2 = _rand(C, seed=2), _rand(C, seed=3)
    r = _rand(B, C, H, W, seed=4) if with_res else None
    out = bias_residual(h, b, r, b2 if with_b2 else None)
    ref = h.double() + b.double()[:, None, None]
    if with_res:
        ref = ref + r.double() + (b2.double()[:, None, None] if with_b2 else 0)
    assert out.stride() == (r if with_res else h).stride()
    assert_close(out, ref, torch.float32)


@pytest.mark.gpu  # fp16 rounding: the interpreter's fp16 math is numpy's, not the GPU's
def test_bias_residual_rounds_like_the_unfused_fp16_path():
    h, r = _rand(2, 320, 16, 16, dtype=torch.float16), _rand(2, 320, 16, 16, dtype=torch.float16, seed=5)
    b, b2 = _rand(320, dtype=torch.float16, seed=6), _rand(320, dtype=torch.float16, seed=7)
    want = (h + b[:, None, None]) + (r + b2[:, None, None])
    assert torch.equal(bias_residual(h, b, r, b2), want)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("with_ctrl,with_scale", [(False, False), (True, False), (True, True)])
def test_skip_cat(layout, with_ctrl, with_scale):
    h, skip, ctrl = _rand(2, 8, 3, 5, seed=30), _rand(2, 12, 3, 5, seed=31), _rand(2, 12, 3, 5, seed=32)
    if layout == "nhwc":
        h, skip, ctrl = (t.contiguous(memory_format=torch.channels_last) for t in (h, skip, ctrl))
    scale = torch.tensor([0.7], device=DEV)
    out = skip_cat(h, skip, ctrl if with_ctrl else None, scale if with_scale else None)
    s = skip.double() + (ctrl.double() * (0.7 if with_scale else 1.0) if with_ctrl else 0)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")
    assert_close(out, torch.cat([h.double(), s], 1), torch.float32)


def test_fast_decoder_skip_cat_matches_unfused():
    """fast mode's decoder with the skip_cat kernel (unscaled residuals + scales) vs eager."""
    from runtime.fast import unet_decoder, unet_encoder
    from cldm.model import create_model
    from runtime.weights import random_weights_
    import os
    m = create_model(os.path.join(os.path.dirname(__file__), "..", "..", "models", "cldm_tiny.yaml"))
    random_weights_(m, 0)
    unet = m.model.diffusion_model.eval().to(DEV)
    emb = _rand(2, unet.time_embed[-1].out_features, seed=33)
    ctx = _rand(2, 5, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features, seed=34)
    with torch.no_grad():
        mid, hs = unet_encoder(unet, _rand(2, 4, 8, 8, seed=35), emb, ctx)
    ctrl = [_rand(*t.shape, seed=60 + i) for i, t in enumerate(hs + [mid])]
    scales = torch.linspace(0.5, 1.0, 13, device=DEV)
    with torch.no_grad():
        want = unet_decoder(unet, mid, hs, emb, ctx, [c * scales[i] for i, c in enumerate(ctrl)])
        got = unet_decoder(unet, mid, hs, emb, ctx, ctrl, scales=scales, skip_cat=skip_cat)
    assert_close(got, want, torch.float32, scale=5.0)


def test_group_norm_add_c():
    x = _rand(2, 16, 6, 6, seed=8).contiguous(memory_format=torch.channels_last)
    add, add_c = _rand(2, 16, seed=9), _rand(16, seed=10)
    w, b = _rand(16, seed=11), _rand(16, seed=12)
    out = group_norm(x, 4, w, b, 1e-5, silu=True, add=add, add_c=add_c)
    ref = ref_group_norm(x.double() + add_c.double()[:, None, None], 4, w, b, 1e-5, silu=True, add=add)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("sum_bias", [False, True])
def test_layer_norm_residual(sum_bias):
    """s = x + r written (+ sum_bias: ff_residual's s + b) and LayerNorm(x + r)."""
    x, r = _rand(2, 9, 48, seed=13), _rand(2, 9, 48, seed=14)
    w, b = _rand(48, seed=15), _rand(48, seed=16)
    sb = _rand(48, seed=17) if sum_bias else None
    s, y = layer_norm(x, w, b, 1e-5, residual=r, sum_bias=sb)
    ref_s = x.double() + r.double()
    assert_close(s, ref_s + (sb.double() if sum_bias else 0), torch.float32)
    assert_close(y, torch.nn.functional.layer_norm(ref_s, (48,), w.double(), b.double(), 1e-5),
                 torch.float32)


# -- fused block forwards vs the unpatched module ------------------------------------------------
def _resblock(ch, out_ch):
    from ldm.modules.diffusionmodules.openaimodel import ResBlock
    return ResBlock(ch, 32, 0.0, out_channels=out_ch)


def _spatial_transformer(ch, heads, use_linear=False):
    from ldm.modules.attention import SpatialTransformer
    return SpatialTransformer(ch, heads, ch // heads, context_dim=24, use_linear=use_linear)


def _randomize(m, seed=0):
    """Nonzero everywhere (upstream zero-initialises proj_out / out convs: nothing to test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            norm = isinstance(mod, (nn.GroupNorm, nn.LayerNorm))
            for name, p in mod.named_parameters(recurse=False):
                n = torch.randn(p.shape, generator=g)
                if norm:
                    p.copy_(1.0 + 0.1 * n if name == "weight" else 0.1 * n)
                else:
                    p.copy_(n * (0.5 if p.dim() == 1 else p[0].numel() ** -0.5))
    return m.eval()


def _fused_vs_reference(make, inputs, fusion, cl=True, ref_dtype=torch.float64):
    """(patched fp32 output, unpatched output in ref_dtype, counts) for one fusion. Modules with
    CrossAttention are referenced in fp32: it computes its logits in float32 whatever the input."""
    m = _randomize(make()).to(DEV)
    ref_m = copy.deepcopy(m).to(ref_dtype)
    from ldm.modules.diffusionmodules.util import GroupNorm32
    for sub in ref_m.modules():
        if isinstance(sub, GroupNorm32):  # it normalises x.float(): fp32 stats, fp64 elsewhere
            sub.float()
    args = [a.to(DEV) for a in inputs]
    if cl:
        m = m.to(memory_format=torch.channels_last)
        args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
    with torch.no_grad():
        want = ref_m(*[a.to(ref_dtype) for a in args])
        with kernels.patched(m, strict=True, fusions=(fusion,), **OTHERS) as h:
            got = m(*args)
    return got, want, h.counts[fusion]


@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("ch,out_ch", [(32, 32), (32, 64)])
def test_conv_bias_resblock(cl, ch, out_ch):
    got, want, c = _fused_vs_reference(lambda: _resblock(ch, out_ch),
                                       [_rand(2, ch, 4, 5, seed=20), _rand(2, 32, seed=21)],
                                       "conv_bias", cl)
    assert c["calls"] == 1 and c["fallbacks"] == 0
    assert_close(got, want, torch.float32, scale=5.0)


@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer(cl, use_linear):
    got, want, c = _fused_vs_reference(lambda: _spatial_transformer(32, 2, use_linear),
                                       [_rand(2, 32, 3, 4, seed=22), _rand(2, 5, 24, seed=23)],
                                       "spatial_transformer", cl, torch.float32)
    assert c["calls"] == 1
    assert got.is_contiguous(memory_format=torch.channels_last) == cl
    assert_close(got, want, torch.float32, scale=5.0)


@pytest.mark.parametrize("fusion,attn_kernel", [("qkv", True), ("qkv", False),
                                               ("add_layer_norm", True)])
def test_transformer_block_fusions(fusion, attn_kernel, monkeypatch):
    from ldm.modules.attention import BasicTransformerBlock
    monkeypatch.setitem(OTHERS, "attention", attn_kernel)  # False: qkv's SDPA path
    got, want, c = _fused_vs_reference(lambda: BasicTransformerBlock(32, 2, 16, context_dim=24),
                                       [_rand(2, 9, 32, seed=24), _rand(2, 5, 24, seed=25)],
                                       fusion, cl=False, ref_dtype=torch.float32)
    assert c["calls"] == 1 and c["sites"] == 1  # attn1 only (attn2 is cross-attention)
    assert_close(got, want, torch.float32, scale=5.0)


def test_ff_residual_transformer_block():
    """add_layer_norm + ff_residual: the feed-forward's output GEMM accumulates in place into
    s + its bias (no add kernel), strict, vs the unpatched block in fp32; ff_residual without
    add_layer_norm installs nothing."""
    from ldm.modules.attention import BasicTransformerBlock
    m = _randomize(BasicTransformerBlock(32, 2, 16, context_dim=24)).to(DEV)
    x, ctx = _rand(2, 9, 32, seed=24), _rand(2, 5, 24, seed=25)
    with torch.no_grad():
        want = m(x, ctx)
        with kernels.patched(m, strict=True, fusions=("add_layer_norm", "ff_residual"),
                             **OTHERS) as h:
            got = m(x, ctx)
        assert h.counts["ff_residual"]["sites"] == 1 and h.counts["ff_residual"]["calls"] == 1
        with kernels.patched(m, fusions=("ff_residual",), **OTHERS) as h:
            assert h.counts["ff_residual"]["sites"] == 0
    assert_close(got, want, torch.float32, scale=5.0)


def test_qkv_weight_cache_follows_the_weights():
    from ldm.modules.attention import CrossAttention, BasicTransformerBlock
    blk = _randomize(BasicTransformerBlock(32, 2, 16, context_dim=24)).to(DEV)
    attn = blk.attn1
    assert isinstance(attn, CrossAttention)
    x = _rand(2, 9, 32, seed=26)
    with torch.no_grad(), kernels.patched(blk, strict=True, fusions=("qkv",), **OTHERS) as h:
        attn(x)
        attn.to_k.weight.mul_(2.0)  # in place: the cached concatenation must be rebuilt
        got = attn(x)
        keys = set(blk.state_dict())
    with torch.no_grad():
        want = attn(x)  # unpatched now
    assert_close(got, want, torch.float32, scale=5.0)
    assert not h._qkv_cache and keys == set(blk.state_dict())  # no cache left, no new keys


def test_conv1x1_bias():
    conv = _randomize(nn.Conv2d(16, 24, 1)).to(DEV)
    x = _rand(2, 16, 5, 5, seed=27)
    with torch.no_grad():
        want = conv.double()(x.double())
        conv.float()
        with kernels.patched(conv, strict=True, fusions=("conv1x1_bias",), **OTHERS) as h:
            got = conv(x.contiguous(memory_format=torch.channels_last))
            nchw = conv(x)  # NCHW: the conv as is, counted, not a failure
    c = h.counts["conv1x1_bias"]
    assert c["calls"] == 1 and c["unfused"] == 1 and c["fallbacks"] == 0
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close(got, want, torch.float32)
    assert_close(nchw, want, torch.float32)


def test_fusion_names_and_default():
    assert set(kernels.DEFAULT_FUSIONS) <= set(kernels.FUSIONS)
    with pytest.raises(ValueError, match="unknown fusions"):
        kernels.patch(nn.Linear(2, 2), fusions=("nope",))
    m = _resblock(32, 32).to(DEV)
    with kernels.patched(m, fusions=()) as h:
        assert "conv_bias" not in h.counts and "forward" not in m.__dict__
    with kernels.patched(m, fusions=None) as h:
        assert h.fusions == tuple(f for f in kernels.FUSIONS if f in kernels.DEFAULT_FUSIONS)
    assert "_forward" not in m.__dict__  # undone


# -- GPU: real shapes, fp16 channels_last, fused vs unfused fast path -----------------------------
GPU_MAPS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]


# -- conv_gemm: small-map 3x3 convolutions as im2col + GEMM ----------------------------------------
@pytest.mark.parametrize("cl", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 1, 0), (1, 1, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_gemm(cl, k, stride, padding, bias):
    from kernels.conv import conv2d_gemm
    x, w = _rand(2, 6, 7, 5, seed=30).double(), _rand(4, 6, k, k, seed=31).double()
    b = _rand(4, seed=32).double() if bias else None
    if cl:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    y = conv2d_gemm(x, w, b, stride, padding)
    want = torch.nn.functional.conv2d(x, w, b, stride, padding)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_conv_bias", [False, True])
@pytest.mark.parametrize("hw,gemm", [(4, True), (5, False)])  # 5² > MAX_HW: cuDNN's case
def test_conv_gemm_resblock_and_downsample(with_conv_bias, hw, gemm):
    """ResBlock (conv1, conv2: the fused ResBlock's bias-free _conv or nn.Conv2d's forward) and a
    stride-2 Downsample to an hw x hw map, strict, vs the unpatched module in fp64; larger maps
    stay on cuDNN."""
    assert (hw * hw <= platform.config("conv_gemm")["MAX_HW"]) == gemm
    from ldm.modules.diffusionmodules.openaimodel import Downsample
    fu = ("conv_bias", "conv_gemm") if with_conv_bias else ("conv_gemm",)
    for make, inputs in ((lambda: _resblock(32, 64), [_rand(2, 32, hw, hw, seed=33), _rand(2, 32, seed=34)]),
                         (lambda: Downsample(32, True, dims=2), [_rand(2, 32, 2 * hw, 2 * hw, seed=35)])):
        m = _randomize(make()).to(DEV)
        ref_m = copy.deepcopy(m).double()
        from ldm.modules.diffusionmodules.util import GroupNorm32
        for sub in ref_m.modules():
            if isinstance(sub, GroupNorm32):
                sub.float()
        m = m.to(memory_format=torch.channels_last)
        args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in inputs]
        with torch.no_grad():
            want = ref_m(*[a.double() for a in inputs])
            with kernels.patched(m, strict=True, fusions=fu, **OTHERS) as h:
                got = m(*args)
        c = h.counts["conv_gemm"]
        assert c["fallbacks"] == 0
        assert (c["calls"] >= 1, c["unfused"] == 0) == (gemm, gemm), c
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_close(got, want, torch.float32, scale=5.0)


# -- geglu_gemm: the feed-forward projection with GEGLU in its epilogue ---------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("m,k,f", [(37, 48, 40), (64, 64, 32), (5, 96, 24)])
def test_geglu_linear(dtype, m, k, f):
    """Ragged M, K and F (not multiples of the blocks) and even ones, against fp64 math; fp16 no
    worse than 2x eager fp16 (F.linear then value · gelu(gate))."""
    from kernels.geglu import geglu_linear
    x, w, b = _rand(m, k, seed=40), _rand(2 * f, k, seed=41) * k ** -0.5, _rand(2 * f, seed=42)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    out = geglu_linear(x.view(1, m, k), w, b)
    v, g = torch.nn.functional.linear(x.double(), w.double(), b.double()).chunk(2, dim=-1)
    want = v * torch.nn.functional.gelu(g)
    ev, eg = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
    assert out.shape == (1, m, f)
    assert_close(out[0], want, dtype, scale=2.0,
                 torch_result=None if dtype == torch.float32 else ev * torch.nn.functional.gelu(eg))


def test_geglu_gemm_feed_forward():
    """FeedForward(glu=True) with the fusion, strict, vs the unpatched module in fp64; NCHW-free
    3-D tokens as the transformer block passes them; a non-contiguous last dim falls back."""
    from ldm.modules.attention import FeedForward
    m = _randomize(FeedForward(24, mult=2, glu=True)).to(DEV)
    x = _rand(2, 9, 24, seed=43)
    with torch.no_grad():
        want = copy.deepcopy(m).double()(x.double())
        with kernels.patched(m, strict=True, fusions=("geglu_gemm",), **OTHERS) as h:
            got = m(x)
        assert h.counts["geglu_gemm"]["calls"] == 1 and h.counts["geglu"]["sites"] == 0
        with kernels.patched(m, fusions=("geglu_gemm",), **OTHERS) as h:
            strided = m(x.transpose(1, 2).contiguous().transpose(1, 2))
        assert h.counts["geglu_gemm"]["reasons"] == {"layout": 1}
    assert_close(got, want, torch.float32, scale=5.0)
    assert_close(strided, want, torch.float32, scale=5.0)


@pytest.mark.parametrize("why", ["wide", "no fp32 dot"])
def test_geglu_gemm_leaves_wide_projections_to_the_gemm_and_geglu_kernel(monkeypatch, why):
    """Above platform's geglu_gemm MAX_K input features, or in fp32 where Triton has no fp32 dot
    (AMD), the projection runs as F.linear + the GEGLU kernel (counted as unfused, and as a geglu
    call), strict: no fallback."""
    from ldm.modules.attention import FeedForward
    m = _randomize(FeedForward(24, mult=2, glu=True)).to(DEV)
    x = _rand(2, 9, 24, seed=44)
    if why == "wide":
        monkeypatch.setitem(platform._table()["geglu_gemm"], "MAX_K", 16)
    else:
        monkeypatch.setattr(platform, "fp32_dot_ok", lambda: False)
    with torch.no_grad():
        want = copy.deepcopy(m).double()(x.double())
        with kernels.patched(m, strict=True, fusions=("geglu_gemm",), **OTHERS) as h:
            got = m(x)
    c = h.counts
    assert c["geglu_gemm"]["calls"] == 0 and c["geglu_gemm"]["unfused"] == 1
    assert c["geglu"]["calls"] == 1 and c["geglu_gemm"]["fallbacks"] == c["geglu"]["fallbacks"] == 0
    assert_close(got, want, torch.float32, scale=5.0)


def _fast_copy(m, dtype):
    from ldm.modules.diffusionmodules.util import GroupNorm32
    m = copy.deepcopy(m).to(dtype)
    for sub in m.modules():
        if isinstance(sub, GroupNorm32):
            sub.float()  # as fast mode keeps them
    return m.to(memory_format=torch.channels_last)


def _gpu_check(make, inputs, fusion):
    """`fusion`: a name, or a tuple of names (the last one's calls are checked)."""
    fusions = fusion if isinstance(fusion, tuple) else (fusion,)
    m = _randomize(make()).to(DEV)
    with torch.no_grad():
        want = m(*[a.to(DEV) for a in inputs])
        args = [a.to(DEV).half() for a in inputs]
        args = [a.contiguous(memory_format=torch.channels_last) if a.dim() == 4 else a for a in args]
        outs = []
        for fu in ((), fusions):
            mm = _fast_copy(m, torch.float16)
            with kernels.patched(mm, strict=True, fusions=fu) as h:
                outs.append(mm(*args))
            if fu:
                assert h.counts[fusions[-1]]["calls"] >= 1
    unfused, fused = outs
    assert_close(fused, want, torch.float16, scale=4.0, torch_result=unfused)


@pytest.mark.gpu
@pytest.mark.parametrize("ch,hw", GPU_MAPS)
def test_gpu_resblock(ch, hw):
    _gpu_check(lambda: _resblock(ch, ch), [torch.randn(2, ch, hw, hw), torch.randn(2, 32)],
               "conv_bias")
    _gpu_check(lambda: _resblock(ch, ch // 2 if ch > 320 else 640),
               [torch.randn(2, ch, hw, hw), torch.randn(2, 32)], "conv_bias")


@pytest.mark.gpu
@pytest.mark.parametrize("ch", [1280, 640])
def test_gpu_conv_gemm(ch):
    """The 4x4 maps of the 256² UNet: fp16 GEMM path vs fp32, no worse than cuDNN's."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample
    _gpu_check(lambda: _resblock(ch, ch), [torch.randn(2, ch, 4, 4), torch.randn(2, 32)],
               "conv_gemm")
    _gpu_check(lambda: _resblock(2 * ch, ch), [torch.randn(2, 2 * ch, 4, 4), torch.randn(2, 32)],
               "conv_gemm")
    _gpu_check(lambda: Downsample(ch, True, dims=2), [torch.randn(2, ch, 8, 8)], "conv_gemm")


@pytest.mark.gpu
@pytest.mark.parametrize("ch,hw", GPU_MAPS)
def test_gpu_geglu_gemm(ch, hw):
    """The feed-forward of each UNet level at its token count (CFG batch 2): fp16 fused vs fp32,
    no worse than cuBLAS + the GEGLU kernel. The kernel at every level, whatever platform's
    MAX_K leaves to cuBLAS (a user may lift it; the compile gate compiles it at every K)."""
    from ldm.modules.attention import FeedForward
    with platform.overriding("geglu_gemm", MAX_K=1 << 30):
        _gpu_check(lambda: FeedForward(ch, glu=True), [torch.randn(2, hw * hw, ch)], "geglu_gemm")


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", ["spatial_transformer", "qkv", "add_layer_norm",
                                    ("add_layer_norm", "ff_residual")])
@pytest.mark.parametrize("ch,hw", GPU_MAPS)
def test_gpu_spatial_transformer(fusion, ch, hw):
    _gpu_check(lambda: _spatial_transformer(ch, 8), [torch.randn(2, ch, hw, hw), torch.randn(2, 77, 24)],
               fusion)


# -- fast mode on the tiny model: every fusion runs, nothing falls back, same eps as unfused -------
def test_fast_mode_tiny_fusions_match_unfused():
    """Fast mode with every fusion vs none: each fusion runs, none falls back, the first
    step's eps agrees (fp32 in the interpreter, fp16 on a GPU)."""
    from types import SimpleNamespace
    from benchmarks.profile_step import _inputs
    from runtime.fast import FastOptions, FastRunner
    from runtime.weights import build_model
    import os
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    model = build_model(os.path.join(os.path.dirname(__file__), "..", "..", "models", "cldm_tiny.yaml"),
                        random_weights=True, device=DEV, seed=0)
    inp = _inputs(SimpleNamespace(device=torch.device(DEV), unet=model.model.diffusion_model), 64, 1)
    eps = {}
    for fu in ((), kernels.FUSIONS):
        r = FastRunner(model, FastOptions(dtype=dtype, channels_last=True, cuda_graph=False,
                                          two_streams=False, fusions=fu))
        try:
            _, info = r.sample(*inp, 1, scale=9.0)
            eps[fu] = info["first_eps"]
            c = r.kernel_handle.counts
        finally:
            r.close()  # a fast runner owns the model until closed
    for f in kernels.FUSIONS:
        assert c[f]["calls"] > 0 and c[f]["fallbacks"] == 0, (f, c[f])
    assert_close(eps[kernels.FUSIONS], eps[()], dtype, scale=5.0)
