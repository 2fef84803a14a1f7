"""DDIMSampler (cldm/ddim_hacked.py) against spec §4.8, with schedules and a sampling loop written
here from the formulas."""
import numpy as np
import pytest
import torch

from cldm.ddim_hacked import DDIMSampler

T = 1000
CRASH_COUNTS = {3, 9, 27, 36, 37}      # upstream IndexError in 1..100: last timestep is 1000


def alphas_cumprod_f64():
    betas = np.linspace(0.00085 ** 0.5, 0.0120 ** 0.5, T, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


class FakeModel:
    """apply_model is a fixed deterministic function of (x, t, cond); it records every call."""

    parameterization = "eps"
    num_timesteps = T

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.alphas_cumprod = torch.tensor(alphas_cumprod_f64(), dtype=torch.float32)
        self.betas = torch.zeros(T, dtype=torch.float32)
        g = torch.Generator().manual_seed(7)
        self.mix = torch.randn(4, 4, generator=g) * 0.3
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((cond["name"], t.clone()))
        bias = cond["c_crossattn"][0][:, :, None, None]
        return (torch.einsum("oc,bchw->bohw", self.mix, x) + bias
                + (t.float() / T)[:, None, None, None] * 0.05)


def upstream_timesteps(S):
    c = T // S
    return np.asarray(list(range(0, T, c))) + 1


def expected_timesteps(S):
    ts = upstream_timesteps(S)
    return ts[ts < T]


def upstream_sigmas(a32, a_prev, eta):
    """sigma_t with upstream's precision: float64 math, except that (1-p)/(1-a) goes through
    Tensor.__rtruediv__, i.e. a float32 reciprocal of (1 - a); with one step alphas_prev is a
    float32 array (np.asarray of a lone float32 tensor) and everything stays float32."""
    if len(a32) == 1:
        f = np.float32
        p = a_prev.astype(f)
        return f(eta) * np.sqrt((f(1) - p) * (f(1) / (f(1) - a32)) * (f(1) - a32 / p))
    recip = (np.float32(1) / (np.float32(1) - a32)).astype(np.float64)
    return eta * np.sqrt((1 - a_prev) * recip * (1 - a32.astype(np.float64) / a_prev))


def pure_float64_sigmas(a32, a_prev, eta):
    a = a32.astype(np.float64)
    return eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))


# ---- schedule -----------------------------------------------------------------------------------

def test_crash_counts_are_exactly_the_documented_ones():
    crashing = {S for S in range(1, 101) if upstream_timesteps(S)[-1] >= T}
    assert crashing == CRASH_COUNTS


@pytest.mark.parametrize("S", range(1, 101))
def test_timesteps_and_per_step_scalars(S):
    sampler = DDIMSampler(FakeModel())
    ac32 = alphas_cumprod_f64().astype(np.float32)
    for eta in (0.0, 1.0):
        sampler.make_schedule(S, ddim_eta=eta, verbose=False)
        ts = sampler.ddim_timesteps
        up = upstream_timesteps(S)
        if S in CRASH_COUNTS:
            assert up[-1] == T and np.array_equal(ts, up[:-1])
        else:
            assert np.array_equal(ts, up)           # identical to upstream's schedule
        assert len(ts) >= S and ts[0] == 1 and ts[-1] < T

        a = ac32[ts]                                                    # float32
        a_prev = np.concatenate([[ac32[0]], ac32[ts[:-1]]]).astype(np.float64)
        sigma = upstream_sigmas(a, a_prev, eta)
        s1m = np.sqrt(np.float32(1) - a)

        assert sampler.ddim_alphas.dtype == torch.float32
        assert isinstance(sampler.ddim_alphas_prev, np.ndarray)
        assert sampler.ddim_alphas_prev.dtype == np.float64
        assert sampler.ddim_sigmas.dtype == torch.float64
        assert sampler.ddim_sqrt_one_minus_alphas.dtype == torch.float32
        np.testing.assert_array_equal(sampler.ddim_alphas.numpy(), a)
        np.testing.assert_array_equal(sampler.ddim_alphas_prev, a_prev)
        np.testing.assert_array_equal(sampler.ddim_sigmas.numpy(), sigma)
        if len(ts) == 1:   # upstream computes this one in float32: cancellation in 1 - a/p
            np.testing.assert_allclose(sampler.ddim_sigmas.numpy(),
                                       pure_float64_sigmas(a, a_prev, eta), rtol=1e-5)
        else:              # the float32 scalars fed to torch.full are within one float32 ulp
            np.testing.assert_allclose(sampler.ddim_sigmas.numpy().astype(np.float32),
                                       pure_float64_sigmas(a, a_prev, eta).astype(np.float32),
                                       rtol=2.4e-7, atol=0)
        np.testing.assert_array_equal(sampler.ddim_sqrt_one_minus_alphas.numpy(), s1m)
        assert sampler.ddim_alphas_prev[0] == np.float64(np.float32(0.99915))  # not 1
        if eta == 0.0:
            assert not sampler.ddim_sigmas.any()


def test_schedule_spot_values():
    sampler = DDIMSampler(FakeModel())
    sampler.make_schedule(20, verbose=False)
    assert list(sampler.ddim_timesteps) == list(range(1, 1000, 50))
    sampler.make_schedule(6, verbose=False)
    assert len(sampler.ddim_timesteps) == 7
    sampler.make_schedule(3, verbose=False)
    assert list(sampler.ddim_timesteps) == [1, 334, 667]


@pytest.mark.parametrize("S", [101, 111, 251, 333, 501, 1000])
def test_larger_crash_counts_run(S):
    sampler = DDIMSampler(FakeModel())
    sampler.make_schedule(S, verbose=False)
    assert np.array_equal(sampler.ddim_timesteps, expected_timesteps(S))
    assert upstream_timesteps(S)[-1] == T


def test_buffers_follow_the_model_device():
    sampler = DDIMSampler(FakeModel(device="meta"))
    sampler.make_schedule(10, verbose=False)
    for name in ("ddim_alphas", "ddim_sigmas", "ddim_sqrt_one_minus_alphas", "alphas_cumprod"):
        assert getattr(sampler, name).device.type == "meta"


# ---- sampling -----------------------------------------------------------------------------------

def _conds(B):
    g = torch.Generator().manual_seed(3)
    c = {"name": "c", "c_crossattn": [torch.randn(B, 4, generator=g)]}
    uc = {"name": "u", "c_crossattn": [torch.randn(B, 4, generator=g)]}
    return c, uc


def reference_loop(model, S, B, shape, c, uc, scale, eta, seed):
    """DDIM written from spec §4.8: x_T, then per step model call(s) and one randn."""
    ac32 = alphas_cumprod_f64().astype(np.float32)
    ts = expected_timesteps(S)
    a_all = ac32[ts]
    p_all = np.concatenate([[ac32[0]], ac32[ts[:-1]]]).astype(np.float64)
    sig_all = upstream_sigmas(a_all, p_all, eta)
    torch.manual_seed(seed)
    x = torch.randn((B, *shape))
    for index in reversed(range(len(ts))):
        t = torch.full((B,), int(ts[index]), dtype=torch.long)
        if uc is None or scale == 1.0:
            e = model.apply_model(x, t, c)
        else:
            e_c = model.apply_model(x, t, c)
            e_u = model.apply_model(x, t, uc)
            e = e_u + scale * (e_c - e_u)
        a, a_prev, sigma, s1m = (
            torch.full((B, 1, 1, 1), float(v), dtype=torch.float32)
            for v in (a_all[index], p_all[index], sig_all[index],
                      np.sqrt(np.float32(1) - a_all[index])))
        pred_x0 = (x - s1m * e) / a.sqrt()
        dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * e
        noise = sigma * torch.randn(x.shape)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
    return x


@pytest.mark.parametrize("S, eta, scale", [
    (4, 0.0, 9.0), (4, 1.0, 9.0), (6, 0.5, 7.5), (3, 0.0, 9.0), (9, 1.0, 2.0), (5, 0.0, 1.0),
])
def test_sampling_equals_loop_from_the_formulas(S, eta, scale):
    B, shape = 2, (4, 3, 5)
    c, uc = _conds(B)
    model = FakeModel()
    expected = reference_loop(model, S, B, shape, c, uc, scale, eta, seed=11)
    model.calls.clear()

    steps = []
    torch.manual_seed(11)
    samples, intermediates = DDIMSampler(model).sample(
        S, B, shape, c, eta=eta, verbose=False, unconditional_guidance_scale=scale,
        unconditional_conditioning=uc, callback=steps.append)
    after_sampler = torch.randn(3)
    torch.manual_seed(11)
    reference_loop(FakeModel(), S, B, shape, c, uc, scale, eta, seed=11)
    after_loop = torch.randn(3)

    assert torch.equal(samples, expected)
    assert torch.equal(after_sampler, after_loop)          # same number of draws: x_T + 1 a step
    n = len(expected_timesteps(S))
    assert steps == list(range(n))
    calls_per_step = 1 if scale == 1.0 else 2
    assert len(model.calls) == n * calls_per_step
    if calls_per_step == 2:
        assert [name for name, _ in model.calls[:2]] == ["c", "u"]     # cond first
    assert [int(t[0]) for _, t in model.calls[::calls_per_step]] == list(expected_timesteps(S))[::-1]
    assert torch.equal(intermediates["x_inter"][-1], samples)


def test_noise_is_drawn_every_step_even_for_eta_zero():
    B, shape = 1, (4, 2, 2)
    c, uc = _conds(B)
    torch.manual_seed(5)
    DDIMSampler(FakeModel()).sample(4, B, shape, c, eta=0.0, verbose=False,
                                    unconditional_guidance_scale=9.0, unconditional_conditioning=uc)
    after = torch.randn(1)
    torch.manual_seed(5)
    for _ in range(1 + 4):
        torch.randn((B, *shape))
    assert torch.equal(after, torch.randn(1))


def test_x_T_is_used_as_given():
    B, shape = 1, (4, 2, 3)
    c, uc = _conds(B)
    torch.manual_seed(1)
    x_T = torch.randn((B, *shape))
    a, _ = DDIMSampler(FakeModel()).sample(5, B, shape, c, x_T=x_T, verbose=False,
                                           unconditional_guidance_scale=3.0,
                                           unconditional_conditioning=uc)
    torch.manual_seed(1)
    b, _ = DDIMSampler(FakeModel()).sample(5, B, shape, c, verbose=False,
                                           unconditional_guidance_scale=3.0,
                                           unconditional_conditioning=uc)
    assert torch.equal(a, b)


@pytest.mark.parametrize("option", [
    {"mask": torch.ones(1)}, {"x0": torch.ones(1)}, {"quantize_x0": True},
    {"score_corrector": object()}, {"dynamic_threshold": 0.9}, {"noise_dropout": 0.1},
    {"ucg_schedule": [1.0]}, {"corrector_kwargs": {}},
])
def test_unsupported_options_raise(option):
    c, _ = _conds(1)
    with pytest.raises(NotImplementedError, match=next(iter(option))):
        DDIMSampler(FakeModel()).sample(2, 1, (4, 2, 2), c, verbose=False, **option)
