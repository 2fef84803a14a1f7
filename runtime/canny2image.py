"""canny2image's process() (upstream's gradio_canny2image.py, spec §4.10) as a class.

Reference mode runs exactly upstream's steps in float32 with cldm/ddim_hacked.py's sampler:
resize + Canny, hint tensor, seed, CLIP cond/uncond, control scales, DDIM, VAE decode, uint8 by
truncation; the result is [255 - edge map] + samples. Every parameter is checked first
(runtime/inputs.py: the rules the CLI and the demo share), then the memory the call needs
(runtime/memory.py: refused up front if the device cannot hold it).

Fast mode (runtime/fast/) converts the model's UNet, ControlNet and VAE in place and owns the
model until `close()`; reference mode on the same model object meanwhile runs on the original
fp32 weights (brought from host memory for each call), so its results do not change.

Threads: calls on one model (one Canny2Image, or several on the same model) run one at a time
(a lock per model), and the seeded noise is drawn under runtime/seed.py's RNG_LOCK (held for
the whole run where it draws every step: reference mode, or eta > 0), so a call gives the images
a serial call with the same seed gives; reference runs on two models therefore take turns.
`cancel=` (a threading.Event) stops a call at the next DDIM step with runtime.errors.Cancelled.
"""
import contextlib
import random
import threading
import weakref

import numpy as np
import torch

from annotator.canny import CannyDetector
from annotator.util import HWC3, resize_image
from cldm.ddim_hacked import DDIMSampler
from cldm.hack import sliced_attention_enabled
from runtime import lowvram, memory
from runtime.errors import Cancelled, InputError, require_finite
from runtime.fast import FastRunner, owner
from runtime.inputs import MODES, check_inputs, control_scales, resized_shape
from runtime.prompt_cache import PromptCache
from runtime.seed import RNG_LOCK, seeded_noise

_MODEL_LOCKS = weakref.WeakKeyDictionary()      # model -> the lock of the calls that use it
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model):
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


def _steps(progress, cancel):
    """The per-step callback (done, total): reports progress, then raises Cancelled if `cancel`
    is set."""
    def step(done, total):
        if progress is not None:
            progress(done, total)
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after DDIM step {done} of {total}")
    return step


def _check_cancel(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the first DDIM step")


class Canny2Image:
    """process(...) of upstream's canny2image demo for one model (ControlLDM)."""

    def __init__(self, model, mode="reference", options=None):
        """`options`: a runtime.fast.FastOptions for mode "fast" (None: its defaults for the
        model's device)."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if options is not None and mode != "fast":
            raise InputError(f"options are for mode 'fast', not {mode!r}")
        self.prompts = PromptCache()      # CLIP results of recent prompts (bit-identical)
        # Under low-VRAM mode the fast runner keeps its fp16 UNet and ControlNet resident and
        # brings CLIP and the VAE in for their phase (runtime/fast/nets.py, runtime/lowvram.py).
        self.fast = FastRunner(model, options, self.prompts) if mode == "fast" else None
        self.model = model
        self.mode = mode
        self.apply_canny = CannyDetector()
        self.ddim_sampler = DDIMSampler(model)
        self.last_seed = None
        self._lock = _model_lock(model)

    def close(self):
        """Fast mode: free its graphs and give the model back as it was. Reference mode: no-op."""
        if self.fast is not None:
            self.fast.close()

    def check(self, *args, **kwargs):
        """check_inputs(...) for this pipeline (the same checks for every mode)."""
        return check_inputs(*args, **kwargs)

    def check_memory(self, shape, image_resolution, rows):
        """runtime.memory.check for `rows` samples of an image of `shape` resized to
        image_resolution (None: already resized): MemoryNeedError before any work if the
        device cannot hold the call."""
        height, width = shape[:2]
        if image_resolution is not None:
            height, width = resized_shape(height, width, image_resolution)
        memory.check(self.model, height, width, rows, self.mode,
                     sliced=sliced_attention_enabled(), device=self.model.device)

    @torch.no_grad()
    def process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold,
                progress=None, cancel=None):
        """Return [255 - edge map] + num_samples images, all uint8 HxWx3.

        progress(done, total), if given, is called after every DDIM step. cancel: a
        threading.Event (anything with is_set()); once set, the call raises
        runtime.errors.Cancelled at the next DDIM step.
        """
        with self._lock:
            return self._process(input_image, prompt, a_prompt, n_prompt, num_samples,
                                 image_resolution, ddim_steps, guess_mode, strength, scale, seed,
                                 eta, low_threshold, high_threshold, progress, cancel)

    def _process(self, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                 ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                 high_threshold, progress, cancel):
        (input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
         guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) = self.check(
            input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
            guess_mode, strength, scale, seed, eta, low_threshold, high_threshold)
        self.check_memory(input_image.shape, image_resolution, num_samples)
        img = resize_image(HWC3(input_image), image_resolution)
        detected_map = HWC3(self.apply_canny(img, low_threshold, high_threshold))
        if seed == -1:
            seed = random.randint(0, 65535)
        samples = self._generate(detected_map, prompt + ", " + a_prompt, n_prompt, num_samples,
                                 ddim_steps, guess_mode, strength, scale, seed, eta, progress,
                                 cancel)
        return [255 - detected_map] + samples

    @torch.no_grad()
    def process_batch(self, input_images, seeds, prompt, a_prompt, n_prompt, num_samples,
                      image_resolution, ddim_steps, guess_mode, strength, scale, eta,
                      low_threshold, high_threshold, progress=None, cancel=None):
        """process() for several images in one model batch of len(images) * num_samples rows:
        image i gets the edge map and the starting noise of process(..., seed=seeds[i], ...).

        Needs eta == 0 (for eta > 0 the per-step noise is drawn for the whole batch, so it would
        differ from one call per image) and images whose edge maps have one size. The images can
        still differ from one process() call per image in the last bits of a pixel: matrix
        kernels may sum in another order at another batch size. Returns one process() result per
        image. progress, cancel: as for process()."""
        with self._lock:
            return self._process_batch(input_images, seeds, prompt, a_prompt, n_prompt,
                                       num_samples, image_resolution, ddim_steps, guess_mode,
                                       strength, scale, eta, low_threshold, high_threshold,
                                       progress, cancel)

    def _process_batch(self, input_images, seeds, prompt, a_prompt, n_prompt, num_samples,
                       image_resolution, ddim_steps, guess_mode, strength, scale, eta,
                       low_threshold, high_threshold, progress, cancel):
        if eta != 0:
            raise InputError("process_batch needs eta == 0: for eta > 0 the per-step noise of a "
                             "batch differs from one process() call per image")
        maps, checked_seeds = [], []
        for image, seed in zip(input_images, seeds, strict=True):
            (image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
             guess_mode, strength, scale, seed, eta, low_threshold, high_threshold) = self.check(
                image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                guess_mode, strength, scale, seed, eta, low_threshold, high_threshold)
            if seed == -1:
                raise InputError("process_batch needs explicit seeds (not -1)")
            img = resize_image(HWC3(image), image_resolution)
            maps.append(HWC3(self.apply_canny(img, low_threshold, high_threshold)))
            checked_seeds.append(seed)
        if len({m.shape for m in maps}) > 1:
            raise InputError(f"process_batch needs edge maps of one size, got "
                             f"{sorted({m.shape[:2] for m in maps})}")
        self.check_memory(maps[0].shape, None, len(maps) * int(num_samples))
        samples = self._generate(maps, prompt + ", " + a_prompt, n_prompt, num_samples,
                                 ddim_steps, guess_mode, strength, scale, checked_seeds, eta,
                                 progress, cancel)
        n = int(num_samples)
        return [[255 - m] + samples[i * n:(i + 1) * n] for i, m in enumerate(maps)]

    def _generate(self, detected_map, prompt, n_prompt, num_samples, ddim_steps, guess_mode,
                  strength, scale, seed, eta, progress, cancel=None):
        """Steps 3-9 of upstream's process() (spec §4.10), from the HxWx3 edge map and the joined
        prompt to num_samples uint8 images.

        detected_map and seed may be lists (process_batch): num_samples rows per map, each map's
        rows starting from its own seed's noise, drawn as a call for that map alone draws it.
        A run that draws from the global generators every step holds RNG_LOCK throughout, so
        that no run in another thread reseeds them or draws from them meanwhile: fast mode with
        eta > 0, and reference mode always (upstream's sampler draws every step, even at eta 0,
        where the draw is multiplied by 0 but still advances the generators)."""
        _check_cancel(cancel)
        step = _steps(progress, cancel)
        draws_per_step = eta != 0 or self.fast is None
        with RNG_LOCK if draws_per_step else contextlib.nullcontext():
            if self.fast is not None:
                self.last_seed = seed[0] if isinstance(seed, list) else seed
                return self.fast.generate(detected_map, prompt, n_prompt, num_samples,
                                          ddim_steps, guess_mode, strength, scale, seed, eta,
                                          step)
            fast_owner = owner(self.model)   # a fast-mode pipeline holds the model: its fp32
            with fast_owner.fp32() if fast_owner is not None else contextlib.nullcontext():
                return self._reference(detected_map, prompt, n_prompt, num_samples, ddim_steps,
                                       guess_mode, strength, scale, seed, eta, step)

    def _reference(self, detected_map, prompt, n_prompt, num_samples, ddim_steps, guess_mode,
                   strength, scale, seed, eta, progress):
        model, device = self.model, self.model.device
        maps = detected_map if isinstance(detected_map, list) else [detected_map]
        seeds = seed if isinstance(seed, list) else [seed]
        H, W = maps[0].shape[:2]
        shape = (4, H // 8, W // 8)
        batch = num_samples * len(maps)

        controls = []
        for m in maps:
            control = torch.from_numpy(m.copy()).float().to(device) / 255.0
            control = torch.stack([control for _ in range(num_samples)], dim=0)
            controls.append(control.permute(0, 3, 1, 2).clone())
        control = controls[0] if len(maps) == 1 else torch.cat(controls)

        # each map's x_T as upstream's sampler draws it right after seeding with its seed
        x_T = torch.cat([seeded_noise(s, (num_samples, *shape), device) for s in seeds])
        self.last_seed = seeds[0]

        lowvram.shift(model, is_diffusing=False)
        cond = {"c_concat": [control],
                "c_crossattn": [self.prompts.encode(model, [prompt] * batch)]}
        un_cond = {"c_concat": None if guess_mode else [control],
                   "c_crossattn": [self.prompts.encode(model, [n_prompt] * batch)]}

        lowvram.shift(model, is_diffusing=True)
        model.control_scales = control_scales(strength, guess_mode)
        sampler = self.ddim_sampler

        def callback(i):
            progress(i + 1, len(sampler.ddim_timesteps))

        samples, _ = self.ddim_sampler.sample(
            ddim_steps, batch, shape, cond, verbose=False, eta=eta,
            unconditional_guidance_scale=scale, unconditional_conditioning=un_cond,
            callback=callback, x_T=x_T)

        lowvram.shift(model, is_diffusing=False)
        x_samples = model.decode_first_stage(samples)
        require_finite(x_samples, "reference mode")      # a check only: finite values unchanged
        x_samples = (x_samples.permute(0, 2, 3, 1) * 127.5 + 127.5).cpu().numpy()
        x_samples = x_samples.clip(0, 255).astype(np.uint8)
        return [x_samples[i] for i in range(batch)]
