"""Fast mode: the same canny2image generation as reference mode, within fp16 tolerance, faster.

Small parts with one job each, composed by the pipeline:

* options.py    `FastOptions`: every switch (the benchmark's ablation is a list of them).
* nets.py       the caller's UNet/ControlNet/VAE converted in place to the fast dtype (one copy on
                the device; the fp32 originals in host memory), patched by `kernels.patch`
                (Triton kernels, SDPA, cached text K/V); `fp32()` brings the originals back for
                a while; the runner owns the model until `close()`.
* precompute.py once per generation: DDIM schedule, hint block, time embeddings, text K/V.
* split.py      the ControlNet/UNet forward in the pieces the step needs (honours the model's
                options: no control, only_mid_control, control scales).
* step.py       ControlNet + UNet + guidance + DDIM update on static buffers (graph-capturable).
* graphs.py     the LRU of graph entries, each owning its buffers, graph and memory pool.
* fallback.py   the fp32 redo (non-finite latents) and fp32 decode (non-finite images).
* pipeline.py   `FastRunner`: sample / decode / generate.

Reproducibility: x_T is drawn exactly as the reference sampler draws it (seed_everything, then
torch.randn((B, 4, h, w)) on the model's device), so both modes start from the same noise; for
eta > 0 the per-step noise is the reference's draw as well (eta == 0 draws none: sigma is 0).
"""
from runtime.fast.nets import owner
from runtime.fast.options import FastOptions, resolve_attention
from runtime.fast.pipeline import FastRunner
from runtime.fast.precompute import ddim_schedule
from runtime.fast.split import control_forward, unet_decoder, unet_encoder

__all__ = ["FastOptions", "FastRunner", "owner", "resolve_attention", "ddim_schedule",
           "control_forward", "unet_encoder", "unet_decoder"]
