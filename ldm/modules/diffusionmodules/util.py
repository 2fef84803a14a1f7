"""Building blocks shared by the UNet, the ControlNet and the samplers: schedules, timestep
embedding, normalization and thin layer factories."""
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

logger = logging.getLogger(__name__)


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Betas as a float64 numpy array. "linear" interpolates linearly in sqrt(beta) (SD's
    "scaled_linear"), all in float64. Computed with torch on the host (torch's linspace, as
    upstream; the result is numpy, so the CPU is explicit even under a meta default device)."""
    cpu64 = dict(dtype=torch.float64, device="cpu")
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, **cpu64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, **cpu64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, **cpu64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, **cpu64) ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown.")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """DDIM's subset of DDPM timesteps, shifted by +1 as upstream does.

    With "uniform" the count can exceed `num_ddim_timesteps` (1000 // S rounds down) and some S
    reach step 1000, which is out of range for a 1000-step schedule; both are upstream behaviour.
    """
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    steps_out = ddim_timesteps + 1
    if verbose:
        logger.info("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    """(sigmas, alphas, alphas_prev) for the DDIM update; alphas_prev of the first step is
    alphacums[0], not 1. `alphacums` may be a numpy array or a CPU tensor (upstream passes the
    float32 tensor; alphas_prev is then float64 numpy and sigmas a float64 tensor)."""
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        logger.info("For the chosen value of eta, which is %s, this results in sigma_t schedule %s", eta, sigmas)
    return sigmas, alphas, alphas_prev


def checkpoint(func, inputs, params, flag):
    """Gradient checkpointing of `func(*inputs)` when `flag` is set and autograd is recording.
    Numerically a plain call; under no_grad (inference) it is one. `params` is kept for
    upstream's signature: torch's non-reentrant checkpoint finds the parameters itself."""
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding [N, dim]: cos first, then sin.

    freqs = exp((-ln(max_period) * k) / half) in float32, multiplied before dividing, and built on
    the default device then moved, as upstream does: changing any of that moves the last ulp.
    """
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(device=timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero the parameters of `module` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, result cast back."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """GroupNorm32 with 32 groups (eps 1e-5, affine)."""
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs):
    """nn.Linear."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def noise_like(shape, device, repeat=False):
    """Standard normal noise; with `repeat`, one draw shared across the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)
