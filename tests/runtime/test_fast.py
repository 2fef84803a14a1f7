"""Fast mode (runtime/fast.py) against the reference numerics, on the tiny model.

On CPU the fast-mode logic runs in fp32 (FastOptions.for_device("cpu")), so every comparison with
the reference path is tight; the GPU tests compare graph replay with eager and fp16 with fp32.
"""
import logging

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import timestep_embedding
from runtime.fast import FastOptions, FastRunner, ddim_schedule
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


def runner(model, **overrides):
    return FastRunner(model, FastOptions.for_device("cpu", **overrides))


def guess_scales(strength):
    return [strength * (0.825 ** float(12 - i)) for i in range(13)]


def reference_first_eps(model, hint, ctx_c, ctx_u, x, t, scale, guess, strength):
    """Upstream's p_sample_ddim eps: two separate apply_model calls, e_u + s * (e_c - e_u)."""
    hint_b = hint.expand(x.shape[0], -1, -1, -1)
    model.control_scales = guess_scales(strength) if guess else [strength] * 13
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    e_c = model.apply_model(x, tt, {"c_concat": [hint_b], "c_crossattn": [ctx_c]})
    e_u = model.apply_model(x, tt, {"c_concat": None if guess else [hint_b], "c_crossattn": [ctx_u]})
    return e_u + scale * (e_c - e_u)


@pytest.mark.parametrize("guess", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_first_eps_matches_two_separate_calls(model, inputs, guess, batched):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner(model, batched_cfg=batched)
    _, info = r.sample(hint, ctx_c, ctx_u, x_T, 4, guess_mode=guess, strength=0.7, scale=9.0)
    t0 = ddim_schedule(model, 4, 0.0, torch.device("cpu")).timesteps[0]
    with torch.no_grad():
        ref = reference_first_eps(model, hint, ctx_c, ctx_u, x_T, t0, 9.0, guess, 0.7)
    torch.testing.assert_close(info["first_eps"], ref, **TOL[torch.float32])


def test_guess_mode_uncond_rows_get_no_control(model, inputs):
    """Batched guess mode: the uncond half equals the UNet without control, exactly as upstream's
    c_concat=None call (zero residuals added are exact)."""
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner(model)
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


def test_scale_one_is_a_single_cond_call(model, inputs):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner(model)
    rows = []
    h = r.unet.out.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    try:
        _, info = r.sample(hint, ctx_c, ctx_u, x_T, 3, scale=1.0)
    finally:
        h.remove()
    assert rows == [B] * 3
    model.control_scales = [1.0] * 13
    t0 = ddim_schedule(model, 3, 0.0, torch.device("cpu")).timesteps[0]
    with torch.no_grad():
        ref = model.apply_model(x_T, torch.full((B,), t0), {"c_concat": [hint.expand(B, -1, -1, -1)],
                                                            "c_crossattn": [ctx_c]})
    torch.testing.assert_close(info["first_eps"], ref, **TOL[torch.float32])


def test_precomputed_pieces_equal_recomputed(model, inputs):
    hint, ctx_c, _, _ = inputs
    r = runner(model)
    cn, unet = model.control_model, model.model.diffusion_model
    with torch.no_grad():
        torch.testing.assert_close(r.guided_hint(hint), cn.input_hint_block(hint, None, None),
                                   rtol=0, atol=0)
        ts = [951, 501, 1]
        table = r.time_embeddings(ts)
        for i, t in enumerate(ts):
            temb = timestep_embedding(torch.tensor([t]), unet.model_channels)
            torch.testing.assert_close(table[i, 0], unet.time_embed(temb)[0], **TOL[torch.float32])
            torch.testing.assert_close(table[i, 1], cn.time_embed(temb)[0], **TOL[torch.float32])
        # Every cached-K/V attn2 forward equals the model's own CrossAttention with the context.
        kv = r.cross_kv(r.unet, ctx_c)
        assert len(kv) == sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
        r._kv_current = kv
        own = dict(zip(kv, [blk.attn2 for blk in unet.modules() if hasattr(blk, "attn2")]))
        for m_fast, m_ref in own.items():
            x = torch.randn(B, 5, m_fast.to_q.in_features)
            torch.testing.assert_close(m_fast(x), m_ref(x, context=ctx_c), **TOL[torch.float32])


@pytest.mark.parametrize("guess,eta,scale", [(False, 0.0, 9.0), (True, 0.0, 9.0), (False, 0.5, 4.0)])
def test_fast_sampler_equals_reference_sampler_fp32(model, inputs, guess, eta, scale):
    hint, ctx_c, ctx_u, x_T = inputs
    r = runner(model)
    torch.manual_seed(123)  # eta > 0: both draw the per-step noise from the global generator
    fast, info = r.sample(hint, ctx_c, ctx_u, x_T, 6, guess_mode=guess, strength=1.3, scale=scale,
                          eta=eta)
    torch.manual_seed(123)
    ref = r.reference_sample(hint.expand(B, -1, -1, -1), ctx_c, ctx_u, x_T, 6, guess, 1.3, scale, eta)
    assert info["steps"] == 7 and not info["graph"] and not info["nonfinite"]  # S=6 runs 7 steps
    torch.testing.assert_close(fast, ref, **TOL[torch.float32])


def test_generate_is_reproducible_and_matches_reference_process(model):
    """Same seed -> same images; x_T is drawn exactly as reference mode draws it."""
    r = runner(model)
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
    with torch.no_grad():
        z = r.reference_sample(hint.expand(2, -1, -1, -1), ctx_c, ctx_u, x_T, 4, False, 1.0, 9.0, 0.0)
        ref = FastRunner.to_uint8(model.decode_first_stage(z))
    for x, y in zip(a, ref):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_nan_in_eps_triggers_fp32_redo(model, caplog):
    r = runner(model)
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[10:50, 30] = 255
    clean = r.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    hook = r.unet.out.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.fast"):
            out = r.generate(edge, "a", "b", 1, 3, False, 1.0, 9.0, 3, 0.0)
    finally:
        hook.remove()
    assert r.last_info["nonfinite"] and r.last_info.get("redone_fp32")
    assert any("redoing this generation in fp32" in rec.message for rec in caplog.records)
    assert np.abs(out[0].astype(int) - clean[0].astype(int)).max() <= 1


def test_nan_in_vae_decode_falls_back_to_fp32(model, caplog):
    r = runner(model)
    z = torch.randn(1, 4, 8, 8)
    hook = r.vae.decoder.register_forward_hook(lambda m, a, o: o * float("nan"))
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.fast"):
            x = r.decode(z)
    finally:
        hook.remove()
    assert torch.isfinite(x).all()
    assert any("decoding in fp32" in rec.message for rec in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(x, model.decode_first_stage(z), rtol=0, atol=0)


def test_graph_cache_is_bounded(model, inputs):
    hint, ctx_c, ctx_u, _ = inputs
    r = runner(model, graph_cache_size=2)
    for h in (8, 16, 8, 24):
        r.sample(torch.ones(1, 3, 8 * h, 64), ctx_c, ctx_u, torch.randn(B, 4, h, 8), 1)
    assert [k[0] for k in r._graphs] == [8, 24]   # LRU: 16 went first (8 was used again)


def test_caller_model_is_untouched(model, inputs):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = FastRunner(model, FastOptions(dtype="bf16", cuda_graph=False, kernels=False,
                                      channels_last=False, two_streams=False))
    hint, ctx_c, ctx_u, x_T = inputs
    r.sample(hint, ctx_c, ctx_u, x_T, 2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not any("forward" in m.__dict__ for m in model.modules())


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


@pytest.mark.gpu
@pytest.mark.parametrize("guess", [False, True])
def test_graph_replay_equals_eager(gpu_model, guess):
    hint, ctx_c, ctx_u, x_T = gpu_inputs(gpu_model)
    eager = FastRunner(gpu_model, FastOptions(cuda_graph=False))
    graph = FastRunner(gpu_model, FastOptions(cuda_graph=True))
    z_e, _ = eager.sample(hint, ctx_c, ctx_u, x_T, 5, guess_mode=guess)
    z_g, info = graph.sample(hint, ctx_c, ctx_u, x_T, 5, guess_mode=guess)
    assert info["graph"], info["capture_error"]
    z_g2, _ = graph.sample(hint, ctx_c, ctx_u, x_T, 5, guess_mode=guess)  # replay of the cache
    torch.testing.assert_close(z_g, z_e, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(z_g2, z_g, rtol=0, atol=0)


@pytest.mark.gpu
def test_fp16_fast_close_to_fp32_reference(gpu_model):
    hint, ctx_c, ctx_u, x_T = gpu_inputs(gpu_model)
    r = FastRunner(gpu_model)
    z, info = r.sample(hint, ctx_c, ctx_u, x_T, 5)
    ref = r.reference_sample(hint.expand(2, -1, -1, -1), ctx_c, ctx_u, x_T, 5, False, 1.0, 9.0, 0.0)
    rel = ((z - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


def test_canny2image_fast_mode_matches_reference_mode(model):
    from runtime.canny2image import Canny2Image
    from runtime.sample import sample_image

    args = (sample_image(128, 96), "a house", "best quality", "lowres", 2, 64, 3, False, 1.0, 9.0,
            11, 0.0, 100, 200)
    steps = []
    fast = Canny2Image(model, mode="fast").process(*args, progress=lambda d, n: steps.append((d, n)))
    ref = Canny2Image(model, mode="reference").process(*args)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert len(fast) == len(ref) == 3
    np.testing.assert_array_equal(fast[0], ref[0])
    for a, b in zip(fast[1:], ref[1:]):
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
