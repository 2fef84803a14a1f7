"""ldm.util and ldm.modules.diffusionmodules.util against the formulas of spec §3, §4.1, §4.5."""
import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.modules.diffusionmodules.util import (
    GroupNorm32,
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    normalization,
    timestep_embedding,
)
from ldm.util import count_params, get_obj_from_str, instantiate_from_config


@pytest.mark.parametrize("dim", [320, 7])
def test_timestep_embedding_formula(dim):
    t = torch.tensor([0, 1, 51, 500, 951, 999])
    emb = timestep_embedding(t, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    ref = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first
    assert emb.dtype == torch.float32 and emb.shape == (len(t), dim)
    # float32 frequencies: |error of t * freq| <= ~1000 * 2 ulp(1) ~ 1.2e-4
    assert (emb[:, : 2 * half].double() - ref).abs().max().item() < 2e-4
    assert (emb[0, :half] == 1).all() and (emb[0, half : 2 * half] == 0).all()
    if dim % 2:
        assert (emb[:, -1] == 0).all()


def test_timestep_embedding_float32_recipe():
    """The exact float32 recipe: (-ln(1e4) * k) / half, then t * freqs; cos(0 * f) etc."""
    t = torch.tensor([1])
    emb = timestep_embedding(t, 320)
    freqs = torch.exp(-math.log(10000) * torch.arange(160, dtype=torch.float32) / 160)
    assert torch.equal(emb[0, :160], torch.cos(freqs)) and torch.equal(emb[0, 160:], torch.sin(freqs))


def test_beta_schedule_linear():
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.0120)
    assert isinstance(betas, np.ndarray) and betas.dtype == np.float64
    ref = np.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(betas, ref, rtol=1e-14)
    assert betas[0] == pytest.approx(0.00085, rel=1e-14) and betas[-1] == pytest.approx(0.012, rel=1e-14)


def test_schedule_buffers_are_float32_of_float64_math():
    ddpm = DDPM({"target": "torch.nn.Identity"}, linear_start=0.00085, linear_end=0.0120, use_ema=False)
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.0120)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    pv = betas * (1 - ac_prev) / (1 - ac)
    expected = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
        "log_one_minus_alphas_cumprod": np.log(1 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
    }
    for name, value in expected.items():
        buf = getattr(ddpm, name)
        assert buf.dtype == torch.float32, name
        assert torch.equal(buf, torch.tensor(value, dtype=torch.float32)), name
    spots = {0: 0.99915, 1: 0.998296, 50: 0.951577, 500: 0.276333, 950: 0.0082471, 999: 0.0046601}
    for i, value in spots.items():
        assert ddpm.alphas_cumprod[i].item() == pytest.approx(value, rel=2e-5), i
    assert torch.isfinite(ddpm.lvlb_weights).all() and ddpm.lvlb_weights[0] == ddpm.lvlb_weights[1]
    assert list(ddpm.state_dict())[:13][-1] == "logvar"


def test_ddim_timesteps_and_parameters():
    assert make_ddim_timesteps("uniform", 20, 1000, verbose=False).tolist() == list(range(1, 1000, 50))
    assert len(make_ddim_timesteps("uniform", 6, 1000, verbose=False)) == 7  # upstream quirk
    assert make_ddim_timesteps("uniform", 3, 1000, verbose=False)[-1] == 1000  # out of range upstream too
    ac = np.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.0120))
    ts = make_ddim_timesteps("uniform", 20, 1000, verbose=False)
    sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac, ts, eta=0.5, verbose=False)
    assert alphas_prev[0] == ac[0] and np.array_equal(alphas_prev[1:], ac[ts[:-1]])
    np.testing.assert_allclose(alphas, ac[ts], rtol=0)
    ref = 0.5 * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    np.testing.assert_allclose(sigmas, ref, rtol=1e-15)
    assert (make_ddim_sampling_parameters(ac, ts, eta=0.0, verbose=False)[0] == 0).all()


def test_group_norm32_computes_in_float32():
    gn = normalization(64)
    assert isinstance(gn, GroupNorm32) and gn.eps == 1e-5 and gn.num_groups == 32
    x = torch.randn(2, 64, 5, 3, dtype=torch.float64)
    y = gn(x)
    assert y.dtype == torch.float64
    ref = torch.nn.functional.group_norm(x.float(), 32, gn.weight, gn.bias, 1e-5).double()
    assert torch.equal(y, ref)


def test_instantiate_from_config():
    assert instantiate_from_config("__is_first_stage__") is None
    assert instantiate_from_config("__is_unconditional__") is None
    with pytest.raises(KeyError):
        instantiate_from_config({"params": {}})
    with pytest.raises(KeyError):
        instantiate_from_config("__something_else__")
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    lin = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert isinstance(lin, torch.nn.Linear) and count_params(lin) == 8
    assert get_obj_from_str("ldm.util.count_params") is count_params
