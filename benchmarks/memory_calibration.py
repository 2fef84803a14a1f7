"""Measure the peak host memory of reference mode's two big phases on the CPU, for the constants
of runtime/memory.py: one apply_model call (ControlNet + UNet, as the DDIM sampler makes it for
cond or uncond) and decode_first_stage, on the full-size model (random weights), fp32, at a few
sizes. The peak is Linux's VmHWM, reset before each phase (/proc/self/clear_refs), minus the RSS
before it (after malloc_trim): what the phase adds on top of the weights.

    python benchmarks/memory_calibration.py --out benchmarks/results/memory_cpu.json

Prints, per phase, the measured bytes, the attention term of the formula, and the constant
(A_UNET, A_VAE) that the rest implies. Builds the full-size model once (~6 GB, a minute or two)."""
import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import memory  # noqa: E402
from runtime.app import make_model  # noqa: E402


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_of(fn):
    """(bytes the call added at its peak over the RSS before it, seconds). Memory freed by
    earlier calls but still held by malloc is handed back first (malloc_trim), so that the RSS
    before the call is what is really in use."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    fn()
    return _status("VmHWM") - before, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--unet", default="256x256x1,384x384x1,512x512x1,256x256x2")
    p.add_argument("--vae", default="256x256x1,384x384x1,256x256x2")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = make_model("cpu", random_weights=True)
    geo = memory.geometry(model)
    print(f"model built in {time.perf_counter() - t0:.0f} s: {geo}", flush=True)
    context = None
    rows = []
    for spec in args.unet.split(","):
        h, w, b = (int(x) for x in spec.split("x"))
        with torch.no_grad():
            context = model.get_learned_conditioning([""] * b)
            x = torch.randn(b, 4, h // 8, w // 8)
            hint = (torch.rand(b, 3, h, w) > 0.9).float()
            t = torch.full((b,), 501, dtype=torch.long)
            cond = {"c_concat": [hint], "c_crossattn": [context]}
            model.control_scales = [1.0] * 13
            added, seconds = peak_of(lambda: model.apply_model(x, t, cond))
        n = (h // 8) * (w // 8) // 4 ** geo.level
        attention = 2 * b * geo.heads * n * n * 4
        a = (added - attention) / (b * n * geo.model_channels * 4)
        rows.append(dict(phase="apply_model", height=h, width=w, batch=b, added_bytes=added,
                         attention_bytes=attention, seconds=round(seconds, 1), A=round(a, 2)))
        print(rows[-1], flush=True)
    for spec in args.vae.split(","):
        h, w, b = (int(x) for x in spec.split("x"))
        z = torch.randn(b, 4, h // 8, w // 8)
        with torch.no_grad():
            added, seconds = peak_of(lambda: model.decode_first_stage(z))
        n = (h // 8) * (w // 8)
        attention = 2 * b * n * n * 4
        a = (added - attention) / (b * h * w * geo.vae_channels * 4)
        rows.append(dict(phase="decode_first_stage", height=h, width=w, batch=b,
                         added_bytes=added, attention_bytes=attention,
                         seconds=round(seconds, 1), A=round(a, 2)))
        print(rows[-1], flush=True)
    result = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                  threads=torch.get_num_threads(), geometry=geo.__dict__, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
