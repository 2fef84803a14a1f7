"""FastOptions: every switch of fast mode in one object; the benchmark's ablation is a list of them."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
ATTENTION = ("auto", "triton", "sdpa")


def as_dtype(d):
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
    # The CLIP text encoder (its softmax and LayerNorm statistics run in fp32 either way). It runs
    # once per new prompt (runtime/prompt_cache.py); fp16 halves what it holds on the device.
    # None: fp16 when dtype is fp16, else fp32. Measured on an H100 (72a5f6c, 512², same call,
    # benchmarks/results/bench_h100_20261207_72a5f6c.md): eps error 1.07e-2 and PSNR 59.0 dB vs
    # reference with CLIP in fp16 or fp32 alike (the fp16 UNet's error dominates), the same
    # speed, and the steady peak 3.14 GiB instead of 3.36 (steady_peak.py).
    clip_dtype: object = None
    kernels: bool = True                # the Triton kernels (kernels.patch) in the networks
    attention: str = "auto"             # CrossAttention: "triton" kernel, "sdpa", or "auto"
    fusions: Optional[tuple] = None     # kernels.patch fusions; None: kernels.DEFAULT_FUSIONS
    batched_cfg: bool = True            # cond + uncond in one call of batch 2B
    # hint block, time embeddings and the ResBlocks' projections of them, text K/V: once per generation
    precompute: bool = True
    # UNet + ControlNet in NHWC (H100: 17.1 -> 15.1 ms a step).
    channels_last: bool = True
    # The VAE in NHWC too: slower at an earlier commit (H100: 21.6 -> 27.6 ms a decode), faster
    # now (H100, b98671a: 10.50 -> 9.64 ms of GPU time a 512² decode, 298 -> 185 kernels;
    # H200, 3e82606: 9.89 -> 8.98 ms, steady peak 3.77-3.82 -> 3.50-3.64 GiB in two runs;
    # benchmarks/results/bench_h100_20261207_vae.md, bench_h200_20261207_3e82606*.md).
    vae_channels_last: bool = True
    cuda_graph: bool = True             # the whole step captured once per shape and replayed
    # The VAE decode (and the uint8 conversion) captured too, into the step graph's memory pool,
    # where the step ran as a graph (not in low-VRAM mode: its VAE moves). H100, one call
    # (benchmarks/results/bench_h100_20261208_964ba92.md): 162.8 vs 165.6 ms at 512², 83.7 vs
    # 87.4 ms at 256²; steady peak 2.77 vs 3.02 GiB (steady_peak.py), 2.97 vs 5.61 GiB at 768² x4.
    decode_graph: bool = True
    two_streams: bool = True            # the ControlNet on a second stream beside the UNet encoder
    graph_cache_size: int = 3           # captured shapes kept (LRU), each with its memory pool
    nan_check: bool = True              # non-finite eps/latents/images: redo in fp32
    # cuDNN's autotuning, only inside fast-mode calls (restored afterwards). Off: measured on an
    # H200 in one run (benchmarks/results/startup_h200_20261203_fb788a7.md) its trials' workspaces
    # took the process peak from 3.71 to 13.16 GiB and the first request from 2.43 to 4.40 s, for
    # a steady request of 190 vs 189 ms (the heuristic picks as well for these convolutions).
    cudnn_benchmark: bool = False
    compile: Optional[str] = None       # torch.compile mode for the step (None: no compile)

    def __post_init__(self):
        self.dtype = as_dtype(self.dtype)
        self.vae_dtype = self.dtype if self.vae_dtype is None else as_dtype(self.vae_dtype)
        if self.clip_dtype is None:
            self.clip_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        self.clip_dtype = as_dtype(self.clip_dtype)
        if self.graph_cache_size < 1:
            raise ValueError("graph_cache_size must be >= 1")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention == "triton" and not self.kernels:
            raise ValueError("attention='triton' needs kernels=True")
        if self.fusions is not None:
            self.fusions = tuple(self.fusions)
            if self.fusions and not self.kernels:
                raise ValueError("fusions need kernels=True")

    def kernel_fusions(self):
        """The fusions to pass to kernels.patch (None: kernels.DEFAULT_FUSIONS)."""
        return self.fusions if self.kernels else ()

    @classmethod
    def plain(cls, dtype=torch.float16):
        """The ablation's starting point: the model in `dtype`, eager, SDPA attention, two CFG
        calls per step, nothing precomputed, NCHW, no kernels, no graph."""
        return cls(dtype=dtype, kernels=False, batched_cfg=False, precompute=False,
                   channels_last=False, vae_channels_last=False, cuda_graph=False,
                   two_streams=False)

    @classmethod
    def for_device(cls, device, **overrides):
        """Full fast mode on CUDA/HIP; on CPU fp32 without graphs or kernels (same logic)."""
        if torch.device(device).type != "cuda":
            base = dict(dtype=torch.float32, clip_dtype=torch.float32, kernels=False,
                        channels_last=False, vae_channels_last=False, cuda_graph=False,
                        two_streams=False)
            base.update(overrides)
            return cls(**base)
        return cls(**overrides)


def resolve_attention(options, device):
    """(choice, reason) for the CrossAttention modules of the UNet and the ControlNet, as
    kernels.patch(attention=...) takes it: True (the Triton kernel), False (SDPA), or for "auto" a
    per-module choice by kernels.platform.attention_backend (ROCm: Triton where torch has no fused
    SDPA for the GPU; CUDA: the faster of the two as measured, by self/cross and head dim)."""
    if not options.kernels:
        return False, "kernels off"
    if options.attention != "auto":
        return options.attention == "triton", f"FastOptions.attention={options.attention!r}"
    from kernels import platform

    def policy(module, self_attention):
        head_dim = module.to_q.out_features // module.heads
        name, _ = platform.attention_backend(device, self_attention=self_attention,
                                             head_dim=head_dim)
        return name == "triton"
    return policy, "auto: kernels.platform.attention_backend per module (logged once per answer)"
