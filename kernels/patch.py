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

Every patched forward runs under the CUDA device of its input (Triton launches on the current
device: `platform.on_input_device`), and checks device, dtype, layout and autograd, and falls back to the original
forward when the kernel cannot run, counting the reason; `strict=True` raises instead (the tests
use it so nothing passes on a fallback). CONTROLNET_KERNELS_DISABLE="attention,group_norm"
(or "all") switches kernels off. Without Triton, or without a GPU outside the interpreter, the
model is left as it is and `handle.active` is False with `handle.reason` saying why.
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

    def __init__(self, model, strict, enabled):
        self.model = model
        self.strict = strict
        self.enabled = enabled
        self.active = False
        self.reason = ""
        self.counts = {k: {"sites": 0, "calls": 0, "fallbacks": 0, "reasons": {}} for k in KERNELS}
        self.counts["attention"]["sdpa"] = 0
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


def _disabled_from_env():
    raw = os.environ.get(ENV_DISABLE, "").strip().lower()
    if raw in ("1", "all", "true", "yes"):
        return set(KERNELS)
    return {s.strip() for s in raw.split(",") if s.strip()}


def patch(model: nn.Module, *, attention=True, group_norm=True, layer_norm=True, geglu=True,
          silu=True, strict=False) -> PatchHandle:
    existing = model.__dict__.get(_HANDLE_ATTR)
    if existing is not None and existing.active:
        return existing  # patching twice is a no-op
    enabled = dict(attention=attention, group_norm=group_norm, layer_norm=layer_norm,
                   geglu=geglu, silu=silu)
    off = _disabled_from_env()
    unknown = off - set(KERNELS)
    if unknown:
        logger.warning("%s: unknown kernel names %s (known: %s)", ENV_DISABLE, sorted(unknown), KERNELS)
    enabled = {k: bool(v) and k not in off for k, v in enabled.items()}
    handle = PatchHandle(model, strict, enabled)
    usable, why = platform.kernels_usable()
    if not usable:
        handle.reason = why
        logger.info("kernels.patch: model left unpatched: %s", why)
        return handle
    if not any(enabled.values()):
        handle.reason = f"all kernels disabled ({ENV_DISABLE} or arguments)"
        return handle
    from . import _sites  # imports triton: only once we know it is there
    _sites.install(handle, model)
    model.__dict__[_HANDLE_ATTR] = handle
    handle.active = True
    handle.reason = why
    logger.info("kernels.patch: %s", handle)
    return handle


def patched(model: nn.Module, **kwargs) -> PatchHandle:
    """`with kernels.patched(model) as h:` — patched inside the block, restored after it."""
    return patch(model, **kwargs)
