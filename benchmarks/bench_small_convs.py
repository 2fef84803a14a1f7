"""The UNet/ControlNet convolutions of one fast-mode step, each timed three ways at its real shape.

    python benchmarks/bench_small_convs.py --sizes 256 512 --out DIR      # on a GPU

The shapes are recorded from one eager step of fast mode (full-size model, seeded random weights,
batch 1 = CFG batch 2) by wrapping torch.nn.functional.conv2d, so they are exactly the calls the
step makes (the fusions' bias-free convolutions included), with how often each occurs. Each
distinct 3x3 shape is then timed (median of a replayed CUDA graph, triton.testing) as:
  cudnn_cl     F.conv2d on channels_last input and weight (what fast mode runs, with its cudnn.benchmark
               setting: off since commit bc7533f, on when small_convs_h200 was measured)
  cudnn_nchw   F.conv2d on NCHW input and weight (the conversions not counted)
  gemm         kernels.conv.conv2d_gemm: im2col of the channels_last map (one copy) + one cuBLAS
               GEMM against the weight's [Cout, 9·Cin] view (no copy of the weight)
and the error of each vs an fp32 convolution (max |diff| / max |ref|). Writes
small_convs_<tag>.json / .md: per shape, and the step total of each variant (time × calls).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def record_shapes(runner, size, batch=1):
    """{(x shape, w shape, stride, padding): calls} of one eager step at size²."""
    from benchmarks.profile_step import _inputs
    seen = collections.Counter()
    orig = F.conv2d
    state = {"on": False}

    def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if state["on"]:
            st = stride if isinstance(stride, int) else stride[0]
            pd = padding if isinstance(padding, int) else padding[0]
            seen[(tuple(x.shape), tuple(w.shape), st, pd, bias is not None)] += 1
        return orig(x, w, bias, stride, padding, dilation, groups)

    def callback(done, total):
        state["on"] = done == 1  # the second step only (the first precomputes the hint block)

    opts = runner.options
    had = opts.cuda_graph
    opts.cuda_graph = False
    F.conv2d = conv2d
    try:
        runner.sample(*_inputs(runner, size, batch), steps=3, scale=9.0, callback=callback)
    finally:
        F.conv2d = orig
        opts.cuda_graph = had
    return seen


def time_variants(xs, ws, st, pd, bias):
    from triton.testing import do_bench_cudagraph

    from kernels.conv import conv2d_gemm
    torch.manual_seed(0)
    x = torch.randn(xs, device="cuda", dtype=torch.float16)
    w = torch.randn(ws, device="cuda", dtype=torch.float16) / (ws[1] * ws[2] * ws[3]) ** 0.5
    b = torch.randn(ws[0], device="cuda", dtype=torch.float16) if bias else None
    ref = F.conv2d(x.float(), w.float(), None if b is None else b.float(), st, pd)
    xcl, wcl = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    variants = {
        "cudnn_cl": lambda: F.conv2d(xcl, wcl, b, st, pd),
        "cudnn_nchw": lambda: F.conv2d(x, w, b, st, pd),
        "gemm": lambda: conv2d_gemm(xcl, wcl, b, st, pd),
    }
    out = {}
    for name, fn in variants.items():
        try:
            y = fn()
            torch.cuda.synchronize()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            ms = do_bench_cudagraph(fn, rep=30)
            out[name] = {"ms": ms, "err": err,
                         "channels_last_out": bool(y.is_contiguous(memory_format=torch.channels_last))}
        except Exception as e:  # a failing variant is recorded, the run goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="h200")
    args = ap.parse_args()
    from runtime.fast import FastOptions, FastRunner
    from runtime.app import make_model

    torch.backends.cudnn.benchmark = FastOptions().cudnn_benchmark     # as fast mode runs
    model = make_model("cuda", random_weights=True)
    runner = FastRunner(model, FastOptions(fusions=()))  # unfused: every conv with its bias
    shapes = {s: record_shapes(runner, s) for s in args.sizes}
    runner.close()
    torch.backends.cudnn.benchmark = FastOptions().cudnn_benchmark
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "sizes": {}}
    md = [f"# Convolutions of one fast-mode step, three ways — {res['device']}", "",
          f"torch {res['torch']}, cuDNN {res['cudnn']}; `python benchmarks/bench_small_convs.py "
          f"{' '.join(sys.argv[1:])}`; µs = median of a replayed CUDA graph; err = max |diff| / "
          "max |fp32 ref|.", ""]
    for size, seen in shapes.items():
        rows = []
        for (xs, ws, st, pd, bias), calls in sorted(seen.items(), key=lambda kv: kv[0][0][2]):
            if ws[2] != 3:
                continue
            rows.append({"x": xs, "w": ws, "stride": st, "calls": calls, "bias": bias,
                         **time_variants(xs, ws, st, pd, bias)})
        res["sizes"][size] = rows
        names = ("cudnn_cl", "cudnn_nchw", "gemm")
        tot = {n: sum(r[n]["ms"] * r["calls"] for r in rows if "ms" in r[n]) for n in names}
        best = sum(min(r[n]["ms"] for n in names if "ms" in r[n]) * r["calls"] for r in rows)
        md += [f"## {size}² (CFG batch 2): 3x3 convolutions of one step", "",
               "| x | w | stride | calls | " + " | ".join(f"{n} µs (err)" for n in names) + " |",
               "|---|---|---|---|" + "---|" * len(names)]
        for r in rows:
            cells = [f"{r[n]['ms'] * 1e3:.1f} ({r[n]['err']:.1e})" if "ms" in r[n] else r[n]["error"][:40]
                     for n in names]
            md.append(f"| {list(r['x'])} | {list(r['w'])} | {r['stride']} | {r['calls']} | "
                      + " | ".join(cells) + " |")
        md += ["", "Step total (µs × calls, ms): " + ", ".join(f"{n} {t:.2f}" for n, t in tot.items())
               + f", best per shape {best:.2f}", ""]
    text = "\n".join(md)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"small_convs_{args.tag}.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(os.path.join(args.out, f"small_convs_{args.tag}.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
