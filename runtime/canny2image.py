"""canny2image's process() (upstream's gradio_canny2image.py, spec §4.10) as a class.

Reference mode runs exactly upstream's steps in float32 with cldm/ddim_hacked.py's sampler:
resize + Canny, hint tensor, seed, CLIP cond/uncond, control scales, DDIM, VAE decode, uint8 by
truncation; the result is [255 - edge map] + samples. Every parameter is checked first
(runtime/inputs.py: the rules the CLI and the demo share).
"""
import random

import numpy as np
import torch

from annotator.canny import CannyDetector
from annotator.util import HWC3, resize_image
from cldm.ddim_hacked import DDIMSampler
from runtime.errors import InputError, require_finite
from runtime.inputs import MODES, check_inputs, control_scales
from runtime.seed import seed_everything


class Canny2Image:
    """process(...) of upstream's canny2image demo for one model (ControlLDM)."""

    def __init__(self, model, mode="reference"):
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        # HOOK (fast mode): runtime/fast.py's runner (fp16 copies, graphs) serves `_generate`.
        self.fast = None
        if mode == "fast":
            from runtime.fast import FastRunner
            self.fast = FastRunner(model)
        self.model = model
        self.mode = mode
        self.apply_canny = CannyDetector()
        self.ddim_sampler = DDIMSampler(model)
        self.last_seed = None

    def check(self, *args, **kwargs):
        """check_inputs(...) for this pipeline (the same checks for every mode)."""
        return check_inputs(*args, **kwargs)

    @torch.no_grad()
    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold,
                progress=None):
        """Return [255 - edge map] + num_samples images, all uint8 HxWx3.

        progress(done, total), if given, is called after every DDIM step.
        """
        (input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
         guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) = self.check(
            input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
            guess_mode, strength, scale, seed, eta, low_threshold, high_threshold)
        img = resize_image(HWC3(input_image), image_resolution)
        detected_map = HWC3(self.apply_canny(img, low_threshold, high_threshold))
        if seed == -1:
            seed = random.randint(0, 65535)
        samples = self._generate(detected_map, prompt + ", " + a_prompt, n_prompt, num_samples,
                                 ddim_steps, guess_mode, strength, scale, seed, eta, progress)
        return [255 - detected_map] + samples

    def _generate(self, detected_map, prompt, n_prompt, num_samples, ddim_steps, guess_mode,
                  strength, scale, seed, eta, progress):
        """Steps 3-9 of upstream's process() (spec §4.10), from the HxWx3 edge map and the joined
        prompt to num_samples uint8 images. HOOK (fast mode): the fast runner replaces this."""
        if self.fast is not None:
            self.last_seed = seed
            return self.fast.generate(detected_map, prompt, n_prompt, num_samples, ddim_steps,
                                      guess_mode, strength, scale, seed, eta, progress)
        model, device = self.model, self.model.device
        H, W = detected_map.shape[:2]

        control = torch.from_numpy(detected_map.copy()).float().to(device) / 255.0
        control = torch.stack([control for _ in range(num_samples)], dim=0)
        control = control.permute(0, 3, 1, 2).clone()

        self.last_seed = seed_everything(seed)

        cond = {"c_concat": [control],
                "c_crossattn": [model.get_learned_conditioning([prompt] * num_samples)]}
        un_cond = {"c_concat": None if guess_mode else [control],
                   "c_crossattn": [model.get_learned_conditioning([n_prompt] * num_samples)]}
        shape = (4, H // 8, W // 8)

        model.control_scales = control_scales(strength, guess_mode)
        callback = None
        if progress is not None:
            sampler = self.ddim_sampler

            def callback(i):
                progress(i + 1, len(sampler.ddim_timesteps))

        samples, _ = self.ddim_sampler.sample(
            ddim_steps, num_samples, shape, cond, verbose=False, eta=eta,
            unconditional_guidance_scale=scale, unconditional_conditioning=un_cond,
            callback=callback)

        x_samples = model.decode_first_stage(samples)
        require_finite(x_samples, "reference mode")      # a check only: finite values unchanged
        x_samples = (x_samples.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy()
        x_samples = x_samples.clip(0, 255).astype(np.uint8)
        return [x_samples[i] for i in range(num_samples)]
