"""The full-size ControlLDM, built on the meta device, has upstream's exact state dict
(tests/data/keys_control_sd15.tsv, the project's reference list) and parameter counts (spec §6)."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FULL_CONFIG, REFERENCE_DATA, TINY_CONFIG
from ldm.util import count_params, instantiate_from_config

SCHEDULE_BUFFERS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
]

PARAM_COUNTS = {
    "model.diffusion_model": 859_520_964,
    "control_model": 361_279_120,
    "control_model.zero_convs": 9_840_000,
    "control_model.input_hint_block": 1_086_480,
    "control_model.middle_block_out": 1_639_680,
    "first_stage_model": 83_653_863,
    "first_stage_model.encoder": 34_163_592,
    "first_stage_model.decoder": 49_490_179,
    "first_stage_model.quant_conv": 72,
    "first_stage_model.post_quant_conv": 20,
    "cond_stage_model": 123_060_480,
    "": 1_427_514_427,
}


def reference_entries():
    with open(os.path.join(REFERENCE_DATA, "keys_control_sd15.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [(key, tuple(int(d) for d in shape.strip("[]").split(",") if d.strip()), dtype)
            for key, shape, dtype in rows]


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(FULL_CONFIG).model)


def test_state_dict_matches_reference_exactly(meta_model):
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in meta_model.state_dict().items()]
    ref = reference_entries()
    assert len(ref) == 1484
    missing = sorted({k for k, _, _ in ref} - {k for k, _, _ in ours})
    unexpected = sorted({k for k, _, _ in ours} - {k for k, _, _ in ref})
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f"entry {i}: ours {a}, reference {b}"
    assert [k for k, _, _ in ours[:13]] == SCHEDULE_BUFFERS


def test_parameter_counts(meta_model):
    for name, expected in PARAM_COUNTS.items():
        module = meta_model.get_submodule(name)
        assert count_params(module) == expected, name


def test_inference_surface(meta_model):
    m = meta_model
    assert type(m).__name__ == "ControlLDM"
    assert m.device == torch.device("meta")
    assert m.control_scales == [1.0] * 13 and m.only_mid_control is False
    assert m.scale_factor == 0.18215 and not isinstance(m.scale_factor, torch.Tensor)
    assert m.num_timesteps == 1000 and m.parameterization == "eps"
    assert "lvlb_weights" in dict(m.named_buffers()) and "lvlb_weights" not in m.state_dict()
    assert not m.first_stage_model.training and not m.cond_stage_model.training
    assert not any(p.requires_grad for p in m.first_stage_model.parameters())
    assert not any(p.requires_grad for p in m.cond_stage_model.parameters())
    m.train()  # frozen stages stay in eval mode, as upstream's disabled_train ensures
    assert not m.first_stage_model.training and not m.cond_stage_model.training
    m.eval()


def test_tiny_model_builds_on_cpu_with_schedule_values():
    """A real (CPU) model: the schedule buffers hold spec §4.5's float32 spot values."""
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    assert model.device == torch.device("cpu")
    spots = {0: 0.99915, 1: 0.998296, 50: 0.951577, 500: 0.276333, 950: 0.0082471, 999: 0.0046601}
    for i, value in spots.items():
        assert model.alphas_cumprod[i].item() == pytest.approx(value, rel=2e-5), i
    assert model.betas.dtype == torch.float32
    assert model.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert model.betas[999].item() == pytest.approx(0.012, rel=1e-6)
    assert torch.equal(model.logvar, torch.zeros(1000))
