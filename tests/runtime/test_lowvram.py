"""Low-VRAM mode (upstream's config.save_memory): sliced attention, ControlLDM.low_vram_shift's
placement, where process() shifts, and reference results identical to those without it."""
import gc

import numpy as np
import pytest
import torch
from torch import nn

import config
from cldm.cldm import ControlLDM
from cldm.hack import disable_sliced_attention, sliced_attention_enabled, sliced_attention_forward
from ldm.modules.attention import CrossAttention
from runtime import lowvram
from runtime.canny2image import Canny2Image
from tests.conftest import TINY_CONFIG

FAKE_GPU = torch.device("meta")     # a device the recorders below name but never compute on


@pytest.fixture
def save_memory():
    """config.save_memory on (sliced attention included) for one test, then off again."""
    assert not config.save_memory and not sliced_attention_enabled()
    try:
        assert lowvram.configure(low_vram=True)
        yield
    finally:
        config.save_memory = False
        disable_sliced_attention()


class Recorder(nn.Module):
    """Stands in for a network: `.to(device)` records the device and moves nothing."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name, self.where = log, name, None

    def to(self, device):
        self.where = torch.device(device)
        self.log.append((self.name, self.where))
        return self


class FakeLDM(nn.Module):
    """The four networks of a ControlLDM as recorders, its schedule buffer on FAKE_GPU."""
    low_vram_shift = ControlLDM.low_vram_shift
    device = ControlLDM.device

    def __init__(self):
        super().__init__()
        self.log = []
        for name in ("model", "first_stage_model", "cond_stage_model", "control_model"):
            setattr(self, name, Recorder(self.log, name))
        self.register_buffer("betas", torch.zeros(3))

    def placement(self):
        return {name: child.where for name, child in self.named_children()}


def test_low_vram_shift_places_networks_like_upstream():
    m = FakeLDM().to_empty(device=FAKE_GPU)
    assert m.device == FAKE_GPU
    m.low_vram_shift(is_diffusing=True)
    cpu = torch.device("cpu")
    assert m.placement() == {"model": FAKE_GPU, "control_model": FAKE_GPU,
                             "first_stage_model": cpu, "cond_stage_model": cpu}
    m.low_vram_shift(is_diffusing=False)
    assert m.placement() == {"model": cpu, "control_model": cpu,
                             "first_stage_model": FAKE_GPU, "cond_stage_model": FAKE_GPU}
    assert m.device == FAKE_GPU              # the schedule (noise, inputs) never moves
    assert len(m.log) == 8


def test_place_builds_into_the_not_diffusing_placement(save_memory):
    m = lowvram.place(FakeLDM(), FAKE_GPU)
    assert m.betas.device == FAKE_GPU
    assert m.placement() == {"model": torch.device("cpu"), "control_model": torch.device("cpu"),
                             "first_stage_model": FAKE_GPU, "cond_stage_model": FAKE_GPU}


def test_resident_moves_only_under_save_memory(save_memory):
    log = []
    net = Recorder(log, "vae")
    with lowvram.resident(net, FAKE_GPU) as inside:
        assert inside is net and net.where == FAKE_GPU
    assert log == [("vae", FAKE_GPU), ("vae", torch.device("cpu"))]
    config.save_memory = False
    with lowvram.resident(net, FAKE_GPU):
        pass
    assert len(log) == 2


def test_resident_keeps_the_device_memory_in_the_caching_allocator(save_memory, monkeypatch):
    """No empty_cache() after a phase: the memory a decode or CLIP used (the parked ControlNet's)
    stays cached for the ControlNet's return at the same address."""
    def release():
        raise AssertionError("resident() gave the cached device memory back to the driver")
    monkeypatch.setattr(torch.cuda, "empty_cache", release)
    log = []
    with lowvram.resident((Recorder(log, "post_quant_conv"), Recorder(log, "decoder")),
                          torch.device("cuda", 0)):
        pass
    assert [d.type for _, d in log] == ["cuda", "cuda", "cpu", "cpu"]


def test_sliced_attention_matches_fp64_and_is_used(save_memory):
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=24, context_dim=16, heads=3, dim_head=8).eval()
    x, ctx = torch.randn(2, 37, 24), torch.randn(2, 11, 16)
    assert type(attn).forward is sliced_attention_forward
    with torch.no_grad():
        out = attn(x, ctx)
        a64 = attn.double()
        q, k, v = (a64._split_heads(f(t)) for f, t in
                   ((a64.to_q, x.double()), (a64.to_k, ctx.double()), (a64.to_v, ctx.double())))
        ref = a64.to_out(a64._merge_heads(((q @ k.transpose(1, 2)) * a64.scale).softmax(-1) @ v))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# --- the whole reference pipeline on the tiny model ----------------------------------------

@pytest.fixture(scope="module")
def model():
    from runtime.weights import build_model
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    img = np.full((70, 130, 3), 20, np.uint8)
    img[10:60, 20:110] = rng.integers(120, 256, size=(50, 90, 3), dtype=np.uint8)
    return img


PARAMS = dict(prompt="a box", a_prompt="best quality", n_prompt="lowres", num_samples=2,
              image_resolution=128, ddim_steps=2, guess_mode=False, strength=1.0, scale=9.0,
              seed=77, eta=0.0, low_threshold=100, high_threshold=200)


def test_reference_under_low_vram_is_bit_identical(model, image, save_memory):
    config.save_memory = False
    disable_sliced_attention()
    plain = Canny2Image(model).process(image, **PARAMS)
    lowvram.configure(low_vram=True)
    calls = []
    real = CrossAttention.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    CrossAttention.forward = counting
    try:
        low = Canny2Image(model).process(image, **PARAMS)
    finally:
        CrossAttention.forward = real
    assert real is sliced_attention_forward and calls      # the sliced path really ran
    assert len(plain) == len(low) == 3
    for a, b in zip(plain, low):
        np.testing.assert_array_equal(a, b)


def test_process_shifts_where_upstream_does(model, image, save_memory):
    events = []
    shift, encode = model.low_vram_shift, model.get_learned_conditioning
    apply, decode = model.apply_model, model.decode_first_stage
    model.low_vram_shift = lambda is_diffusing: (events.append(("shift", is_diffusing)),
                                                 shift(is_diffusing))[1]
    model.get_learned_conditioning = lambda c: (events.append("clip"), encode(c))[1]
    model.apply_model = lambda *a, **k: (events.append("unet"), apply(*a, **k))[1]
    model.decode_first_stage = lambda z: (events.append("vae"), decode(z))[1]
    try:
        Canny2Image(model).process(image, **dict(PARAMS, ddim_steps=1))
        config.save_memory = False
        Canny2Image(model).process(image, **dict(PARAMS, ddim_steps=1))
    finally:
        for name in ("low_vram_shift", "get_learned_conditioning", "apply_model",
                     "decode_first_stage"):
            delattr(model, name)
    with_shifts = [("shift", False), "clip", "clip", ("shift", True), "unet", "unet",
                   ("shift", False), "vae"]
    assert events == with_shifts + ["clip", "clip", "unet", "unet", "vae"]


@pytest.mark.gpu
def test_on_a_gpu_the_shifts_move_the_networks_and_change_no_bit(image, save_memory):
    """Real moves between host and GPU: placement after each shift, and the images of low-VRAM
    mode equal those of sliced attention without shifting (the shifts are numerically neutral);
    sliced vs unsliced attention agree closely (a BLAS may order a single matrix differently)."""
    from runtime.weights import build_model
    gpu = torch.device("cuda")
    model = build_model(TINY_CONFIG, random_weights=True, seed=0, device="cuda")

    def devices():
        return {name: {p.device.type for p in child.parameters()}
                for name, child in model.named_children()}
    assert devices() == {"model": {"cpu"}, "control_model": {"cpu"},
                         "first_stage_model": {"cuda"}, "cond_stage_model": {"cuda"}}
    model.low_vram_shift(is_diffusing=True)
    assert devices() == {"model": {"cuda"}, "control_model": {"cuda"},
                         "first_stage_model": {"cpu"}, "cond_stage_model": {"cpu"}}
    assert model.device == model.betas.device and model.betas.device.type == gpu.type
    low = Canny2Image(model).process(image, **PARAMS)
    assert devices()["first_stage_model"] == {"cuda"} and devices()["model"] == {"cpu"}

    config.save_memory = False                  # sliced attention stays on: no shifts only
    model.to(gpu)
    sliced = Canny2Image(model).process(image, **PARAMS)
    for a, b in zip(low, sliced):
        np.testing.assert_array_equal(a, b)
    disable_sliced_attention()
    plain = Canny2Image(model).process(image, **PARAMS)
    for a, b in zip(plain[1:], sliced[1:]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_share_switches_on_sliced_attention_only_under_save_memory():
    import importlib

    import share
    try:
        importlib.reload(share)
        assert not sliced_attention_enabled()
        config.save_memory = True
        importlib.reload(share)                 # upstream's import-time switch
        assert sliced_attention_enabled()
    finally:
        config.save_memory = False
        disable_sliced_attention()


# --- fast mode under low-VRAM -------------------------------------------------------------

HOST_MARK = torch.device("cpu", 0)   # lowvram.HOST in these tests: host memory, told apart from
                                     # the model's device (cpu, no index) by the recorders


def _record(model, events):
    """Record every device move of the four networks and their forwards, in `events`; returns
    an undo."""
    vae = model.first_stage_model
    # (name, module): fast mode's decode moves the VAE's decoding parts only (not its encoder),
    # close() the whole VAE; a decode's two moves fold into one event (_squeeze)
    nets = [("unet", model.model.diffusion_model), ("control", model.control_model),
            ("vae", vae), ("vae decoding", vae.post_quant_conv), ("vae decoding", vae.decoder),
            ("clip", model.cond_stage_model)]
    hooks = [model.cond_stage_model.transformer.register_forward_pre_hook(
                 lambda m, a: events.append(("run", "clip"))),
             model.first_stage_model.decoder.register_forward_pre_hook(
                 lambda m, a: events.append(("run", "vae"))),
             model.model.diffusion_model.out.register_forward_pre_hook(
                 lambda m, a: events.append(("run", "diffusion"))),
             model.control_model.middle_block_out.register_forward_pre_hook(
                 lambda m, a: events.append(("run", "diffusion")))]
    for name, net in nets:
        real = net.to

        def to(*args, _name=name, _real=real, **kwargs):
            where = args[0] if args and not isinstance(args[0], torch.dtype) else \
                kwargs.get("device")
            if where is not None:
                events.append(("to", _name, torch.device(where)))
            return _real(*args, **kwargs)
        net.__dict__["to"] = to

    def undo():
        for h in hooks:
            h.remove()
        for _, net in nets:
            net.__dict__.pop("to", None)
    return undo


def _squeeze(events):
    """Consecutive repeats folded (the diffusion's many UNet/ControlNet forwards: one entry)."""
    return [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]


def test_fast_mode_under_low_vram_same_images_networks_in_place(model, image, save_memory,
                                                               monkeypatch):
    """Fast mode (bf16 on the CPU: the in-place conversion runs) under low-VRAM mode: the very
    same images as without it; the fast UNet and ControlNet go to the device once and never
    move while it runs; CLIP comes to the device only to encode a prompt the cache has not seen,
    the VAE only to decode; close() gives back build_model's low-VRAM placement and weights."""
    from runtime.fast import FastOptions
    config.save_memory = False
    disable_sliced_attention()
    options = FastOptions.for_device("cpu", dtype="bf16", clip_dtype="fp16")
    pipe = Canny2Image(model, mode="fast", options=options)
    try:
        plain = pipe.process(image, **PARAMS)
    finally:
        pipe.close()

    lowvram.configure(low_vram=True)
    monkeypatch.setattr(lowvram, "HOST", HOST_MARK)
    dev = model.device
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unet_weight = model.model.diffusion_model.out[2].weight.data
    events = []
    undo = _record(model, events)
    try:
        pipe = Canny2Image(model, mode="fast", options=options)
        host = {t[3].data_ptr() for t in pipe.fast.nets._host["unet"]}
        assert unet_weight.data_ptr() in host              # the host original itself, no copy
        assert pipe.fast.unet.out[2].weight.dtype == torch.bfloat16
        assert pipe.fast.vae.decoder.conv_out.weight.dtype == torch.bfloat16
        built = _squeeze(events)
        events.clear()
        low = pipe.process(image, **PARAMS)
        first = _squeeze(events)
        events.clear()
        again = pipe.process(image, **PARAMS)
        second = _squeeze(events)
        events.clear()
        pipe.close()
        closed = _squeeze(events)
    finally:
        undo()
    # the fast copies are made per tensor where they live, CLIP's and the VAE's in host memory
    # (no module-wide move)
    assert built == []
    vae = [("to", "vae decoding", dev), ("run", "vae"), ("to", "vae decoding", HOST_MARK)]
    assert first == [("to", "clip", dev), ("run", "clip"), ("to", "clip", HOST_MARK),
                     ("run", "diffusion")] + vae
    assert second == [("run", "diffusion")] + vae          # a repeated prompt: CLIP stays put
    assert pipe.prompts.hits == 1 and pipe.prompts.misses == 1
    assert closed == [("to", "unet", HOST_MARK), ("to", "control", HOST_MARK),
                      ("to", "vae", dev), ("to", "clip", dev)]
    for a, b, c in zip(plain, low, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)


def test_fast_mode_under_low_vram_redoes_in_fp32(model, image, save_memory, caplog):
    """The NaN/Inf redo under low-VRAM mode: the fp32 originals come from host memory for it,
    the result equals the clean run's within a step of rounding, and the fast networks are back."""
    import logging

    from runtime.fast import FastOptions
    pipe = Canny2Image(model, mode="fast", options=FastOptions.for_device("cpu", dtype="bf16"))
    try:
        clean = pipe.process(image, **PARAMS)
        hook = pipe.fast.pre.hint_block.register_forward_hook(lambda m, a, o: o * float("nan"))
        try:
            with caplog.at_level(logging.WARNING, logger="runtime.fast"):
                redone = pipe.process(image, **PARAMS)
        finally:
            hook.remove()
        assert pipe.fast.last_info.get("redone_fp32")
        assert pipe.fast.unet.out[2].weight.dtype == torch.bfloat16
    finally:
        pipe.close()
    np.testing.assert_array_equal(redone[0], clean[0])
    for a, b in zip(redone[1:], clean[1:]):      # fp32 reference sampler vs bf16 fast mode
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 8


@pytest.mark.gpu
def test_fast_low_vram_peak_memory_at_512_batch_1(save_memory, record_property):
    """Full-size SD1.5 + ControlNet (random weights), fast mode under low-VRAM, 512², batch 1,
    20 steps: what stays on the GPU between requests is the fp16 UNet (+ the small precompute
    copies and the graph's buffers); the ControlNet's fp16 weights are parked in host memory
    from the end of each sampling to the start of the next (runtime/fast/flat.py), CLIP and the
    VAE are in host memory but for their phases. Asserted: the ControlNet comes back at the same
    address (the captured graph is replayed, not captured again), a third request gives the
    second's images, and the steady peak is within the target, 2.5 GiB."""
    import os

    from runtime.sample import sample_image
    from runtime.weights import build_model
    from tests.conftest import REPO
    full = os.path.join(REPO, "models", "cldm_v15.yaml")
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()  # what earlier tests of this process still hold
    model = build_model(full, random_weights=True, seed=0, device="cuda")
    params = dict(PARAMS, num_samples=1, image_resolution=512, ddim_steps=20)
    picture = sample_image(512, 512)
    gib = 2 ** 30

    def fp16_bytes(net):
        return sum(p.numel() * 2 for p in net.parameters())
    pipe = Canny2Image(model, mode="fast")
    try:
        held = torch.cuda.memory_allocated() - before
        pipe.process(picture, **params)                  # capture
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cleared = []
        clear = pipe.fast.graphs.clear
        pipe.fast.graphs.clear = lambda: (cleared.append(1), clear())
        second = pipe.process(picture, **params)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        for name in ("first_stage_model", "cond_stage_model", "control_model"):
            assert {p.device.type for p in getattr(model, name).parameters()} == {"cpu"}, name
        assert model.model.diffusion_model.out[2].weight.device.type == "cuda"
        third = pipe.process(picture, **params)
        assert cleared == [] and pipe.fast.last_info["graph"]
        for a, b in zip(second, third):
            np.testing.assert_array_equal(a, b)
    finally:
        pipe.close()
    diffusion = fp16_bytes(model.model) + fp16_bytes(model.control_model)
    vae = fp16_bytes(model.first_stage_model)
    record_property("fast_low_vram_peak_gib", round(peak / gib, 3))
    record_property("fast_low_vram_held_after_build_gib", round(held / gib, 3))
    print(f"fast low-VRAM 512² batch 1: peak {peak / gib:.3f} GiB, held after build "
          f"{held / gib:.3f} GiB, fp16 UNet+ControlNet {diffusion / gib:.3f} GiB, VAE "
          f"{vae / gib:.3f} GiB (target 2.5 GiB)")
    assert held <= diffusion + 0.1 * gib
    assert peak <= 2.5 * gib
