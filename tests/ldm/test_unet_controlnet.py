"""UNet (ControlledUnetModel) and ControlNet against diffusers, an independent implementation.

Our original-layout state dict is converted with diffusers' own single-file converters and
strict-loaded into UNet2DConditionModel / ControlNetModel; every weight is random (zero-init
convs included) so no path hides behind a zero. CPU, float32.
"""
import gc
import inspect

import pytest
import torch
from omegaconf import OmegaConf

from cldm.cldm import ControlNet, ControlledUnetModel
from conftest import FULL_CONFIG, TINY_CONFIG, assert_matches_reference
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from ldm.util import instantiate_from_config

GUESS_SCALES = [0.825 ** (12 - i) for i in range(13)]
STRENGTH_SCALES = [0.7] * 13


def randomize_(module, seed):
    """Every parameter random: weights N(0, 1/fan_in), norm weights 1 + N(0, 0.1²), biases
    N(0, 0.05²). Keeps activations O(1) through the whole net, zero-init layers included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                values /= (p[0].numel()) ** 0.5
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                values = 1 + 0.1 * values
            else:
                values *= 0.05
            p.copy_(values)
    return module


def original_config(path, **overrides):
    """The yaml as a plain dict (what diffusers' converters expect), UNet/ControlNet params
    overridden alike."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in ("unet_config", "control_stage_config"):
        cfg["model"]["params"][key]["params"].update(overrides)
    return cfg


def diffusers_configs(cfg, checkpoint):
    unet = create_unet_diffusers_config_from_ldm(cfg, checkpoint)
    # create_controlnet_diffusers_config_from_ldm is broken in diffusers 0.42: derive it.
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    controlnet = {k: v for k, v in unet.items() if k in accepted}
    controlnet["conditioning_channels"] = cfg["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    return unet, controlnet


def diffusers_model(cls, config, converted):
    """diffusers model holding the converted tensors (assign: no second copy of the weights)."""
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def inputs(batch, latent_hw, context_dim, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    x = torch.randn(batch, 4, h, w, generator=g)
    hint = (torch.rand(batch, 3, 8 * h, 8 * w, generator=g) > 0.8).float()  # canny-like 0/1 map
    t = torch.tensor([951, 1, 500, 26][:batch])
    context = torch.randn(batch, 77, context_dim, generator=g)
    return x, hint, t, context


def diffusers_eps(dunet, dcontrol, x, hint, t, context, scales):
    """ControlLDM.apply_model's chain written with diffusers modules."""
    down, mid = dcontrol(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    control = [c * s for c, s in zip(list(down) + [mid], scales)]
    eps = dunet(
        x,
        t,
        encoder_hidden_states=context,
        down_block_additional_residuals=control[:-1],
        mid_block_additional_residual=control[-1],
        return_dict=False,
    )[0]
    return list(down) + [mid], eps


# name: (overrides of cldm_tiny.yaml's UNet/ControlNet params, latent h, w)
TINY_VARIANTS = {
    "tiny": ({}, 8, 6),
    # a level without attention (Down/UpBlock2D), two ResBlocks per level
    "tiny-3-levels": ({"channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_resolutions": [1, 2]}, 8, 12),
    # SD2.x-style Linear projections in the SpatialTransformer
    "tiny-linear": ({"use_linear_in_transformer": True}, 6, 4),
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_unet_and_controlnet_match_diffusers(variant):
    overrides, h, w = TINY_VARIANTS[variant]
    cfg = original_config(TINY_CONFIG, **overrides)
    params = cfg["model"]["params"]
    unet = randomize_(ControlledUnetModel(**params["unet_config"]["params"]), seed=1).eval()
    control = randomize_(ControlNet(**params["control_stage_config"]["params"]), seed=2).eval()
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    checkpoint.update({f"control_model.{k}": v for k, v in control.state_dict().items()})

    unet_cfg, control_cfg = diffusers_configs(cfg, checkpoint)
    dunet = diffusers_model(UNet2DConditionModel, unet_cfg, convert_ldm_unet_checkpoint(checkpoint, unet_cfg))
    dcontrol = diffusers_model(ControlNetModel, control_cfg, convert_controlnet_checkpoint(checkpoint, control_cfg))

    x, hint, t, context = inputs(3, (h, w), params["unet_config"]["params"]["context_dim"], seed=3)
    with torch.no_grad():
        outs = control(x, hint, t, context)
        ref_outs, _ = diffusers_eps(dunet, dcontrol, x, hint, t, context, [1.0] * 13)
        assert len(outs) == len(ref_outs) == len(control.input_blocks) + 1
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert o.shape == r.shape
            assert_matches_reference(o, r, f"{variant} control residual {i}")

        for scales in (GUESS_SCALES, STRENGTH_SCALES):
            scaled = [c * s for c, s in zip(outs, scales)]
            eps = unet(x, t, context, control=scaled)
            _, ref_eps = diffusers_eps(dunet, dcontrol, x, hint, t, context, scales)
            assert_matches_reference(eps, ref_eps, f"{variant} eps with control")

        eps = unet(x, t, context, control=None)
        ref = dunet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        assert_matches_reference(eps, ref, f"{variant} eps without control")


def test_tiny_controlldm_apply_model_matches_diffusers():
    """apply_model's wiring: concatenated conditioning lists, control_scales, no-hint path,
    only_mid_control."""
    cfg = original_config(TINY_CONFIG)
    model = instantiate_from_config(OmegaConf.create(cfg).model).eval()
    randomize_(model.model.diffusion_model, seed=4)
    randomize_(model.control_model, seed=5)
    checkpoint = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "control_model."))}
    unet_cfg, control_cfg = diffusers_configs(cfg, checkpoint)
    dunet = diffusers_model(UNet2DConditionModel, unet_cfg, convert_ldm_unet_checkpoint(checkpoint, unet_cfg))
    dcontrol = diffusers_model(ControlNetModel, control_cfg, convert_controlnet_checkpoint(checkpoint, control_cfg))

    x, hint, t, context = inputs(2, (8, 6), 64, seed=6)
    model.control_scales = list(GUESS_SCALES)
    with torch.no_grad():
        # context given as two chunks along the token axis, concatenated by apply_model
        cond = {"c_concat": [hint], "c_crossattn": [context[:, :40], context[:, 40:]]}
        eps = model.apply_model(x, t, cond)
        _, ref = diffusers_eps(dunet, dcontrol, x, hint, t, context, GUESS_SCALES)
        assert_matches_reference(eps, ref, "apply_model with control")
        assert model.control_scales == GUESS_SCALES

        eps = model.apply_model(x, t, {"c_concat": None, "c_crossattn": [context]})
        ref = dunet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        assert_matches_reference(eps, ref, "apply_model without hint")

        model.only_mid_control = True
        eps = model.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [context]})
        down, mid = dcontrol(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        # diffusers applies a mid residual only together with down residuals: give it zeros
        zeros = [torch.zeros_like(d) for d in down]
        ref = dunet(x, t, encoder_hidden_states=context, down_block_additional_residuals=zeros,
                    mid_block_additional_residual=mid * GUESS_SCALES[len(down)], return_dict=False)[0]
        assert_matches_reference(eps, ref, "apply_model with only_mid_control")


def test_control_list_is_not_consumed():
    """Upstream pops the residuals off the list it is given; ours leaves the caller's list alone."""
    cfg = original_config(TINY_CONFIG)["model"]["params"]
    unet = randomize_(ControlledUnetModel(**cfg["unet_config"]["params"]), seed=7).eval()
    control = randomize_(ControlNet(**cfg["control_stage_config"]["params"]), seed=8).eval()
    x, hint, t, context = inputs(1, (4, 4), 64, seed=9)
    with torch.no_grad():
        outs = control(x, hint, t, context)
        kept = list(outs)
        first = unet(x, t, context, control=outs)
        assert len(outs) == len(control.input_blocks) + 1 and all(a is b for a, b in zip(outs, kept))
        assert torch.equal(first, unet(x, t, context, control=outs))


@pytest.mark.slow
def test_full_size_single_call_matches_diffusers():
    """cldm_v15.yaml sizes, latent 16x16 (image 128x128), batch 1, guess-mode scales. One
    full-size network alive at a time: ours runs, then its tensors move into the diffusers one."""
    cfg = original_config(FULL_CONFIG)
    params = cfg["model"]["params"]
    x, hint, t, context = inputs(1, (16, 16), 768, seed=10)
    t = torch.tensor([501])

    with torch.device("meta"):
        control = ControlNet(**params["control_stage_config"]["params"])
    control = randomize_(control.to_empty(device="cpu"), seed=11).eval()
    with torch.no_grad():
        outs = control(x, hint, t, context)
    checkpoint = {f"control_model.{k}": v for k, v in control.state_dict().items()}
    del control
    unet_cfg, control_cfg = diffusers_configs(cfg, checkpoint)
    dcontrol = diffusers_model(ControlNetModel, control_cfg, convert_controlnet_checkpoint(checkpoint, control_cfg))
    del checkpoint
    with torch.no_grad():
        down, mid = dcontrol(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    del dcontrol
    gc.collect()
    ref_outs = list(down) + [mid]
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_matches_reference(o, r, f"full-size control residual {i}")

    with torch.device("meta"):
        unet = ControlledUnetModel(**params["unet_config"]["params"])
    unet = randomize_(unet.to_empty(device="cpu"), seed=12).eval()
    with torch.no_grad():
        eps = unet(x, t, context, control=[c * s for c, s in zip(outs, GUESS_SCALES)])
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    del unet
    dunet = diffusers_model(UNet2DConditionModel, unet_cfg, convert_ldm_unet_checkpoint(checkpoint, unet_cfg))
    del checkpoint
    control = [c * s for c, s in zip(ref_outs, GUESS_SCALES)]
    with torch.no_grad():
        ref = dunet(x, t, encoder_hidden_states=context, down_block_additional_residuals=control[:-1],
                    mid_block_additional_residual=control[-1], return_dict=False)[0]
    del dunet
    gc.collect()
    assert_matches_reference(eps, ref, "full-size eps")
