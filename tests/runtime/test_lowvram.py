"""Low-VRAM mode (upstream's config.save_memory): sliced attention, ControlLDM.low_vram_shift's
placement, where process() shifts, and reference results identical to those without it."""
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


def test_fast_mode_refuses_low_vram_until_it_is_wired(model, save_memory):
    with pytest.raises(NotImplementedError, match="--mode reference with --low-vram"):
        Canny2Image(model, mode="fast")
