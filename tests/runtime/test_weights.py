"""Seeded random weights (runtime.weights): deterministic, every parameter touched, buffers kept,
and activations that stay finite through guided DDIM sampling."""
import pytest
import torch

from cldm.ddim_hacked import DDIMSampler
from cldm.model import create_model
from conftest import FULL_CONFIG, TINY_CONFIG
from runtime.weights import build_model, random_weights_

# seed 0, tiny config: pins the scheme (per-tensor generators seeded from the name) across machines
PINNED = {
    "model.diffusion_model.input_blocks.0.0.weight": [0.0982844, -0.1313612, 0.0449981],
    "first_stage_model.decoder.norm_out.weight": [1.0505326, 0.8187238, 0.9112310],
    "control_model.zero_convs.0.0.bias": [0.0130409, -0.0060247, 0.0323369],
}


def conditioning(model, hint, prompt):
    return {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning([prompt])]}


def test_same_seed_same_weights_other_seed_other_weights():
    first = build_model(TINY_CONFIG, random_weights=True, seed=0).state_dict()
    again = build_model(TINY_CONFIG, random_weights=True, seed=0).state_dict()
    other = build_model(TINY_CONFIG, random_weights=True, seed=1)
    for k, v in first.items():
        assert torch.equal(v, again[k]), k
    for k, p in other.named_parameters():
        assert not torch.equal(p, first[k]), k
    for k, expected in PINNED.items():
        torch.testing.assert_close(first[k].flatten()[:3], torch.tensor(expected),
                                   rtol=1e-6, atol=1e-7)


def test_every_parameter_changed_buffers_kept():
    model = create_model(TINY_CONFIG)
    params = {k: p.clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # non-persistent ones too
    assert "alphas_cumprod" in buffers and any(k.endswith("position_ids") for k in buffers)

    assert random_weights_(model, seed=0) is model and model.random_weights is True
    for k, p in model.named_parameters():
        assert torch.isfinite(p).all(), k
        assert not torch.equal(p, params[k]), f"{k} kept its init"
        # a normal draw is exactly 0 now and then (1 in 3.2 M for the token embedding)
        assert p.count_nonzero() > 0.999 * p.numel(), f"{k} is (mostly) zeros"
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k


def test_meta_construction_gives_the_same_model():
    """build_model builds parameters on the meta device, then materializes them randomly."""
    built = build_model(TINY_CONFIG, random_weights=True, seed=3)
    plain = random_weights_(create_model(TINY_CONFIG), seed=3)
    assert not built.training
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    assert [k for k, _ in built.named_parameters()] == [k for k, _ in plain.named_parameters()]
    for (k, a), (_, b) in zip([*built.named_parameters(), *built.named_buffers()],
                              [*plain.named_parameters(), *plain.named_buffers()]):
        assert a.requires_grad == b.requires_grad and torch.equal(a, b), k


@torch.no_grad()
def test_tiny_guided_ddim_stays_finite():
    model = build_model(TINY_CONFIG, random_weights=True, seed=0)
    torch.manual_seed(0)
    hint = (torch.rand(1, 3, 64, 64) > 0.8).float()
    cond = conditioning(model, hint, "a bird, best quality")
    uncond = conditioning(model, hint, "lowres, bad anatomy")
    samples, _ = DDIMSampler(model).sample(20, 1, (4, 8, 8), cond, verbose=False, eta=0.0,
                                           unconditional_guidance_scale=9.0,
                                           unconditional_conditioning=uncond)
    assert torch.isfinite(samples).all() and samples.abs().max() < 1e3
    image = model.decode_first_stage(samples)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and 1e-2 < image.std() < 1e2


@pytest.mark.slow
@torch.no_grad()
def test_full_size_apply_model_is_finite_and_moderate():
    model = build_model(FULL_CONFIG, random_weights=True, seed=0)
    torch.manual_seed(0)
    hint = (torch.rand(1, 3, 64, 64) > 0.8).float()
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([951])
    eps_c = model.apply_model(x, t, conditioning(model, hint, "a bird, best quality"))
    eps_u = model.apply_model(x, t, conditioning(model, hint, "lowres, bad anatomy"))
    for eps in (eps_c, eps_u):
        assert torch.isfinite(eps).all() and 1e-2 < eps.std() < 10 and eps.abs().max() < 100
    # guidance 9 must not blow the difference up: cond and uncond differ, but moderately
    difference = (eps_c - eps_u).std()
    assert 1e-5 < difference < eps_c.std()


@pytest.mark.gpu
def test_same_weights_on_every_device():
    cpu = build_model(TINY_CONFIG, random_weights=True, seed=0)
    gpu = build_model(TINY_CONFIG, random_weights=True, seed=0, device="cuda")
    for k, v in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[k].cpu(), v), k


# --- build_model's construction path: straight into the target dtype/device, streamed files --

import os  # noqa: E402

import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402

import config  # noqa: E402
from cldm.model import CheckpointError  # noqa: E402


def _assert_fp16_of(model16, model32):
    for (k, a), (_, b) in zip(model16.named_parameters(), model32.named_parameters()):
        assert a.dtype == torch.float16 and torch.equal(a, b.half()), k
    for (k, a), (_, b) in zip(model16.named_buffers(), model32.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), k       # schedule stays float32


def test_random_weights_straight_into_float16():
    _assert_fp16_of(build_model(TINY_CONFIG, random_weights=True, seed=2, dtype=torch.float16),
                    build_model(TINY_CONFIG, random_weights=True, seed=2))


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.pth", "tiny.ckpt"])
def test_checkpoint_straight_into_float16(tmp_path, name):
    ref = build_model(TINY_CONFIG, random_weights=True, seed=4)
    path = str(tmp_path / name)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(sd, path)
    else:
        torch.save({"state_dict": sd} if name.endswith(".ckpt") else sd, path)
    loaded = build_model(TINY_CONFIG, ckpt=path)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    _assert_fp16_of(build_model(TINY_CONFIG, ckpt=path, dtype=torch.float16), ref)


def test_safetensors_are_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    ref = build_model(TINY_CONFIG, random_weights=True, seed=5)
    path = str(tmp_path / "tiny.safetensors")
    safetensors.torch.save_file(ref.state_dict(), path)
    reads = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, key):
            reads.append(key)
            return self.handle.get_tensor(key)

    def whole_file(*args, **kwargs):
        raise AssertionError("the whole state dict was loaded into host memory")

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    monkeypatch.setattr(safetensors.torch, "load_file", whole_file)
    loaded = build_model(TINY_CONFIG, ckpt=path)
    assert sorted(reads) == sorted(ref.state_dict()) and len(reads) == len(set(reads))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_bad_checkpoints_keep_their_messages(tmp_path):
    ref = build_model(TINY_CONFIG, random_weights=True, seed=6)
    sd = {k: v for k, v in ref.state_dict().items() if k != "control_model.zero_convs.0.0.bias"}
    missing = str(tmp_path / "missing.safetensors")
    safetensors.torch.save_file(sd, missing)
    with pytest.raises(CheckpointError, match=r"1 missing keys.*zero_convs\.0\.0\.bias"):
        build_model(TINY_CONFIG, ckpt=missing)
    for name in ("cut.safetensors", "cut.pth"):
        path = str(tmp_path / name)
        if name.endswith(".pth"):
            torch.save(ref.state_dict(), path)
        else:
            safetensors.torch.save_file(ref.state_dict(), path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with pytest.raises(CheckpointError, match="truncated or corrupted"):
            build_model(TINY_CONFIG, ckpt=path)


def test_low_vram_build_keeps_the_diffusion_networks_in_host_memory():
    """Under save_memory the UNet and ControlNet are created in host memory and the rest on the
    device (meta stands in for a GPU here: placement without computing)."""
    config.save_memory = True
    try:
        model = build_model(TINY_CONFIG, random_weights=True, seed=0, device="meta",
                            dtype=torch.float16)
    finally:
        config.save_memory = False
    where = {name: {t.device.type for t in child.parameters()}
             for name, child in model.named_children()}
    assert where == {"model": {"cpu"}, "control_model": {"cpu"},
                     "first_stage_model": {"meta"}, "cond_stage_model": {"meta"}}
    assert model.device.type == "meta" and model.betas.dtype == torch.float32
    assert next(model.model.parameters()).dtype == torch.float16
