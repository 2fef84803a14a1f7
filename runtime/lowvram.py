"""Low-VRAM mode: upstream's `config.save_memory` switch (its docs/low_vram.md), as one module.

Upstream's save_memory does two things, and so does this:
* sliced attention (cldm/hack.py): every CrossAttention computes one (batch, head) slice at a
  time, class-wide, switched on before the model is built;
* ControlLDM.low_vram_shift(is_diffusing) around the diffusion, called where upstream's demo
  calls it: before the CLIP encoding (False), before sampling (True), before decoding (False).

Reference mode calls `shift()` at those three points; it does nothing unless save_memory is on.

Fast mode keeps CUDA/HIP graphs of its diffusion step, and a replayed graph reads its weights at
the addresses it was captured with. Fast mode therefore does not call low_vram_shift: it converts
the UNet and ControlNet to fp16 in host memory (where build_model left them) and puts the UNet on
the device for the runner's whole life; the ControlNet's fp16 weights (one allocation,
runtime/fast/flat.py) are on the device from the start of each sampling to its end and parked in
host memory meanwhile, and come back at their old address (else the graphs are captured again);
CLIP and the VAE (in their fast dtypes) come onto the device for their phase only
(runtime/fast/nets.py, pipeline.py), with `resident(module, device)`:

    with lowvram.resident(clip, device):          # only on a prompt-cache miss
        context = clip(tokens)
    nets.unpark()                                 # the ControlNet back (FastRunner.sample)
    ...                                           # graphs replay
    nets.park()                                   # its memory for the decode (and next CLIP)
    with lowvram.resident((vae.post_quant_conv, vae.decoder), device):   # not its encoder
        images = vae.decode(latents)

Outside low-VRAM mode `resident()` leaves the module where it is (it should already live on the
device) and costs nothing. Sliced attention is class-wide (CrossAttention.forward), but fast
mode's kernels.patch replaces the forwards of its CrossAttention instances anyway (SDPA, the
Triton kernel, cached text K/V: all memory-efficient, none holds the [N, N] logits), so it only
runs in fast mode's fp32 redo (FastNets.fp32() takes the patch off), as in reference mode.
"""
import contextlib
import logging

import torch

import config
from cldm.hack import enable_sliced_attention, sliced_attention_enabled

logger = logging.getLogger(__name__)

HOST = torch.device("cpu")
DIFFUSION_NETWORKS = ("model", "control_model")      # ControlLDM children shifted together


def enabled():
    """True when upstream's save_memory switch is on."""
    return bool(config.save_memory)


def configure(low_vram=False):
    """Apply the --low-vram flag (or config.py's save_memory = True): set config.save_memory and
    switch on sliced attention. Call it before the model is built, as upstream's share.py runs
    before create_model. Returns whether low-VRAM mode is on."""
    if low_vram:
        config.save_memory = True
    if config.save_memory and not sliced_attention_enabled():
        enable_sliced_attention()
    return enabled()


def shift(model, is_diffusing):
    """model.low_vram_shift(is_diffusing) when save_memory is on (upstream's demo's guard)."""
    if config.save_memory:
        model.low_vram_shift(is_diffusing)


def place(model, device, host=()):
    """Put a freshly built ControlLDM on `device` the way low_vram_shift(False) leaves it (VAE,
    CLIP and the schedule buffers on `device`, the UNet and ControlNet in host memory) without
    the whole model passing through the device first. Without save_memory: model.to(device).
    The children named in `host` stay in host memory either way (fast mode converts them to the
    device itself, runtime/fast/nets.py)."""
    if not config.save_memory and not host:
        return model.to(device)
    for name, child in model.named_children():
        offloaded = name in host or (config.save_memory and name in DIFFUSION_NETWORKS)
        child.to(HOST if offloaded else device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))
    return model


@contextlib.contextmanager
def resident(module, device):
    """Under save_memory: `module` (or each module of a tuple) on `device` for the with-block,
    back in host memory after, its device memory handed back to the caching allocator (not to
    the driver: the parked ControlNet comes back into that memory at the start of the next
    sampling, at the address its captured graph reads; an empty_cache() here would give the
    block away, and a new cudaMalloc need not return the same address). Otherwise: nothing
    moves."""
    if not config.save_memory:
        yield module
        return
    modules = module if isinstance(module, tuple) else (module,)
    for m in modules:
        m.to(device)
    try:
        yield module
    finally:
        for m in modules:
            m.to(HOST)
