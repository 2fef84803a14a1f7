"""Memory answered up front: what a process() call will need, checked before any work.

`Canny2Image.process` (so the CLI, the folder job, the API and the demo) calls `check(...)` with
the resized image size, the number of samples, the mode and the device. It estimates the peak
memory the call adds on top of what is already allocated (the model's weights are), compares it
with what the device has available, and raises MemoryNeedError (an InputError: one line for a
person) naming the need, what is available and what to change.

The formula (bytes; B samples, an H x W image, latent h x w = H/8 x W/8, N = h*w / 4**L tokens at
the UNet's first attention level L, `heads` heads there, C0 = the UNet's model_channels, Cv = the
VAE decoder's last width, s = 4 for fp32 / 2 for fp16):

    diffusion step  = A_UNET * b * N * C0 * s + attention(b * heads, N)
    VAE decode      = A_VAE * B * H * W * Cv * s + attention(B, h*w)
    need            = SAFETY * max(diffusion step, VAE decode) + MARGIN (256 MiB)

* reference mode calls the model for cond and uncond separately (b = B), in fp32, and its
  attention materialises the logits: attention(n, N) = 2 * n * N**2 * 4 bytes (the einsum's output
  and its scaled copy, then the softmax beside it). Under --low-vram the sliced attention
  (cldm/hack.py) computes at most SLICE_BYTES of logits at a time: attention = 2 * SLICE_BYTES.
  On a GPU under --low-vram the UNet and ControlNet weights also come onto the device for the
  diffusion (their bytes are added to the step; fast mode keeps its fp16 copies resident).
* fast mode batches cond and uncond (b = 2B) in fp16 and its attention (SDPA / Triton flash) never
  holds the N x N logits: attention = 0.
* A_UNET and A_VAE count the activations alive at the peak in units of "one map of C0 (Cv)
  channels at full resolution"; they were measured on a CPU with the full-size model's UNet +
  ControlNet and VAE (fp32, reference mode; benchmarks/memory_calibration.py, results in
  benchmarks/results/memory_cpu.json) and rounded up; SAFETY covers the allocator's fragmentation.
  Fast mode's figures use the same constants in fp16: not measured on a GPU, an upper bound by
  construction (its fused kernels keep fewer activations, not more).

Available memory: on the CPU /proc/meminfo's MemAvailable (psutil is not a dependency); on a
CUDA/HIP device torch.cuda.mem_get_info's free bytes plus what torch's caching allocator holds
unused. Where neither is known (other devices) nothing is checked.

Override: the environment variable CANNY2IMAGE_MEMORY=off skips the check (for people who know
better: swap, a unified-memory machine); CANNY2IMAGE_MEMORY=12G (or 12000M, or bytes) uses that
figure instead of the measured available memory.
"""
import os
import re
import weakref
from dataclasses import dataclass

import torch

from cldm.hack import SLICE_BYTES
from ldm.util import host_memory_available
from runtime.errors import InputError

ENV = "CANNY2IMAGE_MEMORY"

# Calibrated on the CPU (see the module docstring): the measured peaks imply A = 28 (UNet step,
# batch 1; 39 at batch 2) and A = 10-11 (VAE decode) beside ~110 MB that does not grow with the
# image (MARGIN covers it), rounded up.
A_UNET = 40.0
A_VAE = 12.0
SAFETY = 1.2
MARGIN = 256 << 20
GB = 1e9


class MemoryNeedError(InputError):
    """A setting needs more memory than the device has: refused before any work."""


@dataclass(frozen=True)
class Geometry:
    """What the formula needs to know about a model's networks."""
    level: int          # UNet level of the first attention (0 for SD1.5: at latent resolution)
    heads: int          # attention heads there
    model_channels: int
    vae_channels: int   # the VAE decoder's width at full resolution (conv_out's input)
    vae_attention: bool  # the decoder's mid block has an attention (N x N at latent resolution)
    diffusion_bytes: int  # UNet + ControlNet weights


def geometry(model):
    """Geometry of a ControlLDM (read from its modules, any config)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.model import AttnBlock
    from ldm.modules.diffusionmodules.openaimodel import Downsample

    unet = model.model.diffusion_model
    level, heads = 0, 0
    for module in unet.input_blocks.modules():
        if isinstance(module, Downsample):
            level += 1
        elif isinstance(module, SpatialTransformer):
            heads = module.transformer_blocks[0].attn1.heads
            break
    decoder = model.first_stage_model.decoder
    diffusion = sum(p.numel() * p.element_size()
                    for net in (unet, model.control_model) for p in net.parameters())
    return Geometry(level=level, heads=heads, model_channels=unet.input_blocks[0][0].out_channels,
                    vae_channels=decoder.conv_out.in_channels,
                    vae_attention=isinstance(decoder.mid.attn_1, AttnBlock),
                    diffusion_bytes=diffusion)


_GEOMETRY = weakref.WeakKeyDictionary()    # model -> (signature, Geometry)


def _signature(model):
    """Where and in what dtype the diffusion networks are: what changes diffusion_bytes and the
    host/device question. Each network moves and converts as a whole (low_vram_shift, fast mode),
    so its first parameter speaks for it."""
    nets = (model.model.diffusion_model, model.control_model)
    return tuple((p.dtype, p.device) for p in (next(net.parameters()) for net in nets))


def cached_geometry(model):
    """geometry(model), computed again only when its networks moved or changed dtype. Walking
    their ~1,000 parameters on every request cost 4.3 ms on a 2-core CPU, and fast mode on an
    H100 spent 3-4 ms more outside the diffusion loop at 37cf7f7 than at 58a33b3, before this
    cache (benchmarks/results/bench_h100_20261207_37cf7f7_vs_58a33b3.md)."""
    sig = _signature(model)
    hit = _GEOMETRY.get(model)
    if hit is None or hit[0] != sig:
        hit = _GEOMETRY[model] = (sig, geometry(model))
    return hit[1]


def _attention(rows, n, sliced):
    """Bytes of fp32 attention logits alive at once for `rows` (batch x heads) slices of n x n."""
    if sliced:
        return 2 * min(SLICE_BYTES, rows * n * n * 4)
    return 2 * rows * n * n * 4


def phases(geo, height, width, samples, mode="reference", sliced=False, device_type="cpu",
           diffusion_on_host=False):
    """{"diffusion step": bytes, "VAE decode": bytes} before SAFETY and MARGIN (the formula of the
    module docstring)."""
    h, w = height // 8, width // 8
    n = (h * w) // (4 ** geo.level)
    if mode == "fast":
        s, b, unet_attention, vae_attention = 2, 2 * samples, 0, 0
    else:
        s, b = 4, samples
        unet_attention = _attention(b * geo.heads, n, sliced) if geo.heads else 0
        vae_attention = _attention(samples, h * w, sliced) if geo.vae_attention else 0
    step = A_UNET * b * n * geo.model_channels * s + unet_attention
    if device_type != "cpu" and diffusion_on_host and mode != "fast":
        step += geo.diffusion_bytes       # low_vram_shift brings them for the diffusion
    decode = A_VAE * samples * height * width * geo.vae_channels * s + vae_attention
    return {"diffusion step": step, "VAE decode": decode}


def estimate(geo, height, width, samples, mode="reference", sliced=False, device_type="cpu",
             diffusion_on_host=False):
    """Peak bytes a process() call adds: SAFETY * the larger phase + MARGIN."""
    need = phases(geo, height, width, samples, mode, sliced, device_type, diffusion_on_host)
    return int(SAFETY * max(need.values()) + MARGIN)


def parse_size(text):
    """'12G', '12GB', '12000M', '1.5T' or bytes -> bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(text)
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def available(device):
    """Bytes available on `device` for new tensors, or None where it cannot be known. The
    environment variable CANNY2IMAGE_MEMORY=<size> replaces the measurement."""
    setting = os.environ.get(ENV, "").strip()
    if setting:
        try:
            return parse_size(setting)
        except ValueError:
            raise InputError(f"{ENV}={setting!r}: use off, or a size such as 12G") from None
    device = torch.device(device)
    if device.type == "cpu":
        return host_memory_available()
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def check(model, height, width, samples, mode, sliced, device):
    """MemoryNeedError (one line: need, available, what to change) unless a process() call of
    `samples` images of height x width fits; nothing when CANNY2IMAGE_MEMORY=off or the
    available memory is unknown."""
    if os.environ.get(ENV, "").strip().lower() == "off":
        return
    have = available(device)
    if have is None:
        return
    device = torch.device(device)
    geo = cached_geometry(model)
    on_host = _signature(model)[1][1].type == "cpu"     # the ControlNet (and UNet) in host memory

    def need(n=samples, sliced_=sliced, mode_=mode):
        return estimate(geo, height, width, n, mode_, sliced_, device.type, on_host)

    needed = need()
    if needed <= have:
        return
    where = "CPU" if device.type == "cpu" else str(device)
    advice = []
    fits = max((n for n in range(1, samples) if need(n) <= have), default=0)
    if fits:
        advice.append(f"at most {fits} sample{'s' if fits > 1 else ''} at this resolution")
    if not sliced and mode == "reference" and need(sliced_=True) <= have:
        advice.append("--low-vram")
    elif not sliced and mode == "reference" and need(1, True) <= have:
        advice.append("--low-vram with fewer samples")
    advice.append("a lower resolution")
    if device.type != "cpu" and mode == "reference":
        advice.append("fast mode")
    elif device.type == "cpu":
        advice.append("fast mode on a GPU")
    raise MemoryNeedError(
        f"{samples} sample{'s' if samples > 1 else ''} at {width}x{height} in {mode} mode"
        f"{' with --low-vram' if sliced else ''} need{'s' if samples == 1 else ''} about "
        f"{needed / GB:.1f} GB of {where} "
        f"memory, {max(have, 0) / GB:.1f} GB is available: try {', '.join(advice)} "
        f"({ENV}=off skips this check)")
