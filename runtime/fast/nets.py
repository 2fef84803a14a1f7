"""The networks of fast mode: the caller's own UNet, ControlNet, VAE and CLIP, converted in place.

One copy of each network lives on the device, in its fast dtype: a full-size SD1.5 + ControlNet
in fp16 is ~2.4 GB of weights where a private fp16 copy beside the caller's fp32 model held
~7.2 GB. The fp32 originals live in host memory (exact values, kept for as long as fast mode owns
the model): the CLI and the demo build these networks there (build_model(host_children=
HOST_BUILT)), and each tensor's fast copy is made from its original straight on the device, so
no fp32 network is ever on the device (a model built on the device is copied to host memory
first). CLIP is converted only when FastOptions.clip_dtype asks for it (its softmax and LayerNorm
statistics stay fp32 in the model code); it is never patched: it runs once per new prompt. What
fast mode never runs on the device keeps its fast copy in host memory (`host_only`: the VAE
encoder, and the ResBlocks' timestep projections, which precompute tabulates on the host).

A FastNets *owns* the model until `close()`: a second fast runner on the same model is refused,
and reference-mode work on it (the fp32 redo, reference mode on the same object) runs inside
`fp32()`, which brings the original weights from host memory for the duration and takes the
kernel patch off, so it runs upstream's numerics exactly. The fast tensors stay allocated while
it runs, so captured graphs stay valid; `close()` puts the original weights back for good.

The fast UNet and ControlNet on the device are views of one allocation each (FLAT,
runtime/fast/flat.py). Low-VRAM mode (runtime/lowvram.py): the fast UNet stays on the device for
the runner's life, the ControlNet from the start of a sampling to its end (park/unpark); CLIP and
the VAE live in host memory between their phases, in their fast dtypes (lowvram.resident brings
them in). `fp32()` brings the originals it needs to the device as
without low-VRAM (the fp32 redo then holds the fp16 and fp32 networks at once: a rare path, over
the low-VRAM budget while it runs).
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

import kernels
from kernels._torch_sites import resblock_emb_layers
from kernels.patch import KERNELS
from ldm.modules.diffusionmodules.util import GroupNorm32
from runtime import lowvram
from runtime.fast.flat import FlatWeights
from runtime.fast.options import resolve_attention

logger = logging.getLogger(__name__)

NETS = ("unet", "control", "vae", "clip")
PATCHED = ("unet", "control", "vae")   # kernels.patch covers these; CLIP keeps its forwards
# Parts fast mode never runs (canny2image only decodes): their fast copies stay in host memory,
# ~68 MB of fp16 VAE encoder off the device.
UNUSED = {"vae": ("encoder", "quant_conv")}

# Networks whose fast copies on the device are views of one allocation (runtime/fast/flat.py), and
# those of them that low-VRAM mode parks in host memory between samplings: the ControlNet's
# ~0.67 GiB of fp16 makes room for the VAE decode and CLIP without moving the UNet.
FLAT = ("unet", "control")
PARKED = ("control",)

# The ControlLDM children fast mode converts: build_model(host_children=HOST_BUILT) creates them
# in host memory, and FastNets makes each tensor's fast copy on the device from there.
HOST_BUILT = ("model", "control_model", "first_stage_model")


def host_only(name, net, options):
    """Ids of the modules of network `name` whose fast copies stay in host memory: the UNUSED
    parts and, with precompute, every ResBlock's emb_layers (~76 MB of fp16 in UNet + ControlNet:
    their outputs are a table made on the host, runtime/fast/precompute.py EmbOut)."""
    parts = [getattr(net, p) for p in UNUSED.get(name, ())]
    if options.precompute and name in ("unet", "control"):
        parts += resblock_emb_layers(net)
    return {id(m) for part in parts for m in part.modules()}


def host_children(mode, device):
    """What build_model should create in host memory for a pipeline of `mode` on `device`."""
    return HOST_BUILT if mode == "fast" and torch.device(device).type != "cpu" else ()


_OWNER = "_fast_mode_owner"  # plain attribute on the ControlLDM: never in its state_dict


def owner(model):
    """The FastNets that owns `model` (converted it for fast mode), or None."""
    return model.__dict__.get(_OWNER)


def _tensors(net):
    """(module, name, is_parameter, tensor) of every parameter and buffer of `net`."""
    for mod in net.modules():
        for name, p in mod.named_parameters(recurse=False):
            yield mod, name, True, p
        for name, b in mod.named_buffers(recurse=False):
            yield mod, name, False, b


def _want(module, is_param, tensor, dtype):
    """The fast dtype of one tensor: `dtype` for floating tensors, except GroupNorm32's affine
    parameters, which stay fp32 (it normalizes x.float(), as upstream's convert_to_fp16 leaves
    norms alone; torch's group_norm wants them in the input's dtype)."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if isinstance(module, GroupNorm32) and is_param else dtype


def _assign(mod, name, is_param, value):
    if is_param:
        param = getattr(mod, name)
        if torch._has_compatible_shallow_copy_type(param, value):
            param.data = value          # the same Parameter object (CPU <-> CUDA/HIP, dtypes)
        else:                           # e.g. to or from the meta device (tests)
            mod._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
    else:
        setattr(mod, name, value)


class FastNets:
    """The model's UNet, ControlNet and VAE in the fast dtype, patched by kernels.patch; its CLIP
    in FastOptions.clip_dtype, unpatched."""

    def __init__(self, model, options, cross_kv, emb_out=None):
        if owner(model) is not None:
            raise RuntimeError("this model is already in fast mode (owned by another fast-mode "
                               "pipeline): close() that one first")
        self.model, self.options, self.cross_kv, self.emb_out = model, options, cross_kv, emb_out
        self.device = model.device
        self.nets = {"unet": model.model.diffusion_model, "control": model.control_model,
                     "vae": model.first_stage_model, "clip": model.cond_stage_model}
        self.unet, self.control, self.vae, self.clip = (self.nets[n] for n in NETS)
        # what a decode runs: low-VRAM mode brings these in, not the whole VAE (UNUSED)
        self.decoding = (self.vae.post_quant_conv, self.vae.decoder)
        self.attention, self.attention_reason = resolve_attention(options, self.device)
        o = options
        target = {"unet": (o.dtype, o.channels_last), "control": (o.dtype, o.channels_last),
                  "vae": (o.vae_dtype, o.vae_channels_last), "clip": (o.clip_dtype, False)}
        self.low_vram = lowvram.enabled()
        # net name -> [(module, name, is_param, fp32 original in host memory)]; a tensor already
        # in host memory (build_model's HOST_BUILT, low-VRAM mode) is kept itself, not copied.
        self._host = {}
        # where each network lives outside fast mode (close() puts the originals there): under
        # low-VRAM the diffusion networks in host memory (build_model's placement), CLIP where it
        # was, the VAE on the device (where low_vram_shift(False) leaves them)
        self._home = {n: lowvram.HOST if self.low_vram and n in ("unet", "control") else self.device
                      for n in NETS}
        self._home["clip"] = next(self.clip.parameters()).device
        self._flat = {}   # net name -> (FlatWeights, [(module, name, is_param)] of its views)
        for n, net in self.nets.items():
            dtype, cl = target[n]
            # low-VRAM: the fast VAE and CLIP live in host memory between their phases
            where = lowvram.HOST if self.low_vram and n in ("vae", "clip") else self.device
            unused = host_only(n, net, o)

            def place(mod, where=where, unused=unused):
                return torch.device(lowvram.HOST if id(mod) in unused else where)
            if cl or any(t.dtype != _want(m, p, t, dtype) or t.device != place(m)
                         for m, _, p, t in _tensors(net)):
                self._host[n] = [(m, k, p, t.detach().cpu()) for m, k, p, t in _tensors(net)]
                if n in FLAT:
                    self._flat[n] = self._convert_flat(self._host[n], dtype, cl, place,
                                                       self.device)
                else:
                    self._convert(self._host[n], dtype, cl, place)
        self.handle = None
        self._fp32_names = None  # inside fp32(): the networks brought so far
        self._holder = nn.ModuleDict({n: self.nets[n] for n in PATCHED})  # one root for the patch
        self._patch()
        self.closed = False
        model.__dict__[_OWNER] = self
        logger.info("fast mode: %s (attention %s: %s)", self.handle, self.attention,
                    self.attention_reason)

    @staticmethod
    @torch.no_grad()
    def _convert(tensors, dtype, channels_last, place):
        """Give each module a fast copy of each of its tensors on `place(module)`, made from the
        host original one tensor at a time: the network never exists twice in full, and never in
        fp32 on the device (the cast happens per tensor on the way)."""
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        for mod, name, is_param, host in tensors:
            fmt = memory_format if host.dim() == 4 else torch.preserve_format
            value = host.to(device=place(mod), dtype=_want(mod, is_param, host, dtype),
                            memory_format=fmt, copy=True)
            _assign(mod, name, is_param, value)

    @staticmethod
    @torch.no_grad()
    def _convert_flat(tensors, dtype, channels_last, place, device):
        """_convert, with the fast copies that live on `device` as views of one allocation
        (runtime/fast/flat.py); returns (FlatWeights, [(module, name, is_param)] of the views)."""
        flat_fmt = torch.channels_last if channels_last else torch.contiguous_format
        here = [t for t in tensors if place(t[0]) == torch.device(device)]
        flat = FlatWeights([(host.shape, _want(mod, is_param, host, dtype), flat_fmt)
                            for mod, _, is_param, host in here], device)
        for (mod, name, is_param, host), view in zip(here, flat.views()):
            view.copy_(host)
            _assign(mod, name, is_param, view)
        FastNets._convert([t for t in tensors if place(t[0]) != torch.device(device)], dtype,
                          channels_last, place)
        return flat, [(mod, name, is_param) for mod, name, is_param, _ in here]

    def park(self):
        """Low-VRAM mode: the PARKED networks' fast weights off the device (their memory back to
        the allocator, for the VAE decode and CLIP) until `unpark()`; their modules read a host
        copy meanwhile. Does nothing otherwise, or inside fp32()."""
        if not self.low_vram or self._fp32_names is not None:
            return
        for n in PARKED:
            flat, where = self._flat.get(n, (None, ()))
            if flat is not None and not flat.parked:
                self._point(where, flat.park())

    def unpark(self):
        """The parked networks back on the device; False when one came back at another address
        (graphs captured with it then read stale memory: capture again)."""
        same = True
        for n in PARKED:
            flat, where = self._flat.get(n, (None, ()))
            if flat is not None and flat.parked:
                views, kept = flat.unpark()
                self._point(where, views)
                same = same and kept
        return same

    @staticmethod
    def _point(where, tensors):
        for (mod, name, is_param), t in zip(where, tensors, strict=True):
            _assign(mod, name, is_param, t)

    def _patch(self):
        o = self.options
        self.handle = kernels.patch(
            self._holder, attention=self.attention, group_norm=o.kernels,
            layer_norm=o.kernels, geglu=o.kernels, silu=o.kernels, sdpa=True,
            cross_kv=self.cross_kv if o.precompute else None,
            emb_out=self.emb_out if o.precompute else None, fusions=o.kernel_fusions())

    def _unpatch(self):
        if self.handle is not None:
            self.handle.undo()
            self.handle = None

    @property
    def kernels_active(self):
        """Are Triton kernels patched in (not only the SDPA / cached-K/V forwards)?"""
        return self.handle is not None and any(self.handle.counts[k]["sites"] for k in KERNELS)

    def _originals(self, names, dtype=None, home=False):
        """Put the host originals of `names` on the device (as `dtype` if given), or with `home`
        where they were before fast mode; return what was there before, to put back."""
        saved = []
        for n in names:
            for mod, name, is_param, host in self._host.get(n, ()):
                current = getattr(mod, name)
                saved.append((mod, name, is_param, current.data if is_param else current))
                value = host.to(self._home[n] if home else self.device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                _assign(mod, name, is_param, value)
        return saved

    @contextlib.contextmanager
    def fp32(self, names=NETS):
        """Within: the networks `names` in fp32 with their original weights and without the
        patch (upstream's forwards): for the fp32 redo and reference mode on this model."""
        self._check_open()
        outer = self._fp32_names is not None   # nested: only what the outer one has not brought
        todo = [n for n in names if not outer or n not in self._fp32_names]
        if not outer:
            self._unpatch()
            self._fp32_names = set()
        saved = []
        try:
            saved = self._originals(todo, torch.float32)
            self._fp32_names.update(todo)
            yield self.model
        finally:
            for mod, name, is_param, value in reversed(saved):
                _assign(mod, name, is_param, value)  # the very same tensors: graphs stay valid
            self._fp32_names.difference_update(todo)
            if not outer:
                self._fp32_names = None
                self._patch()

    def close(self):
        """Give the model back as it was: original weights (from host memory), no patch."""
        if self.closed:
            return
        self._unpatch()
        self._originals(NETS, home=True)
        if self.low_vram:      # the placement build_model / low_vram_shift(False) left
            for n in NETS:
                self.nets[n].to(self._home[n])
        self._host.clear()
        self._flat.clear()
        self.model.__dict__.pop(_OWNER, None)
        self.closed = True

    def _check_open(self):
        if self.closed:
            raise RuntimeError("this fast-mode pipeline was closed: make a new one")
