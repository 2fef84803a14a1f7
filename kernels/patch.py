"""Swap the Triton kernels into a model, per instance, with a handle that can undo it.

    handle = kernels.patch(model)              # or: with kernels.patched(model) as handle: ...
    handle.counts["group_norm"]                # {'sites': 88, 'calls': 0, 'fallbacks': 0, ...}
    handle.undo()

How: the walk replaces `forward` (or ResBlock's `_forward`) in the *instance* dict of the modules
it patches; classes, submodule objects, parameters and state_dict keys are never touched, so
`undo()` only has to delete those instance attributes and every object is the very same one.
A GroupNorm followed by an nn.SiLU in a Sequential (ResBlock in/out_layers, the UNet's `out`)
becomes one fused GN+SiLU call in slot 0 while slot 1's forward becomes the identity, so the
Sequential keeps its length and indices (upstream code indexes into them).

Sites (module classes of the port): CrossAttention, CLIPAttention (causal), VAE AttnBlock (d=512
→ SDPA by design, counted as "sdpa"), nn.LayerNorm, GEGLU, CLIPMLP (quick-GELU), every
nn.GroupNorm (GroupNorm32: eps 1e-5; plain: eps 1e-6 — the module's own eps is used), ResBlock
(fused emb add + GN + SiLU), VAE ResnetBlock (GN + swish fused), standalone nn.SiLU.

Fusions (`fusions=`, names in FUSIONS; kernels/_fused.py): block forwards that run convolutions
without their bias and fold it, the residual adds and layout changes into the kernels around them
(ResBlock, SpatialTransformer, BasicTransformerBlock, self-attention's q/k/v, 1x1 convolutions).
They are installed before the per-op sites and count under their own names in `counts`.

Every patched forward runs under the CUDA device of its input (Triton launches on the current
device: `platform.on_input_device`), and checks device, dtype, layout and autograd, and falls
back to the original
forward when the kernel cannot run, counting the reason; `strict=True` raises instead (the tests
use it so nothing passes on a fallback). CONTROLNET_KERNELS_DISABLE="attention,group_norm"
(or "all") switches kernels off. Without Triton, or without a GPU outside the interpreter, the
model is left as it is (`handle.reason` says why) except for the sites that need no Triton.

Sites that need no Triton (kernels/_torch_sites.py), off unless asked for: `sdpa=True` runs every
CrossAttention that the Triton attention does not take through F.scaled_dot_product_attention;
`cross_kv=lookup` makes every attn2 read the per-generation constant K/V of the text from
`lookup(module) -> (k, v)` ([B, heads, L, d]) when called without a context (fast mode's
precompute); `emb_out=lookup` makes every ResBlock's emb_layers return `lookup(emb_layers)`
([1, C], the projection of the current timestep's embedding, expanded to the rows of its input),
or compute it when the lookup has none (counted as a fallback). Patching an already patched model
returns a handle whose `undo()` leaves the outer patch in place, so `kernels.patched()` nests.
"""

from __future__ import annotations

import logging
import os
import types

import torch
import torch.nn as nn

from . import platform

logger = logging.getLogger(__name__)

KERNELS = ("attention", "group_norm", "layer_norm", "geglu", "silu")
TORCH_SITES = ("sdpa", "cross_kv", "emb_out")  # counted like kernels; need no Triton
# Block-level fusions (kernels/_fused.py says what each does). DEFAULT_FUSIONS: those measured
# faster on the H200 / H100 (benchmarks/results/fusions_h200.md, bench_h100_20261207_*.md);
# `fusions=None` means these.
# "skip_cat" and "ddim_update" have no patch site: fast mode's decoder (runtime/fast/split.py)
# calls kernels.residual's skip_cat, and its step (runtime/fast/step.py) kernels.ddim's
# ddim_update, through handle.run when the handle lists them. ddim_update (the guidance combine
# and the DDIM update in one kernel instead of ~24, bit-identical): H100 176.2 vs 178.2 ms a 512²
# image without it (bench_h100_20261207_72a5f6c.md).
FUSIONS = ("conv_bias", "spatial_transformer", "qkv", "add_layer_norm", "conv1x1_bias",
           "skip_cat", "ddim_update", "conv_gemm", "geglu_gemm", "ff_residual")
# conv_gemm is not a default: it halves the 4x4 convolutions' time at 256² but adds two copy
# kernels per call, and end to end it measured within noise (kernels/_fused.py, H200 2026-12-03).
# geglu_gemm is a default since the H100 measured it 1.27x cuBLAS + the GEGLU kernel at the
# projections it takes (platform's MAX_K; none on AMD, not measured there) and no slower end to
# end (benchmarks/results/bench_h100_20261207_5940542.md). ff_residual (needs add_layer_norm) is a
# default since both H100 calls that measured it beside geglu_gemm had the loop faster with it
# (155.4 vs 158.3 ms and 156.9 vs 158.1 at 512², 82.3 vs 83.2 and 83.7 vs 83.8 at 256²;
# bench_h100_20261207_72a5f6c.md, _5940542.md), 23 add kernels a step fewer, eps error and
# PSNR as without it (1.06-1.08e-2, 59.0-59.1 dB); it is not bit-identical to the add kernel.
OPT_IN_FUSIONS = ("conv_gemm",)
DEFAULT_FUSIONS = tuple(f for f in FUSIONS if f not in OPT_IN_FUSIONS)
ENV_DISABLE = "CONTROLNET_KERNELS_DISABLE"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HANDLE_ATTR = "_kernels_patch_handle"  # plain attribute on the root: never in state_dict


class KernelFallback(RuntimeError):
    """Raised in strict mode where a patched forward would fall back to PyTorch."""


def _tensor_reason(x):
    if not isinstance(x, torch.Tensor):
        return "not a tensor"
    if not platform.kernel_device_ok(x):
        return f"device {x.device.type}"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}"
    if x.requires_grad and torch.is_grad_enabled():
        return "autograd (kernels are forward-only)"
    return None


def _dense_reason(x):
    r = _tensor_reason(x)
    if r is None and not (x.is_contiguous() or (
            x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        r = "layout (not contiguous / channels_last)"
    return r


def _identity(self, x, *args, **kwargs):
    return x


class PatchHandle:
    """What `patch` changed: counts per kernel, and `undo()` (idempotent). A context manager."""

    def __init__(self, model, strict, enabled, fusions=()):
        self.model = model
        self.strict = strict
        self.enabled = enabled
        self.fusions = tuple(fusions)
        self.attention_policy = None  # (module, self_attention) -> use the Triton kernel?
        self.active = False
        self.reason = ""
        counted = KERNELS + tuple(k for k in TORCH_SITES if enabled.get(k)) + self.fusions
        self.counts = {k: {"sites": 0, "calls": 0, "fallbacks": 0, "reasons": {}} for k in counted}
        self.counts["attention"]["sdpa"] = 0
        for name in ("conv1x1_bias", "conv_gemm", "geglu_gemm"):
            if name in self.counts:
                self.counts[name]["unfused"] = 0  # inputs it is not for (NCHW, large maps)
        self._qkv_cache = {}  # fusion "qkv": module -> (weights' key, concatenated weight)
        self._changes = []  # (module, attribute name, previous instance value or _MISSING, new)

    def __repr__(self):
        summary = {k: (v["sites"], v["calls"], v["fallbacks"]) for k, v in self.counts.items()}
        return f"PatchHandle(active={self.active}, (sites, calls, fallbacks)={summary}, reason={self.reason!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    # -- bookkeeping -------------------------------------------------------------------------
    def _set(self, module, name, fn, kernel=None):
        prev = module.__dict__.get(name, _MISSING)
        new = types.MethodType(fn, module)
        if fn is not _identity:  # every kernel launch under its input's device (platform.py)
            new = platform.on_input_device(new)
        module.__dict__[name] = new  # instance attribute: shadows the class's method
        self._changes.append((module, name, prev, new))
        if kernel is not None:
            self.counts[kernel]["sites"] += 1

    def undo(self):
        for module, name, prev, new in reversed(self._changes):
            if module.__dict__.get(name) is not new:
                logger.warning("kernels.patch: %s.%s was replaced after patching; left as it is",
                               type(module).__name__, name)
                continue
            if prev is _MISSING:
                del module.__dict__[name]
            else:
                module.__dict__[name] = prev
        self._changes = []
        self._qkv_cache.clear()
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self.active = False

    def run(self, kernel, reason, fast, slow):
        """Run `fast()` (counted) unless `reason`; else `slow()` (counted), or raise if strict."""
        c = self.counts[kernel]
        if reason is None:
            try:
                out = fast()
            except Exception as e:  # a kernel failure must not stop generation (unless strict)
                if self.strict:
                    raise
                reason = f"error {type(e).__name__}: {e}"[:200]
                logger.warning("kernels.patch: %s kernel failed (%s); using PyTorch", kernel, reason)
            else:
                c["calls"] += 1
                return out
        if self.strict:
            raise KernelFallback(f"{kernel}: would fall back ({reason})")
        c["fallbacks"] += 1
        c["reasons"][reason] = c["reasons"].get(reason, 0) + 1
        return slow()


_MISSING = object()


class NestedHandle:
    """What `patch` returns for a model that is already patched: the outer handle's counts and
    state, but `undo()` (and leaving a `with` block) leaves the outer patch in place."""

    def __init__(self, outer):
        self.outer = outer

    def __getattr__(self, name):
        return getattr(self.outer, name)

    def __repr__(self):
        return f"NestedHandle({self.outer!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def undo(self):
        """A no-op: the patch belongs to the outer handle."""


def _disabled_from_env():
    raw = os.environ.get(ENV_DISABLE, "").strip().lower()
    if raw in ("1", "all", "true", "yes"):
        return set(KERNELS) | set(FUSIONS)
    return {s.strip() for s in raw.split(",") if s.strip()}


def _fusion_names(fusions):
    names = DEFAULT_FUSIONS if fusions is None else tuple(fusions)
    unknown = set(names) - set(FUSIONS)
    if unknown:
        raise ValueError(f"kernels.patch: unknown fusions {sorted(unknown)} (known: {FUSIONS})")
    off = _disabled_from_env()
    return tuple(f for f in FUSIONS if f in names and f not in off)


def patch(model: nn.Module, *, attention=True, group_norm=True, layer_norm=True, geglu=True,
          silu=True, sdpa=False, cross_kv=None, emb_out=None, fusions=None,
          strict=False) -> PatchHandle:
    """Patch `model`'s instances; `fusions`: names from FUSIONS (None: DEFAULT_FUSIONS, (): none).
    `attention` may be a policy `(module, self_attention) -> bool` that picks the Triton kernel per
    CrossAttention module (the others are left to `sdpa`).
    A fusion that needs a kernel family (conv_bias: group_norm, add_layer_norm: layer_norm) is
    only installed with that family on."""
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        return NestedHandle(existing)  # patching twice is a no-op; its undo leaves the outer
    enabled = dict(attention=attention, group_norm=group_norm, layer_norm=layer_norm,
                   geglu=geglu, silu=silu)
    off = _disabled_from_env()
    unknown = off - set(KERNELS) - set(FUSIONS)
    if unknown:
        logger.warning("%s: unknown kernel names %s (known: %s)", ENV_DISABLE, sorted(unknown), KERNELS)
    enabled = {k: bool(v) and k not in off for k, v in enabled.items()}
    enabled.update(sdpa=bool(sdpa), cross_kv=cross_kv is not None, emb_out=emb_out is not None)
    handle = PatchHandle(model, strict, enabled, _fusion_names(fusions))
    handle.attention_policy = attention if callable(attention) else None
    from . import _torch_sites  # no Triton needed: installed wherever torch runs
    if cross_kv is not None:
        _torch_sites.install_cross_kv(handle, model, cross_kv, sdpa)
    if emb_out is not None:
        _torch_sites.install_emb_out(handle, model, emb_out)
    usable, why = platform.kernels_usable()
    if usable and not any(enabled[k] for k in KERNELS) and not handle.fusions:
        usable, why = False, f"all kernels disabled ({ENV_DISABLE} or arguments)"
    if usable:
        from . import _sites  # imports triton: only once we know it is there
        _sites.install(handle, model)
    if sdpa:
        _torch_sites.install_sdpa(handle, model)
    handle.reason = why
    if handle._changes:
        model.__dict__[_HANDLE_ATTR] = handle
        handle.active = True
        logger.info("kernels.patch: %s", handle)
    else:
        logger.info("kernels.patch: model left unpatched: %s", why)
    return handle


def patched(model: nn.Module, **kwargs) -> PatchHandle:
    """`with kernels.patched(model) as h:` — patched inside the block, restored after it (on a
    model that is already patched: the outer patch stays)."""
    return patch(model, **kwargs)
