"""FastRunner: fast mode's generation, composed of its parts (nets, precompute, step, graph cache,
fallback). Steps 3-9 of upstream's process() from the edge map and the joined prompt."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Optional

import torch

from runtime import inputs, lowvram
from runtime.fast import fallback
from runtime.fast.graphs import GraphCache, Key
from runtime.fast.nets import FastNets
from runtime.fast.options import FastOptions
from runtime.fast.precompute import CrossKV, EmbOut, Precompute, ddim_schedule
from runtime.fast.step import Step, control_rows, model_calls
from runtime.errors import require_finite
from runtime.prompt_cache import PromptCache
from runtime.seed import seeded_noise

logger = logging.getLogger(__name__)

SCHEDULES = 8   # DDIM schedules kept, by (steps, eta): a few KB each


@contextlib.contextmanager
def _cudnn_benchmark(on):
    """cudnn.benchmark for the duration of a fast-mode call (the flag is global: restore it)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


class FastRunner:
    """Fast-mode generation on a ControlLDM. Converts the model's networks in place
    and owns the model until close() (runtime/fast/nets.py says what that means)."""

    def __init__(self, model, options: Optional[FastOptions] = None,
                 prompts: Optional[PromptCache] = None):
        """`prompts`: the PromptCache for the text encoder (None: a new one)."""
        self.model = model
        self.device = model.device
        self.options = o = options or FastOptions.for_device(self.device)
        self.prompts = prompts if prompts is not None else PromptCache()
        self.kv, self.embo = CrossKV(), EmbOut()
        self.pre = Precompute(model, o.dtype, o.channels_last)   # before the nets convert
        self.nets = FastNets(model, o, self.kv, self.embo)
        with self._on_device():
            self.step = Step(self.nets, self.pre, self.kv, self.embo, o, self.device)
        self._run_step = torch.compile(self.step, mode=o.compile) if o.compile else self.step
        self.graphs = GraphCache(o.graph_cache_size)
        self._schedules = {}
        self._entry = None        # the graph entry of the last sampling (its decode graph)
        self.last_info = {}

    # -- the parts, for callers and tests ----------------------------------------------------------
    unet = property(lambda self: self.nets.unet)
    control = property(lambda self: self.nets.control)
    vae = property(lambda self: self.nets.vae)
    kernel_handle = property(lambda self: self.nets.handle)
    kernels_active = property(lambda self: self.nets.kernels_active)

    def graph_keys(self):
        """Keys of the cached graph entries, least recently used first."""
        return self.graphs.keys()

    def fp32(self, names=("unet", "control", "vae")):
        """Context: the model with the original fp32 weights of `names` and upstream's forwards."""
        return self.nets.fp32(names)

    def close(self):
        """Free the graphs and give the model back exactly as it was."""
        self.graphs.clear()
        self.nets.close()

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode=False, strength=1.0, scale=9.0,
               eta=0.0, callback: Optional[Callable[[int, int], None]] = None, control_scales=None):
        """DDIM-sample latents [B, 4, h, w] (float32), as DDIMSampler.sample with the reference's
        conditioning (cond with control; uncond without control in guess mode).

        hint: [1 or B, 3, H, W] float in [0, 1]; ctx_c/ctx_u: [B, L, D] CLIP outputs; x_T: noise.
        callback(done, total) is called after every step. Per-step noise for eta > 0 is drawn from
        the global generator like the reference does.
        Returns (latents, info) with info["first_eps"] (the guided eps of step 0) and flags.
        """
        self.nets._check_open()
        with self._on_device(), _cudnn_benchmark(self.options.cudnn_benchmark):
            if not self.nets.unpark():      # low-VRAM: the ControlNet back, at a new address
                logger.debug("low-VRAM: the ControlNet came back at another address: the "
                             "graphs are captured again")
                self.graphs.clear()
            return self._sample(hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta,
                                callback, control_scales)

    def _sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta, callback,
                control_scales):
        o = self.options
        batch, _, h, w = x_T.shape
        cfg = ctx_u is not None and scale != 1.0
        key = Key(h, w, batch, bool(guess_mode), cfg, bool(self.model.only_mid_control),
                  ctx_c.shape[1])
        if control_scales is None:
            control_scales = inputs.control_scales(strength, guess_mode)
        sched, emb_table = self._schedule(steps, eta)
        e = self.graphs.get(key)
        self._load(e, hint.to(self.device), ctx_c, ctx_u if cfg else ctx_c, control_scales, scale,
                   x_T)
        tables = None
        if o.precompute:
            embo_table, where = self.embo.table(
                (self.unet, self.control), sched.timesteps,
                lambda ts: self.pre.time_embeddings(ts, self.device, torch.float32), o.dtype,
                self.device)
            e.embo = self.embo.views(e.bufs.put("embo", embo_table[0]), where)
            tables = emb_table, embo_table
        graph = o.cuda_graph and self.device.type == "cuda" and e.capture_error is None
        if graph and e.graph is None:
            self._load_step(e, sched, tables, 0)
            e.capture(self._run_step, self.device)
            graph = e.graph is not None
        first_eps = None
        for i in range(len(sched.timesteps)):
            self._load_step(e, sched, tables, i)
            if eta > 0:
                e.bufs["noise"].copy_(torch.randn(x_T.shape, device=self.device))
            if graph:
                e.graph.replay()
            else:
                self._run_step(e)
            if i == 0:
                first_eps = e.bufs["eps"].clone()
            if callback is not None:
                callback(i + 1, len(sched.timesteps))
        x = e.bufs["x"].clone()
        self._entry = e
        bad = bool(e.bufs["bad"]) or not bool(torch.isfinite(x).all())
        info = {"graph": graph, "capture_error": e.capture_error, "nonfinite": bad,
                "first_eps": first_eps, "steps": len(sched.timesteps)}
        self.last_info = info
        return x, info

    def _schedule(self, steps, eta):
        """(Schedule, time-embedding table or None) of (steps, eta): made on first use and kept
        (SCHEDULES of them): the model's noise schedule never changes, and making one costs a
        few dozen host round trips (DDIMSampler.make_schedule, its values read back)."""
        key = (int(steps), float(eta))
        hit = self._schedules.pop(key, None)
        if hit is None:
            sched = ddim_schedule(self.model, steps, eta, self.device)
            emb = (self.pre.time_embeddings(sched.timesteps, self.device)
                   if self.options.precompute else None)
            hit = (sched, emb)
        self._schedules[key] = hit      # most recently used last
        while len(self._schedules) > SCHEDULES:
            self._schedules.pop(next(iter(self._schedules)))
        return hit

    def _load(self, e, hint, ctx_c, ctx_u, scales, scale, x_T):
        """Fill an entry's static buffers for one generation (the text K/V only when the
        contexts differ from the last ones the entry held)."""
        o, b, key, dev, dt = self.options, e.bufs, e.key, self.device, self.options.dtype
        zeros = torch.zeros(x_T.shape, device=dev)
        b.put("x", x_T.to(dev, torch.float32))
        b.put("noise", zeros)
        b.put("eps", zeros)
        b.put("bad", torch.zeros((), dtype=torch.bool, device=dev))
        b.put("sc", torch.zeros(4, device=dev))
        b.put("gscale", torch.tensor(float(scale), device=dev))
        b.put("cscales", torch.tensor(scales, dtype=torch.float32).to(dev, dt))
        rows = control_rows(key, o.batched_cfg)
        if hint.shape[0] not in (1, key.batch):
            raise ValueError(f"hint batch {hint.shape[0]}: must be 1 or the batch ({key.batch})")
        # The hint at the ControlNet's rows ([uncond; cond] in a batched call): one buffer shape
        # whatever the hint's own batch.
        if o.precompute:
            g = self.pre.guided_hint(hint)
            b.put("g", self.pre.fmt(g.repeat(rows // g.shape[0], 1, 1, 1)))
            b.put("emb", torch.zeros((2, self.pre.time_embed_unet[-1].out_features), device=dev,
                                     dtype=dt))
        else:
            b.put("hint", self.pre.fmt(hint.to(dt).repeat(rows // hint.shape[0], 1, 1, 1)))
            b.put("t", torch.zeros(1, dtype=torch.long, device=dev))
        ctx_c, ctx_u = ctx_c.to(dev, dt), ctx_u.to(dev, dt)
        if o.precompute:
            if e.texts is not None and all(torch.equal(old, new) for old, new in
                                           zip(e.texts, (ctx_c, ctx_u))):
                return      # a repeated prompt: its text K/V are in the buffers already
            e.texts = (ctx_c.clone(), ctx_u.clone())
        both = torch.cat([ctx_u, ctx_c])
        contexts = {"cond": (ctx_c, ctx_c), "uncond": (ctx_u, ctx_u),
                    "both": (both, ctx_c if key.guess else both)}   # (UNet, ControlNet)
        for name, _ in model_calls(key, o.batched_cfg):
            cu, cc = contexts[name]
            if o.precompute:
                kv = self.kv.compute(self.unet, cu)
                kv.update(self.kv.compute(self.control, cc))
                e.kv[name] = {m: (b.put(f"{name}.k{i}", k), b.put(f"{name}.v{i}", v))
                              for i, (m, (k, v)) in enumerate(kv.items())}
            else:
                b.put("ctx_u_" + name, cu)
                b.put("ctx_c_" + name, cc)

    def _load_step(self, e, sched, tables, i):
        """Step i's values into the static buffers: the schedule's scalars, and the time
        embeddings and their ResBlock projections (`tables`, with precompute) or the timestep."""
        b = e.bufs
        b["sc"].copy_(sched.scalars[i])
        if tables is not None:
            b["emb"].copy_(tables[0][i])
            b["embo"].copy_(tables[1][i])
        else:
            b["t"].fill_(sched.timesteps[i])

    # -- decoding and the whole generation ------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z):
        """Latents -> images in [-1, 1], float32 [B, 3, H, W]: VAE in vae_dtype; non-finite output
        is decoded again in fp32 (with a warning)."""
        o = self.options
        with self._on_device(), _cudnn_benchmark(o.cudnn_benchmark), \
                lowvram.resident(self.nets.decoding, self.device):   # low-VRAM: host VAE, for now
            x = self._vae_decode(z)
            if o.nan_check and not bool(torch.isfinite(x).all()):
                x = fallback.decode_in_fp32(self.nets, z, o.vae_dtype)
        return x

    def _vae_decode(self, z):
        """The fast VAE's decode of latents z, float32 [B, 3, H, W] (no fallback)."""
        o = self.options
        zs = (1.0 / self.model.scale_factor) * z
        if o.vae_channels_last:
            zs = zs.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(zs.to(o.vae_dtype)).float()

    def _decode_replay(self, e):
        """The uint8 images of e.bufs["x"] (the last sampling's latents) from a CUDA graph of the
        decode, captured on first use (FastOptions.decode_graph; graphs.Entry.capture_decode);
        None where the capture failed or an image is not finite: the caller then decodes eagerly
        (with decode()'s fp32 fallback, the same as without the graph)."""
        with self._on_device():
            if e.decoder is None and e.decoder_error is None:
                with _cudnn_benchmark(self.options.cudnn_benchmark):
                    e.capture_decode(lambda: self._decode_u8(e.bufs["x"]), self.device)
            if e.decoder is None:
                return None
            graph, (images, finite) = e.decoder
            graph.replay()
            # read now: the outputs live in the step graph's pool, which its next replay reuses
            return list(images.cpu().numpy()) if bool(finite) else None

    def _decode_u8(self, z):
        """(to_uint8's values of decode(z) as one [B, H, W, 3] uint8 tensor, whether decode(z)
        is all finite), on the device: what the decode graph runs."""
        x = self._vae_decode(z)
        return _uint8(x), torch.isfinite(x).all()

    def encode(self, texts):
        """CLIP outputs of `texts` through the prompt cache; in low-VRAM mode CLIP comes to the
        device only on a miss (a repeated prompt moves nothing)."""
        clip = self.model.cond_stage_model
        with self._on_device():
            return self.prompts.encode(self.model, texts,
                                       around=lambda: lowvram.resident(clip, self.device))

    @staticmethod
    def to_uint8(x):
        """[B, 3, H, W] in [-1, 1] -> list of HxWx3 uint8 (clip, then truncate, as upstream)."""
        return list(_uint8(x).cpu().numpy())

    @torch.no_grad()
    def generate(self, detected_map, prompt, n_prompt, num_samples, ddim_steps, guess_mode,
                 strength, scale, seed, eta, callback=None):
        """detected_map (HxWx3 uint8 edge map, already through HWC3), prompt (already joined with
        a_prompt) -> a list of num_samples uint8 images.

        detected_map and seed may be lists of one length (edge maps of one size): one batch of
        num_samples rows per map, each map's rows starting from its own seed's noise."""
        t0 = time.perf_counter()
        maps = detected_map if isinstance(detected_map, list) else [detected_map]
        seeds = seed if isinstance(seed, list) else [seed]
        H, W = maps[0].shape[:2]
        n = int(num_samples)
        B = n * len(maps)
        # uint8 over the bus (a quarter of the float bytes), converted to float on the device (an
        # exact conversion: the same values), divided there as before
        hints = [torch.from_numpy(m.copy()).to(self.device).permute(2, 0, 1).float() / 255.0
                 for m in maps]
        # one map: one hint row (its rows are identical); several: num_samples rows per map
        hint = hints[0][None] if len(maps) == 1 else torch.stack(hints).repeat_interleave(n, 0)
        # One CLIP call for both prompts (rows are independent), expanded to the batch; in fp32
        # whatever CLIP's dtype (as the sampler and the fp32 redo take it)
        ctx = self.encode([prompt, n_prompt]).to(self.device, torch.float32)
        ctx_c = ctx[0:1].expand(B, -1, -1).contiguous()
        ctx_u = ctx[1:2].expand(B, -1, -1).contiguous()
        # x_T as the reference sampler draws it: seed_everything, then randn (CLIP draws nothing)
        x_T = torch.cat([seeded_noise(s, (n, 4, H // 8, W // 8), self.device) for s in seeds])
        z, info = self.sample(hint, ctx_c, ctx_u, x_T, ddim_steps, guess_mode, strength, scale,
                              eta, callback)
        if info["nonfinite"]:
            z = fallback.redo_in_fp32(self.nets, self.options.dtype, hint, ctx_c, ctx_u, x_T,
                                      ddim_steps, guess_mode, strength, scale, eta)
            info["redone_fp32"] = True
        self.nets.park()        # low-VRAM: the ControlNet's memory for the decode and CLIP
        o, images = self.options, None
        if (o.decode_graph and info["graph"] and not info.get("redone_fp32")
                and not self.nets.low_vram):
            images = self._decode_replay(self._entry)
        info["decode_graph"] = images is not None
        if images is None:
            x = self.decode(z)
            require_finite(x, "fast mode, also after its float32 redo" if o.nan_check
                           else "fast mode, nan_check off")
            images = self.to_uint8(x)
        info["seconds"] = time.perf_counter() - t0
        self.last_info = info
        return images

    def reference_sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta):
        """The reference sampler (fp32, upstream numerics) on the model's fp32 weights, same x_T."""
        with self.fp32() as model:
            return fallback.reference_sample(model, hint, ctx_c, ctx_u, x_T, steps, guess_mode,
                                             strength, scale, eta)


def _uint8(x):
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 on x's device (clip, then truncate)."""
    return (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
