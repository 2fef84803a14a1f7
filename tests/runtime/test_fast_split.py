"""runtime/fast/split.py (fast mode's own split of the ControlNet/UNet forward) against the model's
own forward, ControlLDM.apply_model, on the tiny model in fp32 on CPU, for every option that
forward honours: control or none (c_concat None), only_mid_control, the control scales."""
import pytest
import torch

from ldm.modules.diffusionmodules.util import timestep_embedding
from runtime.fast import control_forward, unet_decoder, unet_encoder
from runtime.weights import build_model
from tests.conftest import TINY_CONFIG

TOL = dict(rtol=1e-5, atol=1e-5)  # the same ops in the same order; summation order may differ


@pytest.fixture(scope="module")
def model():
    return build_model(TINY_CONFIG, random_weights=True, seed=2)


@pytest.fixture(scope="module")
def case(model):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 16, generator=g)
    hint = torch.rand(2, 3, 64, 128, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    t = torch.tensor([801, 51])
    return x, hint, ctx, t


def split_eps(model, x, hint, ctx, t, control_on, only_mid, scales):
    unet, cn = model.model.diffusion_model, model.control_model
    temb = timestep_embedding(t, unet.model_channels)
    emb_u, emb_c = unet.time_embed(temb), cn.time_embed(temb)
    control = None
    if control_on:
        g = cn.input_hint_block(hint, None, None)
        control = [r * s for r, s in zip(control_forward(cn, x, emb_c, ctx, g), scales)]
    hm, hs = unet_encoder(unet, x, emb_u, ctx)
    return unet_decoder(unet, hm, hs, emb_u, ctx, control, only_mid)


@pytest.mark.parametrize("only_mid", [False, True])
@pytest.mark.parametrize("control_on", [True, False])
@pytest.mark.parametrize("scales", ["ones", "guess"])
def test_split_equals_apply_model(model, case, only_mid, control_on, scales):
    x, hint, ctx, t = case
    sc = [1.0] * 13 if scales == "ones" else [1.7 * 0.825 ** float(12 - i) for i in range(13)]
    model.only_mid_control, model.control_scales = only_mid, sc
    try:
        with torch.no_grad():
            ref = model.apply_model(x, t, {"c_concat": [hint] if control_on else None,
                                           "c_crossattn": [ctx]})
            got = split_eps(model, x, hint, ctx, t, control_on, only_mid, sc)
    finally:
        model.only_mid_control, model.control_scales = False, [1.0] * 13
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got, ref, **TOL)


def test_options_change_the_result(model, case):
    """The cases above are distinct: each option changes eps (so no comparison is vacuous)."""
    x, hint, ctx, t = case
    with torch.no_grad():
        full = split_eps(model, x, hint, ctx, t, True, False, [1.0] * 13)
        mid = split_eps(model, x, hint, ctx, t, True, True, [1.0] * 13)
        none = split_eps(model, x, hint, ctx, t, False, False, [1.0] * 13)
        half = split_eps(model, x, hint, ctx, t, True, False, [0.5] * 13)
    for a, b in ((full, mid), (full, none), (mid, none), (full, half)):
        assert (a - b).abs().max() > 1e-3
