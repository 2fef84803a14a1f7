"""Fast mode: the same canny2image generation as reference mode, within fp16 tolerance, faster.

What it does differently from the reference path (each one a toggle in `FastOptions`, so the
benchmark's ablation is configuration):

* ``dtype``: private copies of the UNet, ControlNet and VAE in fp16 (or bf16). fp32 stays where
  numerics need it: CLIP (run on the caller's fp32 model: cheap, and fp16 CLIP risks its -inf
  mask), the timestep embeddings and the hint block (computed once per generation with the fp32
  weights), softmax (SDPA accumulates in fp32), the guidance combine and the DDIM update (fp32
  latents, the reference's float32 per-step scalars). The VAE decodes in fp16; a non-finite result
  is decoded again in fp32 with a warning.
* ``kernels``: `kernels.patch` on the copies (Triton GroupNorm etc.); a no-op where unavailable.
* ``batched_cfg``: cond and uncond in one model call of batch 2B (rows [uncond; cond]); guess mode
  runs the ControlNet on the cond half only and adds zero residuals to the uncond half, which is
  exactly upstream's uncond call without control. Guidance scale 1 runs the cond call alone.
* ``precompute``: once per generation: the hint block output, both time-embedding MLPs for every
  timestep of the schedule, and K/V of the text context for every cross-attention (attn2).
  Done here with per-instance forwards on the private copies; the model code knows nothing of it.
* ``channels_last``: UNet + ControlNet in NHWC (H100: 17.1 -> 15.1 ms a step); the VAE stays NCHW
  (it is slower in NHWC: 21.6 -> 27.6 ms).
* ``cuda_graph``: the whole step (ControlNet + UNet + guidance + DDIM update) captured once per
  (latent size, batch, guess mode, guidance on/off) and replayed; per-step values reach it through
  static buffers. Capture failures fall back to eager with the reason logged; the cache is an LRU
  of ``graph_cache_size`` entries, each with its own memory pool, freed on eviction.
* ``two_streams``: the ControlNet and the UNet encoder are independent until the middle block: the
  ControlNet runs on a second stream (inside the graph too) and the UNet decoder waits for it.

Reproducibility: x_T is drawn exactly as the reference sampler draws it (seed_everything, then
torch.randn((B, 4, h, w)) on the model's device), so both modes start from the same noise; for
eta > 0 the per-step noise is the reference's draw as well (eta == 0 draws none: sigma is 0).
A non-finite eps or latent (a device-side flag, read once per generation) makes the generation run
again in fp32 on the reference sampler, with a warning: never a black image.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32, timestep_embedding
from runtime import inputs
from runtime.errors import require_finite
from runtime.seed import seed_everything

logger = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def _as_dtype(d):
    if isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[str(d).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}: use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass
class FastOptions:
    """Switches of fast mode. The defaults are the full fast mode on a GPU."""

    dtype: object = torch.float16       # UNet/ControlNet weights and activations
    vae_dtype: object = None            # None: same as dtype
    kernels: bool = True                # kernels.patch on the private copies
    kernel_attention: bool = False      # the Triton attention too (default: SDPA, cuDNN/flash)
    sdpa: bool = True                   # F.scaled_dot_product_attention in every CrossAttention
    batched_cfg: bool = True
    precompute: bool = True
    channels_last: bool = True
    cuda_graph: bool = True
    two_streams: bool = True
    graph_cache_size: int = 3
    nan_check: bool = True
    cudnn_benchmark: bool = True        # only inside fast-mode calls; restored afterwards

    def __post_init__(self):
        self.dtype = _as_dtype(self.dtype)
        self.vae_dtype = self.dtype if self.vae_dtype is None else _as_dtype(self.vae_dtype)
        if self.graph_cache_size < 1:
            raise ValueError("graph_cache_size must be >= 1")

    @classmethod
    def plain(cls, dtype=torch.float16):
        """The ablation's starting point: the model in `dtype`, eager, SDPA attention (the model's
        own CrossAttention cannot run in fp16 without autocast: fp32 logits meet fp16 V), two CFG
        calls per step, nothing precomputed, NCHW, no kernels, no graph."""
        return cls(dtype=dtype, kernels=False, sdpa=True, batched_cfg=False, precompute=False,
                   channels_last=False, cuda_graph=False, two_streams=False)

    @classmethod
    def for_device(cls, device, **overrides):
        """Full fast mode on CUDA/HIP; on CPU fp32 without graphs or kernels (same logic)."""
        if torch.device(device).type != "cuda":
            base = dict(dtype=torch.float32, kernels=False, channels_last=False, cuda_graph=False,
                        two_streams=False)
            base.update(overrides)
            return cls(**base)
        return cls(**overrides)


# ------------------------------------------------------------------------------------------------
# Attention forwards installed on the private copies (instance attributes; classes untouched)


def _split(m, t):
    # [B, N, heads*d] -> [B, heads, N, d] (head-major channels, as CrossAttention splits them)
    b, n, _ = t.shape
    return t.view(b, n, m.heads, -1).transpose(1, 2)


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _sdpa_forward(m):
    """CrossAttention.forward through SDPA (fp32 softmax inside; no [N, N] logits in memory)."""

    def forward(x, context=None, mask=None):
        if mask is not None:
            raise NotImplementedError("masked attention is not used by canny2image")
        ctx = x if context is None else context
        q, k, v = _split(m, m.to_q(x)), _split(m, m.to_k(ctx)), _split(m, m.to_v(ctx))
        out = F.scaled_dot_product_attention(q, k, v, scale=m.scale)
        return m.to_out(_merge(out))

    return forward


def _cached_kv_forward(m, kv_lookup):
    """attn2 forward that reads K/V of the (per-generation constant) text context from a cache."""

    def forward(x, context=None, mask=None):
        k, v = kv_lookup(m)
        q = _split(m, m.to_q(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=m.scale)
        return m.to_out(_merge(out))

    return forward


def _cross_attentions(module):
    """The attn2 (cross-attention) modules of every BasicTransformerBlock, in module order."""
    return [blk.attn2 for blk in module.modules() if hasattr(blk, "attn2") and hasattr(blk, "attn1")]


def _self_attentions(module):
    return [blk.attn1 for blk in module.modules() if hasattr(blk, "attn2") and hasattr(blk, "attn1")]


# ------------------------------------------------------------------------------------------------
# Forwards of the two networks that take precomputed pieces (the model code stays untouched)


def control_forward(cn, x, emb, context, guided_hint):
    """ControlNet.forward with the hint block output given: 13 residuals (before scaling)."""
    outs = []
    h = x
    for i, (block, zero_conv) in enumerate(zip(cn.input_blocks, cn.zero_convs)):
        h = block(h, emb, context)
        if i == 0:
            h = h + guided_hint
        outs.append(zero_conv(h, emb, context))
    h = cn.middle_block(h, emb, context)
    outs.append(cn.middle_block_out(h, emb, context))
    return outs


def unet_encoder(unet, x, emb, context):
    hs = []
    h = x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    return unet.middle_block(h, emb, context), hs


def unet_decoder(unet, h, hs, emb, context, control):
    """ControlledUnetModel's second half: mid residual, then skip + residual per output block."""
    if control is not None:
        h = h + control[-1]
    for j, block in enumerate(unet.output_blocks):
        skip = hs[-1 - j]
        if control is not None:
            skip = skip + control[-2 - j]
        h = block(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h)


# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Schedule:
    """The reference sampler's DDIM schedule, as tensors on the device."""

    timesteps: list          # python ints, in sampling order (951, 901, ...)
    scalars: torch.Tensor    # [N, 4] float32: a_t, a_prev, sigma, sqrt(1 - a_t)


def ddim_schedule(model, steps, eta, device):
    """The per-step values of cldm.ddim_hacked.DDIMSampler, in its float32 roundings."""
    from cldm.ddim_hacked import DDIMSampler

    s = DDIMSampler(model)
    s.make_schedule(ddim_num_steps=steps, ddim_eta=eta, verbose=False)
    ts = [int(t) for t in np.asarray(s.ddim_timesteps)]
    n = len(ts)
    rows = []
    for i in range(n):
        index = n - 1 - i
        # torch.full with Python floats -> float32, exactly as p_sample_ddim builds them.
        rows.append([float(s.ddim_alphas[index].item()), float(s.ddim_alphas_prev[index]),
                     float(s.ddim_sigmas[index].item()),
                     float(s.ddim_sqrt_one_minus_alphas[index].item())])
    return Schedule(ts[::-1], torch.tensor(rows, dtype=torch.float32, device=device))


@contextlib.contextmanager
def _cudnn_benchmark(on):
    """cudnn.benchmark for the duration of a fast-mode call (the flag is global: restore it)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


class _Entry:
    """Static buffers (and, when captured, the graph) of one (shape, batch, mode) configuration."""

    def __init__(self, key):
        self.key = key
        self.graph = None
        self.pool = None
        self.capture_error = None
        self.bufs = {}
        self.kv = {}             # kv set name -> {attn module: (k, v)}


class FastRunner:
    """Fast-mode generation on a ControlLDM. Keeps private copies of the UNet, ControlNet and VAE
    in `options.dtype`; the caller's model is never modified (reference mode keeps working on it,
    and the fp32 redo uses it)."""

    def __init__(self, model, options: Optional[FastOptions] = None):
        self.model = model
        self.device = model.device
        self.options = options or FastOptions.for_device(self.device)
        o = self.options
        self.dtype = o.dtype
        self.unet = self._copy(model.model.diffusion_model, o.dtype, o.channels_last)
        self.control = self._copy(model.control_model, o.dtype, o.channels_last)
        self.vae = self._copy(model.first_stage_model, o.vae_dtype, False)
        self.kernel_handle = None
        self.kernels_active = False
        if o.kernels:
            self._patch_kernels()
        self._kv_current = None
        self._attn_patched = []
        self._install_attention()
        self._graphs = collections.OrderedDict()
        self._side_stream = None
        self.last_info = {}

    # -- construction ----------------------------------------------------------------------------

    def _copy(self, module, dtype, channels_last):
        m = copy.deepcopy(module).to(dtype=dtype).eval().requires_grad_(False)
        # GroupNorm32 normalizes x.float(): its affine parameters stay fp32 (as upstream's
        # convert_to_fp16 leaves norms alone); torch's group_norm wants them in the input's dtype.
        for sub in m.modules():
            if isinstance(sub, GroupNorm32):
                sub.float()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        return m

    def _patch_kernels(self):
        try:
            import kernels
            patch = kernels.patch
        except (ImportError, AttributeError) as e:
            logger.info("fast mode: kernels.patch unavailable (%s); using PyTorch ops", e)
            return
        holder = nn.ModuleDict({"unet": self.unet, "control": self.control, "vae": self.vae})
        try:
            self.kernel_handle = patch(holder, attention=self.options.kernel_attention)
        except Exception as e:  # a kernel problem must never stop generation
            logger.warning("fast mode: kernels.patch failed (%s: %s); using PyTorch ops",
                           type(e).__name__, e)
            return
        self.kernels_active = bool(getattr(self.kernel_handle, "active", False))
        logger.info("fast mode: %s", self.kernel_handle)

    def _install_attention(self):
        o = self.options
        for net in (self.unet, self.control):
            if o.sdpa:
                for m in _self_attentions(net):
                    if "forward" not in m.__dict__:      # leave a kernel's forward in place
                        m.forward = _sdpa_forward(m)
                        self._attn_patched.append(m)
            for m in _cross_attentions(net):
                if o.precompute:
                    m.forward = _cached_kv_forward(m, self._kv_lookup)
                    self._attn_patched.append(m)
                elif o.sdpa and "forward" not in m.__dict__:
                    m.forward = _sdpa_forward(m)
                    self._attn_patched.append(m)

    def _kv_lookup(self, m):
        return self._kv_current[m]

    # -- per-generation precomputation -------------------------------------------------------------

    def time_embeddings(self, timesteps):
        """[N, 2, 1280] in self.dtype: (UNet, ControlNet) time_embed of each timestep, in fp32
        with the caller's fp32 weights, then cast."""
        t = torch.tensor(timesteps, dtype=torch.long, device=self.device)
        temb = timestep_embedding(t, self.unet.time_embed[0].in_features)
        with torch.no_grad():
            eu = self.model.model.diffusion_model.time_embed(temb.to(self._ref_dtype()))
            ec = self.model.control_model.time_embed(temb.to(self._ref_dtype()))
        return torch.stack([eu, ec], dim=1).to(self.dtype)

    def _ref_dtype(self):
        return next(self.model.control_model.parameters()).dtype

    def guided_hint(self, hint):
        """input_hint_block(hint) with the caller's fp32 weights, cast to self.dtype."""
        with torch.no_grad():
            g = self.model.control_model.input_hint_block(hint.to(self._ref_dtype()), None, None)
        return self._fmt(g.to(self.dtype))

    def _fmt(self, t):
        if self.options.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def cross_kv(self, net, context):
        """{attn2 module: (K, V)} for `context` ([Bm, 77, D] in self.dtype), as [Bm, heads, 77, d]."""
        out = {}
        for m in _cross_attentions(net):
            out[m] = (_split(m, m.to_k(context)).contiguous(), _split(m, m.to_v(context)).contiguous())
        return out

    # -- the step ------------------------------------------------------------------------------------

    def _calls(self, guess, cfg):
        """The model calls of one step: list of (name, kv set, rows of x, ControlNet rows)."""
        o = self.options
        if not cfg:
            return [("cond", False)]
        if o.batched_cfg:
            return [("both", None)]
        return [("cond", False), ("uncond", guess)]

    def _new_entry(self, key):
        h, w, batch, guess, cfg = key
        o, dev, dt = self.options, self.device, self.dtype
        e = _Entry(key)
        b = e.bufs
        lat = (batch, 4, h, w)
        b["x"] = torch.zeros(lat, device=dev)
        b["noise"] = torch.zeros(lat, device=dev)
        b["eps"] = torch.zeros(lat, device=dev)
        b["bad"] = torch.zeros((), dtype=torch.bool, device=dev)
        b["sc"] = torch.zeros(4, device=dev)
        b["gscale"] = torch.ones((), device=dev)
        b["cscales"] = torch.ones(13, device=dev, dtype=dt)
        b["t"] = torch.zeros(1, dtype=torch.long, device=dev)
        b["emb"] = torch.zeros((2, self.unet.time_embed[-1].out_features), device=dev, dtype=dt)
        return e

    def _load(self, e, hint, ctx_c, ctx_u, strength_scales, scale, x_T):
        """Fill an entry's static buffers for one generation (tensors already on the device)."""
        o, b = self.options, e.bufs
        h, w, batch, guess, cfg = e.key
        b["x"].copy_(x_T)
        b["bad"].zero_()
        b["noise"].zero_()
        b["gscale"].fill_(float(scale))
        b["cscales"].copy_(torch.tensor(strength_scales, dtype=torch.float32).to(b["cscales"]))
        ctx_c, ctx_u = ctx_c.to(self.dtype), ctx_u.to(self.dtype)
        if o.precompute:
            g = self.guided_hint(hint)
            if "g" not in b or b["g"].shape != g.shape:
                b["g"] = torch.empty_like(g)
            b["g"].copy_(g)
        else:
            hint = self._fmt(hint.to(self.dtype))
            if "hint" not in b or b["hint"].shape != hint.shape:
                b["hint"] = torch.empty_like(hint)
            b["hint"].copy_(hint)
        contexts = {"cond": (ctx_c, ctx_c), "uncond": (ctx_u, ctx_u),
                    "both": (torch.cat([ctx_u, ctx_c]), ctx_c if guess else torch.cat([ctx_u, ctx_c]))}
        for name, _ in self._calls(guess, cfg):
            cu, cc = contexts[name]
            if o.precompute:
                kv = dict(self.cross_kv(self.unet, cu))
                kv.update(self.cross_kv(self.control, cc))
                dst = e.kv.setdefault(name, {})
                for m, (k, v) in kv.items():
                    if m not in dst or dst[m][0].shape != k.shape:
                        dst[m] = (torch.empty_like(k), torch.empty_like(v))
                    dst[m][0].copy_(k)
                    dst[m][1].copy_(v)
            else:
                for key_, c in (("ctx_u_" + name, cu), ("ctx_c_" + name, cc)):
                    if key_ not in b or b[key_].shape != c.shape:
                        b[key_] = torch.empty_like(c)
                    b[key_].copy_(c)

    def _model_eps(self, e, name, control_off_uncond):
        """One UNet(+ControlNet) call of the step; returns eps in self.dtype."""
        o, b = self.options, e.bufs
        h, w, batch, guess, cfg = e.key
        x = b["x"].to(self.dtype)
        if name == "both":
            x = torch.cat([x, x])
        x = self._fmt(x)
        rows = x.shape[0]
        if o.precompute:
            emb_u = b["emb"][0:1].expand(rows, -1)
            emb_c = b["emb"][1:2]
            ctx_u = ctx_c = None
            self._kv_current = e.kv[name]
        else:
            temb = timestep_embedding(b["t"], self.unet.time_embed[0].in_features).to(self.dtype)
            emb_u = self.unet.time_embed(temb).expand(rows, -1)
            emb_c = self.control.time_embed(temb)
            ctx_u, ctx_c = b["ctx_u_" + name], b["ctx_c_" + name]
        # Which rows get the ControlNet: all, the cond half (guess mode, batched), or none.
        if name == "uncond" and control_off_uncond:
            xc = None
        elif name == "both" and guess:
            xc = x[batch:]
        else:
            xc = x
        if xc is not None:
            emb_c = emb_c.expand(xc.shape[0], -1)
            if o.precompute:
                g = b["g"]
            else:
                g = self.control.input_hint_block(b["hint"], None, None)
            if g.shape[0] != 1 and g.shape[0] != xc.shape[0]:
                g = torch.cat([g] * (xc.shape[0] // g.shape[0]))

        def run_control():
            res = control_forward(self.control, xc, emb_c, ctx_c, g)
            res = [r * b["cscales"][i] for i, r in enumerate(res)]
            if xc is not None and xc.shape[0] != rows:      # guess mode: zero uncond residuals
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            return res

        side = self._side_stream if (o.two_streams and xc is not None and x.is_cuda) else None
        if side is not None:
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                control = run_control()
            hm, hs = unet_encoder(self.unet, x, emb_u, ctx_u)
            cur.wait_stream(side)
        else:
            control = run_control() if xc is not None else None
            hm, hs = unet_encoder(self.unet, x, emb_u, ctx_u)
        return unet_decoder(self.unet, hm, hs, emb_u, ctx_u, control)

    def _step(self, e):
        """One DDIM step on e.bufs["x"] in place (graph-capturable: no host syncs)."""
        b = e.bufs
        h, w, batch, guess, cfg = e.key
        calls = self._calls(guess, cfg)
        outs = [self._model_eps(e, name, off).float() for name, off in calls]
        if not cfg:
            eps = outs[0]
        else:
            if len(outs) == 1:
                e_u, e_c = outs[0].chunk(2)
            else:
                e_c, e_u = outs
            eps = e_u + b["gscale"] * (e_c - e_u)
        x = b["x"]
        a_t, a_prev, sigma, s1m = (b["sc"][i].view(1, 1, 1, 1) for i in range(4))
        pred_x0 = (x - s1m * eps) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma * b["noise"]
        if self.options.nan_check:
            torch.logical_or(b["bad"], ~torch.isfinite(eps).all(), out=b["bad"])
        b["eps"].copy_(eps)
        x.copy_(x_prev)

    # -- graphs --------------------------------------------------------------------------------------

    def _entry(self, key):
        e = self._graphs.get(key)
        if e is not None:
            self._graphs.move_to_end(key)
            return e
        e = self._new_entry(key)
        self._graphs[key] = e
        while len(self._graphs) > self.options.graph_cache_size:
            _, old = self._graphs.popitem(last=False)
            self._free(old)
        return e

    def _free(self, e):
        e.graph = None
        e.pool = None
        e.bufs.clear()
        e.kv.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clear_graphs(self):
        while self._graphs:
            self._free(self._graphs.popitem()[1])

    def _use_graph(self, e):
        o = self.options
        return o.cuda_graph and self.device.type == "cuda" and e.capture_error is None

    def _capture(self, e):
        """Warm up (cudnn benchmark, Triton autotune, lazy init) on a side stream, then capture."""
        saved = {k: v.clone() for k, v in e.bufs.items() if k in ("x", "bad", "eps")}
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step(e)
            torch.cuda.current_stream().wait_stream(s)
            e.pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=e.pool):
                self._step(e)
            e.graph = g
            logger.info("fast mode: captured the step for %s", e.key)
        except Exception as err:
            e.graph = None
            e.pool = None
            e.capture_error = f"{type(err).__name__}: {err}"
            logger.warning("fast mode: CUDA graph capture failed for %s, running eager: %s",
                           e.key, e.capture_error)
            torch.cuda.synchronize()
        for k, v in saved.items():
            e.bufs[k].copy_(v)

    # -- public API ----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode=False, strength=1.0, scale=9.0,
               eta=0.0, callback: Optional[Callable[[int, int], None]] = None, control_scales=None):
        """DDIM-sample latents [B, 4, h, w] (float32), as DDIMSampler.sample with the reference's
        conditioning (cond with control; uncond without control in guess mode).

        hint: [1 or B, 3, H, W] float in [0, 1]; ctx_c/ctx_u: [B, 77, D] CLIP outputs; x_T: noise.
        callback(done, total) is called after every step. Per-step noise for eta > 0 is drawn from the global generator like the reference does.
        Returns (latents, info) with info["first_eps"] (the guided eps of step 0) and flags.
        """
        with _cudnn_benchmark(self.options.cudnn_benchmark):
            return self._sample(hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta,
                                callback, control_scales)

    def _sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta, callback,
                control_scales):
        o = self.options
        if self.device.type == "cuda" and o.two_streams and self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        batch, _, h, w = x_T.shape
        cfg = ctx_u is not None and scale != 1.0
        key = (h, w, batch, bool(guess_mode), cfg)
        if control_scales is None:
            control_scales = inputs.control_scales(strength, guess_mode)
        sched = ddim_schedule(self.model, steps, eta, self.device)
        e = self._entry(key)
        hint = hint.to(self.device)
        self._load(e, hint, ctx_c, ctx_u if cfg else ctx_c, control_scales, scale, x_T)
        emb_table = self.time_embeddings(sched.timesteps) if o.precompute else None
        graph = self._use_graph(e)
        if graph and e.graph is None:
            self._load_step(e, sched, emb_table, 0)
            self._capture(e)
            graph = e.graph is not None
        first_eps = None
        for i in range(len(sched.timesteps)):
            self._load_step(e, sched, emb_table, i)
            if eta > 0:
                e.bufs["noise"].copy_(torch.randn(x_T.shape, device=self.device))
            if graph:
                e.graph.replay()
            else:
                self._step(e)
            if i == 0:
                first_eps = e.bufs["eps"].clone()
            if callback is not None:
                callback(i + 1, len(sched.timesteps))
        x = e.bufs["x"].clone()
        bad = bool(e.bufs["bad"]) or not bool(torch.isfinite(x).all())
        info = {"graph": graph, "capture_error": e.capture_error, "nonfinite": bad,
                "first_eps": first_eps, "steps": len(sched.timesteps)}
        self.last_info = info
        return x, info

    def _load_step(self, e, sched, emb_table, i):
        b = e.bufs
        b["sc"].copy_(sched.scalars[i])
        if emb_table is not None:
            b["emb"].copy_(emb_table[i])
        else:
            b["t"].fill_(sched.timesteps[i])

    @torch.no_grad()
    def decode(self, z):
        """Latents -> images in [-1, 1], float32 [B, 3, H, W]: VAE in vae_dtype; non-finite output
        is decoded again in fp32 with the caller's model (with a warning)."""
        zs = (1.0 / self.model.scale_factor) * z
        with _cudnn_benchmark(self.options.cudnn_benchmark):
            x = self.vae.decode(zs.to(self.options.vae_dtype)).float()
        if self.options.nan_check and not bool(torch.isfinite(x).all()):
            logger.warning("fast mode: VAE decode in %s gave non-finite values; decoding in fp32",
                           self.options.vae_dtype)
            x = self.model.decode_first_stage(z.float()).float()
        return x

    @staticmethod
    def to_uint8(x):
        """[B, 3, H, W] in [-1, 1] -> list of HxWx3 uint8 (clip, then truncate, as upstream)."""
        y = (x.permute(0, 2, 3, 1) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
        return list(y.cpu().numpy())

    @torch.no_grad()
    def generate(self, detected_map, prompt, n_prompt, num_samples, ddim_steps, guess_mode,
                 strength, scale, seed, eta, callback=None):
        """Steps 3-9 of upstream's process(): detected_map (HxWx3 uint8 edge map, already through
        HWC3), prompt (already joined with a_prompt). Returns a list of num_samples uint8 images."""
        t0 = time.perf_counter()
        H, W = detected_map.shape[:2]
        B = int(num_samples)
        hint = torch.from_numpy(detected_map.copy()).float().to(self.device) / 255.0
        hint = hint.permute(2, 0, 1)[None]                       # one copy; rows are identical
        seed_everything(seed)
        # One CLIP call for both prompts (rows are independent), expanded to the batch.
        ctx = self.model.get_learned_conditioning([prompt, n_prompt])
        ctx_c = ctx[0:1].expand(B, -1, -1).contiguous()
        ctx_u = ctx[1:2].expand(B, -1, -1).contiguous()
        x_T = torch.randn((B, 4, H // 8, W // 8), device=self.device)
        z, info = self.sample(hint, ctx_c, ctx_u, x_T, ddim_steps, guess_mode, strength, scale,
                              eta, callback)
        if info["nonfinite"]:
            logger.warning("fast mode: non-finite latents in %s; redoing this generation in fp32 "
                           "on the reference sampler", self.dtype)
            z = self.reference_sample(hint.expand(B, -1, -1, -1), ctx_c, ctx_u, x_T, ddim_steps,
                                      guess_mode, strength, scale, eta)
            info["redone_fp32"] = True
        x = self.decode(z)
        require_finite(x, "fast mode, also after its float32 redo" if self.options.nan_check
                       else "fast mode, nan_check off")
        images = self.to_uint8(x)
        info["seconds"] = time.perf_counter() - t0
        self.last_info = info
        return images

    @torch.no_grad()
    def reference_sample(self, hint, ctx_c, ctx_u, x_T, steps, guess_mode, strength, scale, eta):
        """The reference sampler (fp32, upstream numerics) on the caller's model, same x_T."""
        from cldm.ddim_hacked import DDIMSampler

        m = self.model
        B = x_T.shape[0]
        hint = hint.to(self._ref_dtype())
        cond = {"c_concat": [hint], "c_crossattn": [ctx_c]}
        un_cond = {"c_concat": None if guess_mode else [hint], "c_crossattn": [ctx_u]}
        m.control_scales = inputs.control_scales(strength, guess_mode)
        z, _ = DDIMSampler(m).sample(steps, B, tuple(x_T.shape[1:]), cond, verbose=False, eta=eta,
                                     unconditional_guidance_scale=scale,
                                     unconditional_conditioning=un_cond, x_T=x_T)
        return z
