"""Kernels and GPU time of one eager fast-mode denoising step, by kernel family.

`profile_step(runner, size, batch)` runs `runner.sample()` for 3 steps with the CUDA graph off
(a replayed graph hides its kernels from the profiler) and records, under torch.profiler
(ProfilerActivity.CUDA), exactly the second step: the profiler is started from the sampler's
callback after step 1 and stopped after step 2, each time after a device synchronize, so the
per-generation precomputation (hint block, text K/V, time embeddings) and the warm-up (cuDNN
benchmark, Triton compiles) of step 1 stay outside. Only the public `sample()` is used, so this
does not depend on how fast mode is built inside.

Families are read from kernel names (cuDNN/cuBLAS/PyTorch/Triton naming): conv, linear,
attention, elementwise, group_norm, copy (copies, cat, layout changes, memcpy/memset),
triton (other Triton kernels: LayerNorm, GEGLU, SiLU, fused epilogues), other.

  python benchmarks/profile_step.py --size 512 --batch 1 [--by-op 40]    # on a GPU
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

_FAMILIES = (  # first match wins; substrings of lower-cased kernel names
    ("attention", ("flash", "fmha", "sdpa", "attention", "_attn_fwd")),
    ("group_norm", ("_gn_",)),
    ("copy", ("copy", "memcpy", "memset", "cat", "nchwtonhwc", "nhwctonchw", "transpose",
              "permute")),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd", "dgrad", "wgrad")),
    ("linear", ("gemm", "nvjet", "cublas", "cutlass", "splitk", "gemv")),
    ("elementwise", ("elementwise", "reduce_kernel", "vectorized", "unrolled", "index")),
)
FAMILY_ORDER = ("conv", "linear", "attention", "elementwise", "group_norm", "copy", "triton",
                "other")


def family(kernel_name: str) -> str:
    n = kernel_name.lower()
    for fam, keys in _FAMILIES:
        if any(k in n for k in keys):
            return fam
    # Triton kernels are named after their @triton.jit function (ours start with "_"); PyTorch,
    # cuDNN and cuBLAS kernels have C++ names (namespaces, templates).
    if "::" not in n and "<" not in n and "(" not in n:
        return "triton"
    return "other"


def _kernel_events(prof):
    out = []
    for ev in prof.events():
        dt = getattr(ev, "device_type", None)
        if dt is not None and str(dt).endswith("CUDA") and ev.device_time_total is not None:
            if getattr(ev, "is_async", False):
                continue
            out.append(ev)
    return out


def summarize(prof) -> dict:
    """{"kernels": n, "gpu_ms": t, "families": {fam: {"kernels", "ms"}}, "top": [...]}"""
    fams = {f: {"kernels": 0, "ms": 0.0} for f in FAMILY_ORDER}
    names = collections.defaultdict(lambda: [0, 0.0])
    for ev in _kernel_events(prof):
        ms = ev.device_time_total / 1e3
        f = fams[family(ev.name)]
        f["kernels"] += 1
        f["ms"] += ms
        names[ev.name][0] += 1
        names[ev.name][1] += ms
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:15]
    return {"kernels": sum(f["kernels"] for f in fams.values()),
            "gpu_ms": sum(f["ms"] for f in fams.values()), "families": fams,
            "top_kernels": [{"name": n[:160], "calls": c, "ms": t} for n, (c, t) in top]}


def by_op(prof, n=40) -> list:
    """The ops with the most device time, grouped by op and input shapes (needs record_shapes)."""
    rows = []
    for a in prof.key_averages(group_by_input_shape=True):
        t = getattr(a, "self_device_time_total", None) or getattr(a, "self_cuda_time_total", 0)
        if t and a.key.startswith("aten::"):
            rows.append({"op": a.key, "shapes": str(a.input_shapes)[:120], "calls": a.count,
                         "ms": t / 1e3})
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def _inputs(runner, size, batch, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, lat = runner.device, size // 8
    ctx_dim = runner.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features \
        if hasattr(runner.unet.input_blocks[1][1], "transformer_blocks") else 768
    hint = torch.rand((1, 3, size, size), generator=g).to(dev)
    ctx_c = torch.randn((batch, 77, ctx_dim), generator=g).to(dev)
    ctx_u = torch.randn((batch, 77, ctx_dim), generator=g).to(dev)
    x_T = torch.randn((batch, 4, lat, lat), generator=g).to(dev)
    return hint, ctx_c, ctx_u, x_T


def profile_step(runner, size=512, batch=1, scale=9.0, *, record_shapes=False, ops=0) -> dict:
    """Profile the second of 3 eager steps of `runner` (a FastRunner) at size² and `batch`."""
    from torch.profiler import ProfilerActivity, profile

    opts = runner.options
    had_graph = opts.cuda_graph
    opts.cuda_graph = False
    prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                   record_shapes=record_shapes)

    def callback(done, total):
        if done in (1, 2):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.start() if done == 1 else prof.stop()

    try:
        runner.sample(*_inputs(runner, size, batch), steps=3, scale=scale, callback=callback)
    finally:
        opts.cuda_graph = had_graph
    res = summarize(prof)
    if ops:
        res["by_op"] = by_op(prof, ops)
    return res


def family_cell(res) -> str:
    """'1170 k, 9.8 ms' plus the family split, short enough for a table cell."""
    fams = "; ".join(f"{f} {v['kernels']}/{v['ms']:.1f}" for f, v in res["families"].items()
                     if v["kernels"])
    return f"{res['kernels']} k, {res['gpu_ms']:.1f} ms ({fams})"


def table(res) -> str:
    lines = ["| family | kernels | GPU ms |", "|---|---|---|"]
    for f, v in res["families"].items():
        lines.append(f"| {f} | {v['kernels']} | {v['ms']:.2f} |")
    lines.append(f"| **all** | **{res['kernels']}** | **{res['gpu_ms']:.2f}** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--by-op", type=int, default=0, help="also list the N costliest op+shape groups")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from runtime.fast import FastOptions, FastRunner
    from runtime.weights import DEFAULT_CONFIG, build_model

    model = build_model(args.config or DEFAULT_CONFIG, random_weights=True, device="cuda", seed=0)
    res = profile_step(FastRunner(model, FastOptions()), args.size, args.batch,
                       record_shapes=bool(args.by_op), ops=args.by_op)
    print(table(res))
    for r in res.get("by_op", []):
        print(f"{r['ms']:8.3f} ms {r['calls']:5d}x {r['op']} {r['shapes']}")


if __name__ == "__main__":
    main()
