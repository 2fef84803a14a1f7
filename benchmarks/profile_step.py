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

By op and shape (`record_shapes=True`, `by_shape`): every kernel's GPU time goes to the
outermost aten op that launched it (torch.profiler links a kernel to the op whose launch it
came from; the outermost op carries the shapes the model code passed, e.g. aten::conv2d with
input and weight), grouped by (op, input shapes, kernel); Triton kernels, launched outside any
aten op, are grouped by kernel name. `profile_outside(runner, size, batch)` does the same for
what a generation does besides its steps: CLIP (a prompt-cache miss), the per-generation
precompute + one step, and the VAE decode, each a phase of one warm eager generate().

  python benchmarks/profile_step.py --size 512 --batch 1 [--by-op 40] [--by-shape 40 --out DIR]
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


def _outer_op(ev):
    """The outermost aten op above `ev` (or `ev` itself), or None."""
    op, e = None, ev
    while e is not None:
        if e.name.startswith("aten::"):
            op = e
        e = e.cpu_parent
    return op


# Families whose kernels are many and cheap: by_shape lists every row of them, not only the
# costliest, so that each one's origin (op and shapes) can be found and removed.
LISTED_FAMILIES = ("copy", "elementwise", "other")


def by_shape(prof, n=40) -> dict:
    """GPU time by (op, input shapes, kernel), the n costliest, every row of LISTED_FAMILIES
    ("listed"), and how much of the kernel time could be linked to an op (the rest, Triton's
    launches, is grouped by kernel name)."""
    totals, counts = collections.Counter(), collections.Counter()
    for ev in _kernel_events(prof):
        totals[ev.name] += ev.device_time_total
        counts[ev.name] += 1
    linked, linked_n = collections.Counter(), collections.Counter()
    groups = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        kernels = getattr(ev, "kernels", None)
        if not kernels or getattr(ev, "device_type", None) is None or str(ev.device_type).endswith("CUDA"):
            continue
        op = _outer_op(ev)
        name = op.name if op is not None else ev.name
        shapes = str([s for s in op.input_shapes if s]) if op is not None else ""
        for k in kernels:
            if k.name not in totals:  # the profiler's own device time of a CPU range
                continue
            g = groups[(name, shapes, k.name)]
            g[0] += 1
            g[1] += k.duration / 1e3
            linked[k.name] += k.duration
            linked_n[k.name] += 1
    for kname, t in totals.items():  # kernels no op launched (Triton's): by kernel name
        if counts[kname] > linked_n[kname]:
            g = groups[("(no aten op)", "", kname)]
            g[0] += counts[kname] - linked_n[kname]
            g[1] += max(0.0, t - linked[kname]) / 1e3
    rows = [{"op": op, "shapes": sh[:200], "kernel": k[:140], "family": family(k), "calls": c,
             "ms": t} for (op, sh, k), (c, t) in groups.items()]
    rows.sort(key=lambda r: -r["ms"])
    return {"gpu_ms": sum(totals.values()) / 1e3, "linked_ms": sum(linked.values()) / 1e3,
            "rows": rows[:n], "listed": [r for r in rows if r["family"] in LISTED_FAMILIES]}


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


def profile_outside(runner, size=512, batch=1, scale=9.0, n=25) -> dict:
    """What one generation does besides its steps, by phase: a warm eager generate() of one step
    (graph off), with its encode / sample / decode each profiled on its own (synchronized before
    and after). The prompt is new to the runner, so CLIP runs (a prompt-cache miss). 'sample' is
    the per-generation precompute (hint block, text K/V, time embeddings) plus one step."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    opts = runner.options
    had_graph = opts.cuda_graph
    opts.cuda_graph = False
    edge = np.zeros((size, size, 3), np.uint8)
    edge[size // 4: 3 * size // 4, size // 2] = 255
    phases = {}

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def profiled(name, fn):
        def call(*a, **k):
            sync()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                         record_shapes=True) as prof:
                out = fn(*a, **k)
                sync()
            res = by_shape(prof, n)
            phases[name] = {"ms": res["gpu_ms"], "linked_ms": res["linked_ms"],
                            "kernels": len(_kernel_events(prof)), "rows": res["rows"]}
            return out
        return call

    try:
        runner.generate(edge, f"warm-up prompt {size}", "", batch, 1, False, 1.0, scale, 0, 0.0)
        for name in ("encode", "sample", "decode"):
            runner.__dict__[name] = profiled(name, getattr(runner, name))
        runner.generate(edge, f"a profiled prompt {size} {batch} {id(phases)}", "", batch, 1,
                        False, 1.0, scale, 0, 0.0)
    finally:
        for name in ("encode", "sample", "decode"):
            runner.__dict__.pop(name, None)
        opts.cuda_graph = had_graph
    return {"gpu_ms": sum(p["ms"] for p in phases.values()), "phases": phases}


def shape_table(rows, n=25) -> str:
    lines = ["| GPU ms | calls | op | input shapes | kernel |", "|---|---|---|---|---|"]
    for r in rows[:n]:
        lines.append(f"| {r['ms']:.2f} | {r['calls']} | {r['op']} | {r['shapes'][:90]} | "
                     f"{r['kernel'][:90].replace('|', '/')} |")
    return "\n".join(lines)


def profile_step(runner, size=512, batch=1, scale=9.0, *, record_shapes=False, ops=0,
                 shapes=0) -> dict:
    """Profile the second of 3 eager steps of `runner` (a FastRunner) at size² and `batch`."""
    from torch.profiler import ProfilerActivity, profile

    opts = runner.options
    had_graph = opts.cuda_graph
    opts.cuda_graph = False
    prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                   record_shapes=record_shapes or bool(shapes))

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
    if shapes:
        res["by_shape"] = by_shape(prof, shapes)
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
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--by-op", type=int, default=0, help="also list the N costliest op+shape groups")
    ap.add_argument("--by-shape", type=int, default=0,
                    help="GPU time by op x input shapes x kernel: the N costliest, per step and "
                         "outside the loop")
    ap.add_argument("--out", default=None, help="write profile_<tag>.json/.md here")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--config", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from runtime.fast import FastOptions, FastRunner
    from runtime.app import make_model

    model = make_model("cuda", config=args.config, random_weights=True)
    runner = FastRunner(model, FastOptions())
    results, md = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "cudnn": torch.backends.cudnn.version(), "batch": args.batch, "sizes": {}}, []
    for size in args.sizes:
        res = profile_step(runner, size, args.batch, record_shapes=bool(args.by_op),
                           ops=args.by_op, shapes=args.by_shape)
        entry = results["sizes"][size] = {"step": res}
        md += [f"## {size}² batch {args.batch}: one eager step", "", table(res), ""]
        if args.by_shape:
            bs = res["by_shape"]
            md += [f"By op × shape × kernel ({bs['linked_ms']:.1f} of {bs['gpu_ms']:.1f} ms linked "
                   "to an aten op):", "", shape_table(bs["rows"], args.by_shape), "",
                   f"Every {' / '.join(LISTED_FAMILIES)} kernel of the step:", "",
                   shape_table(bs["listed"], len(bs["listed"])), ""]
            out = entry["outside"] = profile_outside(runner, size, args.batch)
            md += [f"## {size}² batch {args.batch}: outside the loop (one eager generate() of one "
                   f"step, by phase: {out['gpu_ms']:.1f} ms of GPU time)", ""]
            for ph, v in out["phases"].items():
                md += [f"{ph}: {v['ms']:.2f} ms of GPU time, {v['kernels']} kernels", "",
                       shape_table(v["rows"], 12), ""]
        for r in res.get("by_op", []):
            md.append(f"    {r['ms']:8.3f} ms {r['calls']:5d}x {r['op']} {r['shapes']}")
    text = "\n".join(md)
    print(text)
    if args.out:
        import json
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"profile_{args.tag}")
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(f"# Fast mode by op and shape — {results['device']}\n\ntorch {results['torch']}, "
                    f"cuDNN {results['cudnn']}; `python benchmarks/profile_step.py "
                    f"{' '.join(sys.argv[1:])}`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
