"""kernels.ddim.ddim_update (fusion "ddim_update": guidance + DDIM update of fast mode's step)
against the update written out in PyTorch fp32 ops, one op at a time as the reference sampler
rounds them (bit for bit, CPU interpreter and GPU), and against fp64 math.
"""
import os

import pytest
import torch

import kernels
from kernels import platform
from kernels.ddim import ddim_update

DEV = "cpu" if platform.is_interpreter() else "cuda"
B, C, H, W = 2, 4, 8, 12


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV)


def _scalars(a_t=0.3, a_prev=0.55, sigma=0.1):
    # fp32 scalars, as the reference sampler's schedule gives them
    return torch.tensor([a_t, a_prev, sigma, (1 - a_t) ** 0.5], dtype=torch.float32, device=DEV)


def _written_out(x, e_u, e_c, g, sc, noise, dtype=torch.float32):
    """p_sample_ddim's guidance and update (cldm/ddim_hacked.py), op by op, in `dtype`."""
    x, noise, sc = x.to(dtype), noise.to(dtype), sc.to(dtype)
    c = e_c.to(dtype)
    eps = c if e_u is None else e_u.to(dtype) + g.to(dtype) * (c - e_u.to(dtype))
    a_t, a_prev, sigma, s1m = (sc[i].reshape(1, 1, 1, 1) for i in range(4))
    pred_x0 = (x - s1m * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    return a_prev.sqrt() * pred_x0 + dir_xt + sigma * noise, eps


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("eps_dtype", [torch.float16, torch.float32], ids=str)
def test_ddim_update_is_the_reference_update_bit_for_bit(guided, layout, eps_dtype):
    out = _rand(2 * B, C, H, W, seed=1).to(eps_dtype)   # one CFG call's eps: rows [uncond; cond]
    if layout == "nhwc":
        out = out.contiguous(memory_format=torch.channels_last)
    e_u, e_c = out.chunk(2) if guided else (None, out[B:])
    g = torch.tensor(9.0, device=DEV) if guided else None
    x, noise, sc = _rand(B, C, H, W, seed=2), _rand(B, C, H, W, seed=3), _scalars()
    want_x, want_eps = _written_out(x, e_u, e_c, g, sc, noise)
    ref_x, _ = _written_out(x, e_u, e_c, g, sc, noise, torch.float64)
    eps_out, bad = torch.empty_like(x), torch.zeros((), dtype=torch.bool, device=DEV)
    ddim_update(x, e_c, sc, noise, eps_out, e_u, g, bad)
    assert torch.equal(x, want_x) and torch.equal(eps_out, want_eps)
    assert not bool(bad)
    assert (x.double() - ref_x).abs().max() < 1e-5 * ref_x.abs().max()


def test_ddim_update_flags_non_finite_eps_and_keeps_the_flag():
    x, sc, zeros = _rand(B, C, H, W), _scalars(sigma=0.0), torch.zeros(B, C, H, W, device=DEV)
    bad = torch.zeros((), dtype=torch.bool, device=DEV)
    for value, flagged in ((float("nan"), True), (float("-inf"), True), (None, True)):
        x.copy_(_rand(B, C, H, W))
        e = _rand(B, C, H, W, seed=4).half()
        if value is not None:
            bad.zero_()
            e[1, 2, 3, 4] = value
        ddim_update(x, e, sc, zeros, torch.empty_like(x), bad=bad)
        assert bool(bad) == flagged   # None: finite eps, the flag from before stays set
    bad.zero_()
    ddim_update(x, _rand(B, C, H, W, seed=5), sc, zeros, torch.empty_like(x), bad=bad)
    assert not bool(bad)


def test_ddim_update_refuses_what_it_cannot_address():
    x, sc = _rand(B, C, H, W), _scalars()
    e = torch.empty_like(x)
    with pytest.raises(ValueError, match="contiguous fp32"):
        ddim_update(x.half(), e, sc, e, e)
    with pytest.raises(ValueError, match="noise"):
        ddim_update(x, e, sc, e.contiguous(memory_format=torch.channels_last).transpose(2, 3), e)
    with pytest.raises(ValueError, match="go together"):
        ddim_update(x, e, sc, e, e, eps_u=e)
    with pytest.raises(ValueError, match="scalars"):
        ddim_update(x, e, sc[:3], e, e)


def test_fast_mode_with_ddim_update_gives_the_same_latents():
    """Tiny model, fast mode (fp32 on the CPU, fp16 on a GPU), 3 steps with eta > 0 (the noise
    term is live): the default fusions with and without ddim_update give identical latents and
    eps; the fused run calls the kernel every step, with no fallback."""
    from types import SimpleNamespace
    from benchmarks.profile_step import _inputs
    from runtime.fast import FastOptions, FastRunner
    from runtime.weights import build_model
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    model = build_model(os.path.join(os.path.dirname(__file__), "..", "..", "models", "cldm_tiny.yaml"),
                        random_weights=True, device=DEV, seed=0)
    inp = _inputs(SimpleNamespace(device=torch.device(DEV), unet=model.model.diffusion_model), 64, 2)
    got = {}
    without = tuple(f for f in kernels.DEFAULT_FUSIONS if f != "ddim_update")
    for fu in (without, kernels.DEFAULT_FUSIONS):
        r = FastRunner(model, FastOptions(dtype=dtype, channels_last=True, cuda_graph=False,
                                          two_streams=False, fusions=fu))
        try:
            torch.manual_seed(7)   # the per-step noise at eta > 0
            x, info = r.sample(*inp, 3, scale=9.0, eta=0.5)
            got[fu] = x, info["first_eps"]
            c = r.kernel_handle.counts
        finally:
            r.close()
    assert c["ddim_update"]["calls"] == 3 and c["ddim_update"]["fallbacks"] == 0, c["ddim_update"]
    assert torch.equal(got[without][0], got[kernels.DEFAULT_FUSIONS][0])
    assert torch.equal(got[without][1], got[kernels.DEFAULT_FUSIONS][1])
