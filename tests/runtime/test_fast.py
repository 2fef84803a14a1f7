"""Fast mode (runtime/fast/) against the reference numerics, on the tiny model.

On CPU the fast-mode logic runs in fp32 (FastOptions.for_device("cpu")), so every comparison with
the reference path is tight; the GPU tests compare graph replay with eager and fp16 with fp32.
"""
import logging

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import GroupNorm32, timestep_embedding
from runtime.fast import FastOptions, FastRunner, ddim_schedule, owner
from runtime.fast.graphs import Key, StaticBuffers
from runtime.weights import build_model
from tests.conftest import TINY_CONFIG

# One place for tolerances: fp32 fast logic vs the reference path differs only by SDPA vs einsum
# attention and summation order (measured ~1e-6 relative on the tiny model).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}
B = 2


@pytest.fixture(scope="module")
def model():
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(1)
    hint = (torch.rand(1, 3, 64, 64, generator=g) > 0.8).float()
    ctx = model.get_learned_conditioning(["a house, best quality", "lowres, bad anatomy"])
    ctx_c = ctx[0:1].expand(B, -1, -1).contiguous()
    ctx_u = ctx[1:2].expand(B, -1, -1).contiguous()
    x_T = torch.randn(B, 4, 8, 8, generator=g)
    return hint, ctx_c, ctx_u, x_T


@pytest.fixture
def runner(model):
    """runner(**overrides): a CPU FastRunner on the shared model, closed after the test (a runner
    owns its model until then)."""
    made = []

    def make(**overrides):
        made.append(FastRunner(model, FastOptions.for_device("cpu", **overrides)))
        return made[-1]
    yield make
    for r in made:
        r.close()
    assert owner(model) is None


def guess_scales(strength):
    return [strength * (0.825 ** float(12 - i)) for i in range(13)]


def reference_first_eps(model, hint, ctx_c, ctx_u, x, t, scale, guess, strength):
    """Upstream's p_sample_ddim eps: two separate apply_model calls, e_u + s * (e_c - e_u)."""
    hint_b = hint.expand(x.shape[0], -1, -1, -1)
    model.control_scales = guess_scales(strength) if guess else [strength] * 13
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad():
        e_c = model.apply_model(x, tt, {"c_concat": [hint_b], "c_crossattn": [ctx_c]})
        e_u = model.apply_model(x, tt, {"c_concat": None if guess else [hint_b],
                                        "c_crossattn": [ctx_u]})
    return e_u + scale * (e_c - e_u)


def first_t(model, steps):
    return ddim_schedule(model, steps, 0.0, torch.device("cpu")).timesteps[0]


@pytest.mark.parametrize("guess", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_first_eps_matches_two_separate_calls(model, inputs, runner, guess, batched):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner(batched_cfg=batched)
    _, info = r.sample(hint, ctx_c, ctx_u, x_T, 4, guess_mode=guess, strength=0.7, scale=9.0)
    with r.fp32():
        ref = reference_first_eps(model, hint, ctx_c, ctx_u, x_T, first_t(model, 4), 9.0, guess, 0.7)
    torch.testing.assert_close(info["first_eps"], ref, **TOL[torch.float32])


@pytest.mark.parametrize("guess", [False, True])
def test_only_mid_control_is_honoured(model, inputs, runner, guess):
    """ControlLDM.only_mid_control (only the middle residual reaches the UNet) in the fast step."""
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    model.only_mid_control = True
    try:
        _, info = r.sample(hint, ctx_c, ctx_u, x_T, 4, guess_mode=guess, strength=1.3, scale=9.0)
        with r.fp32():
            ref = reference_first_eps(model, hint, ctx_c, ctx_u, x_T, first_t(model, 4), 9.0,
                                      guess, 1.3)
    finally:
        model.only_mid_control = False
    torch.testing.assert_close(info["first_eps"], ref, **TOL[torch.float32])
    _, info_all = r.sample(hint, ctx_c, ctx_u, x_T, 4, guess_mode=guess, strength=1.3, scale=9.0)
    assert (info_all["first_eps"] - info["first_eps"]).abs().max() > 1e-3  # the option matters
    assert len(r.graph_keys()) == 2                                        # and is in the key


def test_guess_mode_uncond_rows_get_no_control(inputs, runner):
    """Batched guess mode: the uncond half equals the UNet without control, exactly as upstream's
    c_concat=None call (zero residuals added are exact)."""
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    calls = []
    hook = r.control.register_forward_pre_hook(lambda m, a: calls.append(a))
    try:
        r.sample(hint, ctx_c, ctx_u, x_T, 1, guess_mode=True, scale=5.0)
    finally:
        hook.remove()
    assert calls == []  # the fast path calls control_forward, never ControlNet.forward
    cn_rows = []
    h2 = r.control.input_blocks[0].register_forward_hook(lambda m, a, o: cn_rows.append(o.shape[0]))
    un_rows = []
    h3 = r.unet.input_blocks[0].register_forward_hook(lambda m, a, o: un_rows.append(o.shape[0]))
    try:
        r.sample(hint, ctx_c, ctx_u, x_T, 1, guess_mode=True, scale=5.0)
    finally:
        h2.remove()
        h3.remove()
    assert cn_rows == [B] and un_rows == [2 * B]


def test_scale_one_is_a_single_cond_call(model, inputs, runner):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    rows = []
    h = r.unet.out.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    try:
        _, info = r.sample(hint, ctx_c, ctx_u, x_T, 3, scale=1.0)
    finally:
        h.remove()
    assert rows == [B] * 3
    model.control_scales = [1.0] * 13
    with r.fp32(), torch.no_grad():
        ref = model.apply_model(x_T, torch.full((B,), first_t(model, 3)),
                                {"c_concat": [hint.expand(B, -1, -1, -1)], "c_crossattn": [ctx_c]})
    torch.testing.assert_close(info["first_eps"], ref, **TOL[torch.float32])


def test_precomputed_pieces_equal_recomputed(model, inputs, runner):
    hint, ctx_c, _, _ = inputs
    r = runner()
    cn, unet = model.control_model, model.model.diffusion_model
    with torch.no_grad():
        with r.fp32():
            torch.testing.assert_close(r.pre.guided_hint(hint), cn.input_hint_block(hint, None, None),
                                       rtol=0, atol=0)
        ts = [951, 501, 1]
        table = r.pre.time_embeddings(ts, torch.device("cpu"))
        for i, t in enumerate(ts):
            temb = timestep_embedding(torch.tensor([t]), unet.model_channels)
            torch.testing.assert_close(table[i, 0], unet.time_embed(temb)[0], **TOL[torch.float32])
            torch.testing.assert_close(table[i, 1], cn.time_embed(temb)[0], **TOL[torch.float32])
        # Every cached-K/V attn2 forward equals the model's own CrossAttention with the context.
        kv = r.kv.compute(r.unet, ctx_c)
        assert len(kv) == sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
        r.kv.current = kv
        xs = {m: torch.randn(B, 5, m.to_q.in_features) for m in kv}
        fast = {m: m(x) for m, x in xs.items()}                  # patched: reads the cache
        assert r.kernel_handle.counts["cross_kv"]["calls"] == len(kv)
        with r.fp32():                                          # the model's own forward
            for m, x in xs.items():
                torch.testing.assert_close(fast[m], m(x, context=ctx_c), **TOL[torch.float32])
        r.kv.current = None
        with pytest.raises(RuntimeError, match="no cached K/V"):
            next(iter(kv))(xs[next(iter(kv))])


def test_resblock_projections_precomputed(model, inputs, runner):
    """EmbOut.table holds every ResBlock's emb_layers of each timestep's embedding (the model's
    own forward, unpatched), made once per schedule; in a generation every ResBlock reads its row
    from the cache (no fallback), once per step."""
    from kernels._torch_sites import resblock_emb_layers
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    nets = (model.model.diffusion_model, model.control_model)
    layers = [resblock_emb_layers(n) for n in nets]
    ts = [951, 501, 1]
    cpu = torch.device("cpu")
    made = []

    def embeddings(t):
        made.append(t)
        return r.pre.time_embeddings(t, cpu, torch.float32)
    with torch.no_grad():
        table, where = r.embo.table(nets, ts, embeddings, torch.float32, cpu)
        assert r.embo.table(nets, ts, embeddings, torch.float32, cpu)[0] is table and len(made) == 1
        assert list(where) == layers[0] + layers[1] and len(layers[0]) > 0 and len(layers[1]) > 0
        assert table.shape == (len(ts), sum(c for _, c in where.values()))
        emb_table = embeddings(ts)
        with r.fp32():
            for j, ms in enumerate(layers):
                for m in ms:
                    off, c = where[m]
                    torch.testing.assert_close(table[:, off:off + c], m(emb_table[:, j]),
                                               **TOL[torch.float32])
    _, info = r.sample(hint, ctx_c, ctx_u, x_T, 3)
    counts = r.kernel_handle.counts["emb_out"]
    assert counts["sites"] == len(where) and counts["fallbacks"] == 0
    assert counts["calls"] == len(where) * info["steps"]
    assert r.embo.current is None   # nothing left cached for a call outside the step


@pytest.mark.parametrize("precompute", [True, False])
def test_resblock_projections_stay_in_host_memory(model, runner, monkeypatch, precompute):
    """With precompute, the ResBlocks' emb_layers keep their fast copies in host memory (the meta
    device here) and the rest of the UNet and ControlNet is on the device; without it (the step
    runs them) they are on the device too. close() gives the originals back."""
    from kernels._torch_sites import resblock_emb_layers
    from runtime import lowvram
    monkeypatch.setattr(lowvram, "HOST", torch.device("meta"))
    r = runner(precompute=precompute)
    for net in (model.model.diffusion_model, model.control_model):
        emb = {id(p) for m in resblock_emb_layers(net) for p in m.parameters()}
        assert emb and all((p.device.type == "meta") == (precompute and id(p) in emb)
                           for p in net.parameters())
    r.close()
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("guess,eta,scale", [(False, 0.0, 9.0), (True, 0.0, 9.0), (False, 0.5, 4.0)])
def test_fast_sampler_equals_reference_sampler_fp32(inputs, runner, guess, eta, scale):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    torch.manual_seed(123)  # eta > 0: both draw the per-step noise from the global generator
    fast, info = r.sample(hint, ctx_c, ctx_u, x_T, 6, guess_mode=guess, strength=1.3, scale=scale,
                          eta=eta)
    torch.manual_seed(123)
    ref = r.reference_sample(hint, ctx_c, ctx_u, x_T, 6, guess, 1.3, scale, eta)
    assert info["steps"] == 7 and not info["graph"] and not info["nonfinite"]  # S=6 runs 7 steps
    torch.testing.assert_close(fast, ref, **TOL[torch.float32])


def test_schedules_are_made_once_per_steps_and_eta(inputs, runner, monkeypatch):
    """The DDIM schedule (and its time-embedding table) of a (steps, eta) is made on its first
    use only, at most SCHEDULES are kept, and a kept one samples the same latents as a new one."""
    import runtime.fast.pipeline as pipeline
    hint, ctx_c, ctx_u, x_T = inputs
    made = []
    real = pipeline.ddim_schedule
    monkeypatch.setattr(pipeline, "ddim_schedule",
                        lambda *a, **k: (made.append(a[1:3]), real(*a, **k))[1])
    r = runner()
    z1, _ = r.sample(hint, ctx_c, ctx_u, x_T, 3)
    z2, _ = r.sample(hint, ctx_c, ctx_u, x_T, 3)
    assert made == [(3, 0.0)]
    torch.testing.assert_close(z2, z1, rtol=0, atol=0)
    for steps in range(4, 4 + pipeline.SCHEDULES):
        r._schedule(steps, 0.0)
    assert len(r._schedules) == pipeline.SCHEDULES and (3, 0.0) not in r._schedules
    r.sample(hint, ctx_c, ctx_u, x_T, 3)
    assert made[-1] == (3, 0.0) and len(made) == 2 + pipeline.SCHEDULES


def test_text_kv_computed_again_only_for_other_contexts(inputs, runner):
    """A repeated prompt reuses the entry's text K/V; other contexts compute theirs, giving what
    a new runner gives."""
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    calls = []
    real = r.kv.compute
    r.kv.compute = lambda net, ctx: (calls.append(net), real(net, ctx))[1]
    z1, _ = r.sample(hint, ctx_c, ctx_u, x_T, 2)
    assert len(calls) == 2                                  # UNet and ControlNet, one call
    z2, _ = r.sample(hint, ctx_c, ctx_u, x_T, 2)
    assert len(calls) == 2
    torch.testing.assert_close(z2, z1, rtol=0, atol=0)
    other = ctx_u.flip(1)
    z3, _ = r.sample(hint, ctx_c, other, x_T, 2)
    assert len(calls) == 4
    r.close()
    want, _ = runner().sample(hint, ctx_c, other, x_T, 2)
    torch.testing.assert_close(z3, want, rtol=0, atol=0)
    assert not torch.equal(z3, z1)


def test_hint_batch_fills_the_same_entry(inputs, runner):
    """A hint of batch 1 and one of batch B (the same rows) share one graph entry and its buffers
    (the hint is brought to the ControlNet's rows before it is stored), with the same result."""
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner()
    z1, _ = r.sample(hint, ctx_c, ctx_u, x_T, 3)
    g = r.graphs.get(r.graph_keys()[0]).bufs["g"]
    zb, _ = r.sample(hint.expand(B, -1, -1, -1).clone(), ctx_c, ctx_u, x_T, 3)
    assert len(r.graph_keys()) == 1 and r.graphs.get(r.graph_keys()[0]).bufs["g"] is g
    torch.testing.assert_close(zb, z1, **TOL[torch.float32])  # hint block at batch 2 vs 1
    with pytest.raises(ValueError, match="hint batch 3"):
        r.sample(torch.cat([hint] * 3), ctx_c, ctx_u, x_T, 1)


def test_static_buffers_refuse_another_shape():
    bufs = StaticBuffers(Key(8, 8, 2, False, True, False, 77))
    a = bufs.put("g", torch.randn(2, 3))
    assert bufs.put("g", torch.ones(2, 3)) is a and bool((a == 1).all())
    with pytest.raises(RuntimeError, match="'g' holds \\(2, 3\\).*got \\(1, 3\\).*stale memory"):
        bufs.put("g", torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="stale memory"):
        bufs.put("g", torch.ones(2, 3, dtype=torch.float64))


def test_generate_is_reproducible_and_matches_reference_process(model, runner):
    """Same seed -> same images; x_T is drawn exactly as reference mode draws it."""
    r = runner()
    edge = np.zeros((64, 128, 3), np.uint8)
    edge[20:40, 30:90] = 255
    a = r.generate(edge, "a house", "lowres", 2, 4, False, 1.0, 9.0, 7, 0.0)
    b = r.generate(edge, "a house", "lowres", 2, 4, False, 1.0, 9.0, 7, 0.0)
    assert len(a) == 2 and a[0].shape == (64, 128, 3) and a[0].dtype == np.uint8
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # The reference: seed, then x_T = randn((B,4,h,w)) inside the reference sampler.
    from runtime.seed import seed_everything
    hint = torch.from_numpy(edge).float().permute(2, 0, 1)[None] / 255.0
    seed_everything(7)
    x_T = torch.randn(2, 4, 8, 16)
    ctx_c = model.get_learned_conditioning(["a house"] * 2)
    ctx_u = model.get_learned_conditioning(["lowres"] * 2)
    z = r.reference_sample(hint, ctx_c, ctx_u, x_T, 4, False, 1.0, 9.0, 0.0)
    with r.fp32(), torch.no_grad():
        ref = FastRunner.to_uint8(model.decode_first_stage(z))
    for x, y in zip(a, ref):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_decode_graph_needs_a_step_graph(runner):
    """FastOptions.decode_graph only where the step ran as a CUDA graph: on the CPU the decode
    stays eager and the images are those without the option."""
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[10:50, 30] = 255
    first = runner()
    want = first.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    first.close()           # a model has one fast-mode owner at a time
    r = runner(decode_graph=True)
    got = r.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    assert not r.last_info["graph"] and not r.last_info["decode_graph"]
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_nan_in_eps_triggers_fp32_redo(runner, caplog):
    """A non-finite value forced into the fast path (its fp32 hint-block copy, which only fast
    mode uses) makes the generation run again in fp32 on the reference sampler."""
    r = runner()
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[10:50, 30] = 255
    clean = r.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    assert not r.last_info["nonfinite"] and "redone_fp32" not in r.last_info
    hook = r.pre.hint_block.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.fast"):
            out = r.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    finally:
        hook.remove()
    assert r.last_info["nonfinite"] and r.last_info.get("redone_fp32")
    assert any("redoing this generation in fp32" in rec.message for rec in caplog.records)
    assert np.abs(out[0].astype(int) - clean[0].astype(int)).max() <= 1
    assert r.kernel_handle is not None and r.kernel_handle.active  # patched again after the redo


def test_nan_in_vae_decode_falls_back_to_fp32(model, runner, caplog):
    """bf16 VAE (converted in place): a non-finite bf16 decode is decoded again with the original
    fp32 weights, exactly as the untouched model decodes."""
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = model.decode_first_stage(z)
    r = runner(vae_dtype="bf16")
    assert r.vae is model.first_stage_model and r.vae.decoder.conv_in.weight.dtype == torch.bfloat16

    def poison_bf16(m, a, o):  # only the fast dtype's decode goes wrong
        return o * float("nan") if o.dtype == torch.bfloat16 else o
    hook = r.vae.decoder.register_forward_hook(poison_bf16)
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.fast"):
            x = r.decode(z)
    finally:
        hook.remove()
    assert any("decoding in fp32" in rec.message for rec in caplog.records)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert r.vae.decoder.conv_in.weight.dtype == torch.bfloat16  # fast weights back after it


def test_graph_cache_is_bounded(inputs, runner):
    hint, ctx_c, ctx_u, _ = inputs
    r = runner(graph_cache_size=2)
    for h in (8, 16, 8, 24):
        r.sample(torch.ones(1, 3, 8 * h, 64), ctx_c, ctx_u, torch.randn(B, 4, h, 8), 1)
    assert [k.h for k in r.graph_keys()] == [8, 24]   # LRU: 16 went first (8 was used again)


def _nets(model):
    return [model.model.diffusion_model, model.control_model, model.first_stage_model]


def test_one_copy_of_each_network_in_the_fast_dtype(model, inputs, runner):
    """No standing fp32 duplicate: the fast networks are the model's own modules, converted in
    place; fp32 stays only in GroupNorm affines, CLIP, the host copy and the small precompute
    copies (hint block, two time-embedding MLPs)."""
    clip_before = {k: v.clone() for k, v in model.cond_stage_model.state_dict().items()}
    r = runner(dtype="bf16")
    assert [r.unet, r.control, r.vae] == _nets(model)
    for net in _nets(model):
        for mod in net.modules():
            for p in mod.parameters(recurse=False):
                want = torch.float32 if isinstance(mod, GroupNorm32) else torch.bfloat16
                assert p.dtype == want, (type(mod).__name__, p.dtype)
    assert all(v.dtype == torch.float32 for v in model.cond_stage_model.state_dict().values()
               if v.is_floating_point())
    assert all(torch.equal(v, clip_before[k]) for k, v in model.cond_stage_model.state_dict().items())
    small = sum(p.numel() for m in (r.pre.hint_block, r.pre.time_embed_unet, r.pre.time_embed_control)
                for p in m.parameters())
    big = sum(p.numel() for net in _nets(model)[:2] for p in net.parameters())
    assert small < 0.5 * big
    hint, ctx_c, ctx_u, x_T = inputs
    z, _ = r.sample(hint, ctx_c, ctx_u, x_T, 2)
    assert torch.isfinite(z).all()
    # fp32(): the original weights for a while (nested: each brings what the outer did not)
    w_unet, w_vae = r.unet.out[2].weight, r.vae.decoder.conv_in.weight
    fast_unet = w_unet.data_ptr()
    with r.fp32(("vae",)):
        assert w_vae.dtype == torch.float32 and w_unet.dtype == torch.bfloat16
        assert r.kernel_handle is None and "forward" not in r.unet.out[2].__dict__
        with r.fp32():
            assert w_unet.dtype == torch.float32
        assert w_unet.dtype == torch.bfloat16 and w_vae.dtype == torch.float32
    assert w_vae.dtype == torch.bfloat16 and w_unet.data_ptr() == fast_unet  # same memory
    assert r.kernel_handle.active


def test_clip_dtype_follows_an_fp16_dtype_by_default():
    """CLIP in fp16 by default only with fp16 networks (measured there: eps error and PSNR as
    with fp32 CLIP); bf16 or fp32 networks keep it in fp32; an explicit choice stands."""
    assert FastOptions().clip_dtype == torch.float16
    assert FastOptions(dtype="bf16").clip_dtype == torch.float32
    assert FastOptions(dtype="fp32").clip_dtype == torch.float32
    assert FastOptions(clip_dtype="fp32").clip_dtype == torch.float32
    assert FastOptions(dtype="bf16", clip_dtype="fp16").clip_dtype == torch.float16
    assert FastOptions.for_device("cpu").clip_dtype == torch.float32


def test_clip_in_fp16_close_to_fp32_and_unpatched(model, runner):
    """FastOptions.clip_dtype: CLIP's tensors converted in place (LayerNorms too: their statistics
    are fp32 in the model code, as is the softmax), its forwards untouched, its context within
    fp16 rounding of the fp32 one and handed on in fp32; the prompt cache keeps the two apart;
    fp32() brings CLIP's originals back for reference-mode work."""
    texts = ["a house, best quality", "lowres, bad anatomy"]
    clip = model.cond_stage_model
    with torch.no_grad():
        want = clip(texts)
    r = runner(clip_dtype="fp16")
    assert r.nets.clip is clip
    assert all(t.dtype == torch.float16 for t in clip.state_dict().values() if t.is_floating_point())
    assert not any("forward" in m.__dict__ for m in clip.modules())
    got = r.encode(texts)
    assert got.dtype == torch.float16 and r.prompts.misses == 1
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert 0 < rel < 5e-3, rel
    weight = clip.transformer.text_model.final_layer_norm.weight
    fast_ptr = weight.data_ptr()
    with r.nets.fp32():
        assert weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(clip(texts), want)
        r.encode(texts)                     # a miss: the fp32 encoder is another key
        assert r.prompts.misses == 2
    assert weight.dtype == torch.float16 and weight.data_ptr() == fast_ptr
    images = r.generate(np.zeros((64, 64, 3), np.uint8), *texts, 1, 2, False, 1.0, 9.0, 3, 0.0)
    assert r.prompts.hits == 1 and len(images) == 1


def test_vae_encoder_stays_in_host_memory(model, runner, monkeypatch):
    """Fast mode never encodes an image: the VAE encoder's fast copy is made in host memory, not
    on the device (host memory is the meta device here, so a stray use would fail), the
    decoder's on the device; fp32() and close() bring the originals back to the device."""
    from runtime import lowvram
    before = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    monkeypatch.setattr(lowvram, "HOST", torch.device("meta"))
    r = runner(dtype="bf16", precompute=False)   # with it the emb_layers' host copies are used
    vae = model.first_stage_model
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16
               for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    assert all(p.device.type == "cpu" for m in (vae.decoder, vae.post_quant_conv)
               for p in m.parameters())
    images = r.generate(np.zeros((64, 64, 3), np.uint8), "a house", "lowres", 1, 2, False, 1.0,
                        9.0, 3, 0.0)
    assert images[0].shape == (64, 64, 3)
    with r.fp32(("vae",)):
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())
    assert vae.encoder.conv_in.weight.device.type == "meta"
    r.close()
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_vae_channels_last_decodes_the_same_images(model, runner):
    """FastOptions.vae_channels_last: the VAE's weights and its input in NHWC; the decode is the
    NCHW decode's up to the convolutions' summation order (fp32 on the CPU)."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    first = runner()
    nchw = first.decode(z)
    first.close()
    runner_nhwc = runner(vae_channels_last=True)   # off on the CPU by default
    conv = next(m for m in runner_nhwc.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(runner_nhwc.decode(z), nchw, rtol=1e-4, atol=1e-4)


def test_close_gives_the_model_back_exactly(model, inputs, runner):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = runner(dtype="bf16", channels_last=True, clip_dtype="fp16")
    with pytest.raises(RuntimeError, match="already in fast mode"):
        FastRunner(model, FastOptions.for_device("cpu"))
    r.sample(*inputs, 2)
    r.close()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               and after[k].is_contiguous() for k in before)
    assert not any("forward" in m.__dict__ or "_forward" in m.__dict__ for m in model.modules())
    assert owner(model) is None
    with pytest.raises(RuntimeError, match="closed"):
        r.sample(*inputs, 1)


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_model():
    return build_model(TINY_CONFIG, random_weights=True, seed=0, device="cuda")


def gpu_inputs(model, batch=2):
    g = torch.Generator(device="cuda").manual_seed(3)
    hint = (torch.rand(1, 3, 128, 64, generator=g, device="cuda") > 0.8).float()
    ctx = model.get_learned_conditioning(["a house", "lowres"])
    return (hint, ctx[0:1].expand(batch, -1, -1).contiguous(),
            ctx[1:2].expand(batch, -1, -1).contiguous(),
            torch.randn(batch, 4, 16, 8, generator=g, device="cuda"))


def gpu_sample(model, options, *args, **kwargs):
    """FastRunner(model, options).sample(*args), closed after (it owns the model meanwhile)."""
    r = FastRunner(model, options)
    try:
        return r.sample(*args, **kwargs)
    finally:
        r.close()


@pytest.mark.gpu
@pytest.mark.parametrize("guess", [False, True])
def test_graph_replay_equals_eager(gpu_model, guess):
    args = gpu_inputs(gpu_model)
    z_e, _ = gpu_sample(gpu_model, FastOptions(cuda_graph=False), *args, 5, guess_mode=guess)
    r = FastRunner(gpu_model, FastOptions(cuda_graph=True))
    try:
        z_g, info = r.sample(*args, 5, guess_mode=guess)
        assert info["graph"], info["capture_error"]
        z_g2, _ = r.sample(*args, 5, guess_mode=guess)  # replay of the cache
    finally:
        r.close()
    torch.testing.assert_close(z_g, z_e, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(z_g2, z_g, rtol=0, atol=0)


def test_one_stream_per_device_and_role(monkeypatch):
    """graphs.stream makes each (device, role) stream once: a new CUDA stream would get a cuBLAS
    workspace of its own, held for the life of the process."""
    from runtime.fast import graphs
    made = []
    monkeypatch.setattr(graphs, "_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    side = graphs.stream("cuda:0", "side")
    assert graphs.stream(torch.device("cuda", 0), "side") is side
    assert graphs.stream("cuda:0", "capture") is not side
    assert graphs.stream("cuda:1", "side") is not side
    assert made == [torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.gpu
def test_pipelines_made_and_closed_in_turn_hold_no_more_memory(gpu_model):
    """Three fast runners, one after the other, each capturing two graph shapes: after each is
    closed the process holds what it held after the first (each used to leave the cuBLAS
    workspaces of its new streams behind)."""
    held = []
    for _ in range(3):
        r = FastRunner(gpu_model, FastOptions())
        try:
            for batch in (2, 1):
                _, info = r.sample(*gpu_inputs(gpu_model, batch), 2)
                assert info["graph"], info["capture_error"]
        finally:
            r.close()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held.append(torch.cuda.memory_allocated())
    assert held[2] <= held[0] + 2**20 and held[1] <= held[0] + 2**20, held


@pytest.mark.gpu
def test_graph_replay_after_the_hint_batch_changes(gpu_model):
    """Captured with a hint of batch 1, replayed with a hint of batch B whose rows differ (the
    bug: the hint buffer was reallocated after capture and the graph read freed memory)."""
    hint, ctx_c, ctx_u, x_T = gpu_inputs(gpu_model)
    hint_b = torch.cat([hint, hint.flip(-1)])
    z_e, _ = gpu_sample(gpu_model, FastOptions(cuda_graph=False), hint_b, ctx_c, ctx_u, x_T, 5)
    r = FastRunner(gpu_model, FastOptions(cuda_graph=True))
    try:
        _, info = r.sample(hint, ctx_c, ctx_u, x_T, 5)
        assert info["graph"], info["capture_error"]
        z_g, info = r.sample(hint_b, ctx_c, ctx_u, x_T, 5)
        assert info["graph"] and len(r.graph_keys()) == 1
    finally:
        r.close()
    torch.testing.assert_close(z_g, z_e, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_vae_channels_last_on_the_gpu_decodes_the_same_images(gpu_model):
    """fp16 with the Triton GroupNorm kernels in NHWC against the NCHW decode; no patched site
    falls back to torch."""
    z = torch.randn(2, 4, 16, 8, generator=torch.Generator(device="cuda").manual_seed(5),
                    device="cuda")
    images = []
    for cl in (False, True):
        r = FastRunner(gpu_model, FastOptions(vae_channels_last=cl))
        try:
            images.append(r.decode(z))
            counts = r.kernel_handle.counts
            assert counts["group_norm"]["calls"] > 0, counts
            assert all(c.get("fallbacks", 0) == 0 for c in counts.values()), counts
        finally:
            r.close()
    torch.testing.assert_close(images[1], images[0], rtol=2e-2, atol=2e-2)


def gpu_edge():
    edge = np.zeros((128, 64, 3), np.uint8)
    edge[20:100, 30] = 255
    edge[60, 10:50] = 255
    return edge


@pytest.mark.gpu
def test_decode_graph_gives_the_eager_decode_images(gpu_model):
    """FastOptions.decode_graph: the decode replayed from a graph captured into the step graph's
    memory pool gives the eager decode's images, request after request (the step's replays in
    between reuse that pool), and two batch sizes keep their own graphs."""
    got = {}
    for on in (False, True):
        r = FastRunner(gpu_model, FastOptions(decode_graph=on))
        try:
            got[on] = []
            for n, seed in ((2, 1), (2, 2), (1, 1), (2, 1)):
                got[on].append(r.generate(gpu_edge(), "a house", "lowres", n, 4, False, 1.0, 9.0,
                                          seed, 0.0))
                assert r.last_info["graph"] and r.last_info["decode_graph"] == on, r.last_info
        finally:
            r.close()
    for eager, graphed in zip(got[False], got[True]):
        for x, y in zip(eager, graphed):
            assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
    for x, y in zip(got[True][0], got[True][3]):   # a replay after other requests: the same
        np.testing.assert_array_equal(x, y)


@pytest.mark.gpu
def test_decode_graph_non_finite_images_decode_again(gpu_model, caplog):
    """A non-finite fp16 decode in the graph falls through to the eager decode, whose fp32
    fallback gives the images of an untouched decode."""
    r = FastRunner(gpu_model, FastOptions(decode_graph=True))
    try:
        clean = r.generate(gpu_edge(), "a", "b", 1, 4, False, 1.0, 9.0, 3, 0.0)
        assert r.last_info["decode_graph"]
        r.graphs.clear()            # the poison below must be in the next capture

        def poison_fp16(m, a, o):
            return o * float("nan") if o.dtype == torch.float16 else o
        hook = r.vae.decoder.register_forward_hook(poison_fp16)
        try:
            with caplog.at_level(logging.WARNING, logger="runtime.fast"):
                out = r.generate(gpu_edge(), "a", "b", 1, 4, False, 1.0, 9.0, 3, 0.0)
        finally:
            hook.remove()
    finally:
        r.close()
    assert not r.last_info["decode_graph"]
    assert any("decoding in fp32" in rec.message for rec in caplog.records)
    assert np.abs(out[0].astype(int) - clean[0].astype(int)).max() <= 2


@pytest.mark.gpu
def test_fp16_fast_close_to_fp32_reference(gpu_model):
    hint, ctx_c, ctx_u, x_T = gpu_inputs(gpu_model)
    nets_fp32 = sum(p.numel() * 4 for net in _nets(gpu_model) for p in net.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    r = FastRunner(gpu_model)
    try:
        # The networks are converted in place: what they hold on the device now is their fp16
        # size plus the small fp32 precompute copies, no standing fp32 duplicate.
        small = sum(p.numel() * 4 for m in (r.pre.hint_block, r.pre.time_embed_unet,
                                            r.pre.time_embed_control) for p in m.parameters())
        held = torch.cuda.memory_allocated() - (before - nets_fp32)
        assert held <= 0.5 * nets_fp32 + small + 2 ** 20, (held, nets_fp32, small)
        z, info = r.sample(hint, ctx_c, ctx_u, x_T, 5)
        ref = r.reference_sample(hint, ctx_c, ctx_u, x_T, 5, False, 1.0, 9.0, 0.0)
    finally:
        r.close()
    rel = ((z - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


def test_canny2image_fast_mode_matches_reference_mode(model):
    """Fast and reference mode on one model object: reference mode's results do not change while
    a fast-mode pipeline owns the model, nor after it is closed."""
    from runtime.canny2image import Canny2Image
    from runtime.sample import sample_image

    args = (sample_image(128, 96), "a house", "best quality", "lowres", 2, 64, 3, False, 1.0, 9.0,
            11, 0.0, 100, 200)
    reference = Canny2Image(model, mode="reference")
    ref = reference.process(*args)
    steps = []
    pipe = Canny2Image(model, mode="fast", options=FastOptions.for_device(
        "cpu", dtype="bf16", vae_dtype="fp32", clip_dtype="fp16"))
    try:
        fast = pipe.process(*args, progress=lambda d, n: steps.append((d, n)))
        during = reference.process(*args)
    finally:
        pipe.close()
    after = reference.process(*args)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert len(fast) == len(ref) == 3
    np.testing.assert_array_equal(fast[0], ref[0])
    for a, b in zip(during + after, ref + ref):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fast[1:], ref[1:]):  # bf16 UNet/ControlNet on the tiny model
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 8
