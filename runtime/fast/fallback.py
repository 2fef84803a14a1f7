"""The fp32 fallback of fast mode: never a black image.

A non-finite eps or latent (a device-side flag, read once per generation) makes the generation
run again on the reference sampler in fp32; a non-finite decoded image is decoded again in fp32.
Both run inside FastNets.fp32(): the original fp32 weights, brought from host memory for the
duration only, and upstream's own forwards (the kernel patch is off meanwhile).
"""
from __future__ import annotations

import logging

import torch

from runtime import inputs

logger = logging.getLogger(__name__)


@torch.no_grad()
def reference_sample(model, hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta):
    """cldm.ddim_hacked.DDIMSampler (upstream's numerics) on `model` from the same x_T. `model`
    must be in fp32 (inside FastNets.fp32())."""
    from cldm.ddim_hacked import DDIMSampler

    B = x_T.shape[0]
    hint = hint.float().expand(B, -1, -1, -1)
    cond = {"c_concat": [hint], "c_crossattn": [ctx_c]}
    un_cond = {"c_concat": None if guess_mode else [hint], "c_crossattn": [ctx_u]}
    model.control_scales = inputs.control_scales(strength, guess_mode)
    z, _ = DDIMSampler(model).sample(steps, B, tuple(x_T.shape[1:]), cond, verbose=False, eta=eta,
                                     unconditional_guidance_scale=scale,
                                     unconditional_conditioning=un_cond, x_T=x_T)
    return z


def redo_in_fp32(nets, dtype, *args):
    """reference_sample(*args) with the fp32 weights, after a non-finite run in `dtype`."""
    logger.warning("fast mode: non-finite latents in %s; redoing this generation in fp32 on the "
                   "reference sampler", dtype)
    with nets.fp32(("unet", "control")) as model:      # the sampler needs no VAE
        return reference_sample(model, *args)


def decode_in_fp32(nets, z, dtype):
    """model.decode_first_stage(z) with the fp32 VAE, after a non-finite decode in `dtype`."""
    logger.warning("fast mode: VAE decode in %s gave non-finite values; decoding in fp32", dtype)
    with nets.fp32(("vae",)) as model:
        return model.decode_first_stage(z.float()).float()
