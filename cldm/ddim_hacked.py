"""DDIM sampler as canny2image runs it (upstream's cldm/ddim_hacked.py; spec §4.8).

Kept from upstream on purpose: classifier-free guidance as two separate model calls (cond first,
then uncond) combined as e_u + s * (e_c - e_u); a randn drawn every step even when eta == 0;
per-step scalars made with torch.full (float32) from float32 alphas, float64 alphas_prev (a numpy
array) and float64 sigmas; the last step's alpha_prev is alphas_cumprod[0], not 1; step counts
where 1000 // S does not divide evenly give more than S steps (S=6 runs 7).

Changed from upstream:
* Buffers follow the model's device instead of being moved to "cuda".
* Step counts 3, 9, 27, 36 and 37 (and, beyond the UI's 1..100, 101-111, 251-333 and 501-1000)
  crash upstream with an IndexError: 1000 // S divides 999, so the uniform schedule ends at
  timestep 1000 (= num_timesteps). `make_schedule` drops timesteps >= num_timesteps. That is the
  smallest fix: every other count keeps exactly upstream's schedule (the dropped step does not
  exist for them), S=3 becomes 1, 334, 667 (3 steps, as asked) and S=9/27/36/37 run 9/27/36/37
  steps. make_ddim_timesteps itself stays upstream-exact (other code may rely on it).
* No tqdm bar and no print(): `callback(i)` is called after every step (i = 0..N-1, as upstream)
  for progress bars; `verbose` goes to logging.
* The training/inpainting extras (mask, x0, quantize, score corrector, dynamic threshold, ucg
  schedule, noise dropout) raise NotImplementedError instead of running untested code.
"""
import logging

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import (
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    noise_like,
)

logger = logging.getLogger(__name__)


def _unsupported(**options):
    for name, given in options.items():
        if given:
            raise NotImplementedError(
                f"DDIMSampler: '{name}' is not supported by this port (canny2image never uses it)")


class DDIMSampler:
    def __init__(self, model, schedule="linear"):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def register_buffer(self, name, attr):
        if isinstance(attr, torch.Tensor) and attr.device != self.model.device:
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        timesteps = make_ddim_timesteps(
            ddim_discr_method=ddim_discretize,
            num_ddim_timesteps=ddim_num_steps,
            num_ddpm_timesteps=self.ddpm_num_timesteps,
            verbose=verbose,
        )
        timesteps = np.asarray(timesteps)
        # The documented fix for S in {3, 9, 27, 36, 37} (see the module docstring).
        self.ddim_timesteps = timesteps[timesteps < self.ddpm_num_timesteps]

        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")
        alphas_cumprod = alphas_cumprod.detach().clone().to(torch.float32).cpu()
        self.register_buffer("alphas_cumprod", alphas_cumprod)

        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod, ddim_timesteps=self.ddim_timesteps, eta=ddim_eta,
            verbose=verbose)
        # Spec §4.8 dtypes: alphas float32 tensor, alphas_prev float64 numpy array, sigmas float64
        # tensor, sqrt(1 - alphas) float32 tensor. The casts are no-ops on upstream's helpers,
        # except for a one-step schedule (S=1), where upstream's alphas_prev and sigmas come out
        # float32 (np.asarray of a lone float32 tensor); widening them is exact, and the float32
        # scalars fed to torch.full are the same.
        alphas = torch.as_tensor(alphas, dtype=torch.float32)
        self.register_buffer("ddim_sigmas", torch.as_tensor(sigmas, dtype=torch.float64))
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", np.asarray(alphas_prev, dtype=np.float64))
        # numpy's sqrt, as upstream (np.sqrt on the tensor): it is correctly rounded, while
        # torch.sqrt on CPU float32 differs in the last bit for ~20 % of inputs (torch 2.14).
        self.register_buffer("ddim_sqrt_one_minus_alphas",
                             torch.from_numpy(np.sqrt((1. - alphas).numpy())))

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None,
               normals_sequence=None, img_callback=None, quantize_x0=False, eta=0., mask=None,
               x0=None, temperature=1., noise_dropout=0., score_corrector=None,
               corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1., unconditional_conditioning=None,
               dynamic_threshold=None, ucg_schedule=None):
        """Run DDIM for S steps on a batch of `shape` = (C, H, W) latents.

        Returns (samples, intermediates) with intermediates = {"x_inter": [...], "pred_x0": [...]}
        recorded every `log_every_t` indices and at the first step. `normals_sequence` is accepted
        and ignored, as upstream does.
        """
        _unsupported(quantize_x0=quantize_x0, mask=mask is not None, x0=x0 is not None,
                     noise_dropout=noise_dropout != 0., score_corrector=score_corrector is not None,
                     corrector_kwargs=corrector_kwargs is not None,
                     dynamic_threshold=dynamic_threshold is not None,
                     ucg_schedule=ucg_schedule is not None)
        self._check_batch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        C, H, W = shape
        size = (batch_size, C, H, W)
        if verbose:
            logger.info("Data shape for DDIM sampling is %s, eta %s", size, eta)
        return self.ddim_sampling(
            conditioning, size, x_T=x_T, callback=callback, img_callback=img_callback,
            log_every_t=log_every_t, temperature=temperature,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning)

    @staticmethod
    def _check_batch(conditioning, batch_size):
        if conditioning is None:
            return
        first = conditioning
        if isinstance(first, dict):
            first = first[next(iter(first))] if first else None
        while isinstance(first, list) and first:
            first = first[0]
        if isinstance(first, torch.Tensor) and first.shape[0] != batch_size:
            logger.warning("Got %d conditionings but batch-size is %d", first.shape[0], batch_size)

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, callback=None, img_callback=None,
                      log_every_t=100, temperature=1., unconditional_guidance_scale=1.,
                      unconditional_conditioning=None):
        device = self.model.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device) if x_T is None else x_T
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        timesteps = self.ddim_timesteps
        total_steps = timesteps.shape[0]
        for i, step in enumerate(np.flip(timesteps)):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            img, pred_x0 = self.p_sample_ddim(
                img, cond, ts, index=index, temperature=temperature,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, temperature=1., unconditional_guidance_scale=1.,
                      unconditional_conditioning=None):
        b, device = x.shape[0], x.device
        s, uc = unconditional_guidance_scale, unconditional_conditioning
        if uc is None or s == 1.:
            e_t = self.model.apply_model(x, t, c)
        else:
            e_c = self.model.apply_model(x, t, c)
            e_u = self.model.apply_model(x, t, uc)
            e_t = e_u + s * (e_c - e_u)
        if getattr(self.model, "parameterization", "eps") == "v":
            raise NotImplementedError("v-parameterized models are not supported (canny2image is eps)")

        # Python/numpy scalars into torch.full: float32 tensors, as upstream.
        a_t = torch.full((b, 1, 1, 1), self.ddim_alphas[index].item(), device=device)
        a_prev = torch.full((b, 1, 1, 1), float(self.ddim_alphas_prev[index]), device=device)
        sigma_t = torch.full((b, 1, 1, 1), self.ddim_sigmas[index].item(), device=device)
        sqrt_one_minus_at = torch.full(
            (b, 1, 1, 1), self.ddim_sqrt_one_minus_alphas[index].item(), device=device)

        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * noise_like(x.shape, device) * temperature
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0
