"""DDPM / LatentDiffusion: the inference side of upstream's Lightning modules, as plain nn.Modules.

Kept: construction (same parameters; training-only ones are accepted and ignored), the noise
schedule buffers, the first/cond stage models, get_learned_conditioning, decode_first_stage and
apply_model. Left out: losses, EMA, optimizers, logging, checkpoint loading in the constructor.
"""
import types

import numpy as np
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


def disabled_train(self, mode=True):
    """Replaces `.train` of frozen submodules so that they stay in eval mode."""
    return self


def _freeze(model):
    model = model.eval()
    model.train = types.MethodType(disabled_train, model)
    for param in model.parameters():
        param.requires_grad = False
    return model


class DDPM(nn.Module):
    """Noise schedule and the denoiser `model` (a DiffusionWrapper); eps-parameterization."""

    def __init__(
        self,
        unet_config,
        timesteps=1000,
        beta_schedule="linear",
        loss_type="l2",
        ckpt_path=None,
        ignore_keys=(),
        load_only_unet=False,
        monitor="val/loss",
        use_ema=True,
        first_stage_key="image",
        image_size=256,
        channels=3,
        log_every_t=100,
        clip_denoised=True,
        linear_start=1e-4,
        linear_end=2e-2,
        cosine_s=8e-3,
        given_betas=None,
        original_elbo_weight=0.0,
        v_posterior=0.0,
        l_simple_weight=1.0,
        conditioning_key=None,
        parameterization="eps",
        scheduler_config=None,
        use_positional_encodings=False,
        learn_logvar=False,
        logvar_init=0.0,
        make_it_fit=False,
        ucg_training=None,
        reset_ema=False,
        reset_num_ema_updates=False,
    ):
        super().__init__()
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError('currently only supporting "eps", "x0" and "v"')
        if use_ema:
            raise NotImplementedError("EMA weights (use_ema=True) are training-only and not part of this port")
        if ckpt_path is not None:
            raise NotImplementedError("load weights with cldm.model.load_state_dict, not through ckpt_path")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        self.v_posterior = v_posterior
        self.register_schedule(
            given_betas=given_betas,
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
        )
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=logvar_init, size=(self.num_timesteps,))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar)

    @property
    def device(self):
        """The device `.to()` put the model on (Lightning's `device`): that of the schedule
        buffers, which ControlLDM.low_vram_shift leaves in place while it moves the networks."""
        return self.betas.device

    def register_schedule(
        self,
        given_betas=None,
        beta_schedule="linear",
        timesteps=1000,
        linear_start=1e-4,
        linear_end=2e-2,
        cosine_s=8e-3,
    ):
        """Schedule buffers, computed in float64 numpy and stored as float32 (upstream's values)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

        (timesteps,) = betas.shape
        self.num_timesteps = int(timesteps)
        self.linear_start = linear_start
        self.linear_end = linear_end

        def buffer(name, value, persistent=True):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=persistent)

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        buffer("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod))
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))

        # q(x_{t-1} | x_t, x_0)
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        buffer("posterior_variance", posterior_variance)
        # log of a variance that is 0 at t = 0: clipped
        buffer("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

        # VLB term weights (training only); the t = 0 entry divides by zero and takes t = 1's value.
        # Computed from the float32 buffers, as upstream does.
        if self.parameterization == "eps":
            lvlb_weights = self.betas**2 / (
                2 * self.posterior_variance * torch.tensor(alphas, dtype=torch.float32) * (1 - self.alphas_cumprod)
            )
        elif self.parameterization == "x0":
            lvlb_weights = torch.tensor(0.5 * np.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod), dtype=torch.float32)
        else:
            lvlb_weights = torch.ones_like(self.betas)
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)


class LatentDiffusion(DDPM):
    """DDPM in the latent space of `first_stage_model` (VAE), conditioned by `cond_stage_model`."""

    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        num_timesteps_cond=None,
        cond_stage_key="image",
        cond_stage_trainable=False,
        concat_mode=True,
        cond_stage_forward=None,
        conditioning_key=None,
        scale_factor=1.0,
        scale_by_std=False,
        force_null_conditioning=False,
        *args,
        **kwargs,
    ):
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        self.scale_by_std = scale_by_std
        assert self.num_timesteps_cond <= kwargs["timesteps"]
        # for backwards compatibility after implementation of DiffusionWrapper
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False

    def register_schedule(self, *args, **kwargs):
        super().register_schedule(*args, **kwargs)
        # A shortened conditioning schedule (num_timesteps_cond > 1) only affects training.
        self.shorten_cond_schedule = self.num_timesteps_cond > 1

    def instantiate_first_stage(self, config):
        self.first_stage_model = _freeze(instantiate_from_config(config))

    def instantiate_cond_stage(self, config):
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        elif self.cond_stage_trainable:
            self.cond_stage_model = instantiate_from_config(config)
        else:
            self.cond_stage_model = _freeze(instantiate_from_config(config))

    def get_learned_conditioning(self, c):
        """Text (or other conditioning) -> the context tensor, through `cond_stage_model`."""
        if self.cond_stage_forward is None:
            if callable(getattr(self.cond_stage_model, "encode", None)):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        """Latents -> images in [-1, 1]: (1 / scale_factor) * z, then the VAE decoder.
        The reciprocal is a Python float multiplied into z, as upstream does (not z / scale_factor)."""
        if predict_cids:
            raise NotImplementedError("codebook ids (predict_cids) are not implemented in this port")
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        """eps prediction; `cond` is a dict {'c_concat': [...], 'c_crossattn': [...]} or a tensor."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon


class DiffusionWrapper(nn.Module):
    """Holds the denoiser as `diffusion_model` and routes the conditioning to it."""

    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.sequential_cross_attn = diff_model_config.pop("sequential_crossattn", False)
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"):
            raise ValueError(f"unknown conditioning_key {conditioning_key!r}")

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=self._context(c_crossattn))
        if self.conditioning_key == "hybrid":
            return self.diffusion_model(torch.cat([x] + c_concat, dim=1), t, context=self._context(c_crossattn))
        raise NotImplementedError(f"conditioning_key {self.conditioning_key!r} (class conditioning) is not implemented")

    def _context(self, c_crossattn):
        return c_crossattn if self.sequential_cross_attn else torch.cat(c_crossattn, 1)
