"""End-to-end canny2image benchmark: reference mode vs fast mode, with an ablation.

Every row times process() end to end (resize + Canny, CLIP, 20 DDIM steps, VAE decode, uint8) and
the denoising loop alone, median/min/max over --repeats runs after --warmup, peak GPU memory
(max_memory_allocated, reset per row), and the difference from reference mode: the relative error
of the first step's guided eps and the PSNR of the decoded images (same seed, same x_T), and
kernels/step: one eager step of the row's options (graph off) under torch.profiler, with its GPU
time by kernel family (benchmarks/profile_step.py; --no-profile skips it); --by-shape N adds the
step's GPU time by op x input shapes x kernel and, at batch 1, the same for CLIP, the
per-generation precompute and the VAE decode (outside the loop).

Rows:
  reference            upstream-equivalent fp32 (Canny2Image mode="reference")
  fp16                 FastOptions.plain(): model in fp16 + SDPA attention, eager, two CFG calls
  +kernels (per-op Triton kernels, no fusions), +batched_cfg, +precompute, +channels_last
  (UNet, ControlNet and VAE), +cuda_graph (two streams), +fusions (kernels.DEFAULT_FUSIONS: =
  full fast mode), +conv_gemm (the defaults and the small-map 3x3 convolutions as im2col +
  GEMM: not a default)
  vae_nchw             +fusions with the VAE in NCHW (as before b98671a's measurement)
  clip_fp32, clip_fp16 +fusions with CLIP in that dtype (FastOptions.clip_dtype); the prompt
                       cache runs CLIP once per row, so its time shows in the first warm-up, its
                       error in eps err and PSNR, its weights in the peak
  no_geglu_gemm        +fusions without geglu_gemm (the feed-forward projection with GEGLU in
                       one Triton GEMM, a default since 5940542: the A/B)
  no_ff_residual       +fusions without ff_residual (the feed-forward's output GEMM accumulating
                       into s + its bias, no residual add kernel; a default since the A/B of
                       72a5f6c and 5940542)
  no_ddim_update       +fusions without ddim_update (the step's guidance and DDIM update in
                       eager PyTorch ops, as before it)
  no_decode_graph      +fusions with the VAE decode eager (FastOptions.decode_graph off: the
                       decode replayed from a CUDA graph in the step graph's pool is a default
                       since the H100 A/B of 964ba92)
  compile              (--compile) FastOptions(compile=mode): torch.compile of the fast eager step,
                       in a subprocess with a time limit: "did not compile within N s" is
                       recorded if it runs over
Every fast row is Canny2Image(model, mode="fast", options=FastOptions(...)) and nothing else.

Weights are seeded random at full SD1.5+ControlNet size (timings do not depend on their values).
A failing row records its error and the run goes on. Output under --out: bench_<tag>.json, a
markdown table bench_<tag>.md and (if matplotlib is importable) PNG plots via benchmarks/plot.py.

  python benchmarks/bench_pipeline.py                       # the full sweep (< 8 min on an H100)
  python benchmarks/bench_pipeline.py --sizes 512 --batches 1 --repeats 5
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.profile_step import family_cell, profile_outside, profile_step, shape_table  # noqa: E402
from kernels import DEFAULT_FUSIONS  # noqa: E402
from runtime.app import make_model  # noqa: E402
from runtime.canny2image import Canny2Image  # noqa: E402
from runtime.fast import FastOptions, owner  # noqa: E402
from runtime.inputs import A_PROMPT, CONFIG_FULL, N_PROMPT  # noqa: E402
from runtime.sample import sample_image  # noqa: E402

log = logging.getLogger("bench")

ABLATION = [
    ("fp16", dict()),
    ("+kernels", dict(kernels=True, fusions=())),
    ("+batched_cfg", dict(batched_cfg=True)),
    ("+precompute", dict(precompute=True)),
    ("+channels_last", dict(channels_last=True, vae_channels_last=True)),
    ("+cuda_graph", dict(cuda_graph=True, two_streams=True)),
    ("+fusions", dict(fusions=None)),   # kernels.DEFAULT_FUSIONS (= full fast mode)
    # + small-map 3x3 convolutions as im2col + GEMM
    ("+conv_gemm", dict(fusions=DEFAULT_FUSIONS + ("conv_gemm",))),
]
# Rows outside the cumulative ablation: a row of it plus one change.
VARIANTS = {"vae_nchw": ("+fusions", dict(vae_channels_last=False)),
            "clip_fp32": ("+fusions", dict(clip_dtype=torch.float32)),
            "clip_fp16": ("+fusions", dict(clip_dtype=torch.float16)),
            "no_geglu_gemm": ("+fusions", dict(fusions=tuple(f for f in DEFAULT_FUSIONS
                                                             if f != "geglu_gemm"))),
            "no_ff_residual": ("+fusions", dict(fusions=tuple(f for f in DEFAULT_FUSIONS
                                                              if f != "ff_residual"))),
            "no_ddim_update": ("+fusions", dict(fusions=tuple(f for f in DEFAULT_FUSIONS
                                                              if f != "ddim_update"))),
            "no_decode_graph": ("+fusions", dict(decode_graph=False))}
PROMPT = "a house under the sun"


def ablation_options(upto, dtype):
    if upto in VARIANTS:
        base, change = VARIANTS[upto]
        return dataclasses.replace(ablation_options(base, dtype), **change)
    opts = FastOptions.plain(dtype)
    for name, change in ABLATION:
        for k, v in change.items():
            setattr(opts, k, v)
        if name == upto:
            return opts
    raise KeyError(upto)


def environment(args):
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
           "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
           "command": " ".join(shlex.quote(a) for a in sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    # GIT_COMMIT first: a copied tree may carry a stale .git of another commit (seen on the
    # device machine, whose copy's .git said 8e63547 while the tree was a later one).
    env["commit"] = os.environ.get("GIT_COMMIT")
    if not env["commit"]:
        try:
            env["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO,
                                                    text=True).strip()
            env["dirty"] = bool(subprocess.check_output(
                ["git", "status", "--porcelain", "--", "runtime", "kernels", "ldm", "cldm",
                 "benchmarks"], cwd=REPO, text=True).strip())
        except Exception:  # no .git on the machine (a copied tree) and no GIT_COMMIT
            env["commit"] = None
    return env


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class LoopTimer:
    """Wraps a sampler callable: synchronizes around it and records its wall time."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *a, **k):
        sync()
        t = time.perf_counter()
        out = self.fn(*a, **k)
        sync()
        self.times.append(time.perf_counter() - t)
        return out


def stats(xs):
    xs = sorted(xs)
    return {"median_ms": 1e3 * float(np.median(xs)), "min_ms": 1e3 * xs[0], "max_ms": 1e3 * xs[-1], "n": len(xs)}


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def reference_first_eps(model, size, batch, steps, scale, seed, contexts=None):
    """Upstream's guided eps at the first step for the benchmark's input (fp32, two calls);
    `contexts`: (cond, uncond) text contexts to use instead of the fp32 CLIP's."""
    from annotator.canny import CannyDetector
    from annotator.util import HWC3, resize_image
    from runtime.fast import ddim_schedule
    from runtime.seed import seed_everything

    img = resize_image(HWC3(sample_image(size * 5 // 4, size * 5 // 4)), size)
    dm = HWC3(CannyDetector()(img, 100, 200))
    H, W = dm.shape[:2]
    hint = (torch.from_numpy(dm.copy()).float().to(model.device) / 255.0).permute(2, 0, 1)[None]
    hint = hint.expand(batch, -1, -1, -1)
    seed_everything(seed)
    x = torch.randn((batch, 4, H // 8, W // 8), device=model.device)
    t = ddim_schedule(model, steps, 0.0, model.device).timesteps[0]
    tt = torch.full((batch,), t, device=model.device, dtype=torch.long)
    model.control_scales = [1.0] * 13
    fast_owner = owner(model)  # a fast row's pipeline holds the model: use its fp32 weights
    with torch.no_grad(), fast_owner.fp32() if fast_owner else contextlib.nullcontext():
        cc, cu = contexts or (model.get_learned_conditioning([PROMPT + ", " + A_PROMPT] * batch),
                              model.get_learned_conditioning([N_PROMPT] * batch))
        cc, cu = cc.float(), cu.float()
        e_c = model.apply_model(x, tt, {"c_concat": [hint], "c_crossattn": [cc]})
        e_u = model.apply_model(x, tt, {"c_concat": [hint], "c_crossattn": [cu]})
    return e_u + scale * (e_c - e_u)


def run_row(name, pipe, model, args, refs, row_runner=None):
    """Time one configuration over every (size, batch); returns a list of result dicts."""
    results = []
    # The eager ablation steps are host-bound (~1-2 s a run): by default only at the first batch
    # size, which keeps the whole sweep under 8 minutes on an H100.
    full = name in ("reference", "+cuda_graph", "+fusions", "+conv_gemm", "compile", *VARIANTS) \
        or args.ablation_all_batches
    for size in args.sizes:
        # A square picture a little larger than `size`: resize_image gives exactly size x size.
        image = sample_image(size * 5 // 4, size * 5 // 4)
        for batch in (args.batches if full else args.batches[:1]):
            r = {"row": name, "size": size, "batch": batch, "steps": args.steps, "scale": args.scale}
            try:
                if row_runner is not None:
                    loop = LoopTimer(row_runner.sample)
                    row_runner.sample = loop
                else:
                    loop = LoopTimer(pipe.ddim_sampler.sample)
                    pipe.ddim_sampler.sample = loop
                call = (image, PROMPT, A_PROMPT, N_PROMPT, batch, size, args.steps, False, 1.0,
                        args.scale, args.seed, 0.0, 100, 200)
                reps = args.ref_repeats if name == "reference" else args.repeats
                for _ in range(args.warmup):
                    out = pipe.process(*call)
                sync()
                torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
                loop.times.clear()
                times = []
                for _ in range(reps):
                    sync()
                    t = time.perf_counter()
                    out = pipe.process(*call)
                    sync()
                    times.append(time.perf_counter() - t)
                r.update(stats(times))
                r["loop"] = stats(loop.times)
                r["it_per_s"] = args.steps / (r["loop"]["median_ms"] / 1e3)
                r["peak_mem_gib"] = (torch.cuda.max_memory_allocated() / 2**30
                                     if torch.cuda.is_available() else None)
                key = (size, batch)
                if name == "reference":
                    refs.setdefault(key, {})["images"] = out[1:]
                elif "images" in refs.get(key, {}):
                    r["psnr_db"] = min(psnr(a, b) for a, b in zip(out[1:], refs[key]["images"]))
                if row_runner is not None:
                    info = row_runner.last_info
                    r["graph"] = info.get("graph")
                    r["capture_error"] = info.get("capture_error")
                    r["kernels_active"] = row_runner.kernels_active
                    if args.eps_error:
                        if "eps" not in refs.setdefault(key, {}):
                            refs[key]["eps"] = reference_first_eps(model, size, batch, args.steps,
                                                                   args.scale, args.seed)
                        fe, re_ = info["first_eps"].float(), refs[key]["eps"]
                        r["eps_rel_err"] = float((fe - re_).norm() / re_.norm())
                    if args.profile and torch.cuda.is_available():  # one eager step, graph off
                        r["step_profile"] = profile_step(row_runner, size, batch, args.scale,
                                                         shapes=args.by_shape)
                        if args.by_shape and batch == 1:
                            r["outside_profile"] = profile_outside(row_runner, size, batch,
                                                                   args.scale, args.by_shape)
            except Exception as e:  # one failing row must not stop the run
                r["error"] = f"{type(e).__name__}: {e}"
                log.error("row %s %s x%d failed:\n%s", name, size, batch, traceback.format_exc())
            finally:
                if row_runner is not None and isinstance(row_runner.sample, LoopTimer):
                    row_runner.sample = row_runner.sample.fn
                elif row_runner is None and isinstance(pipe.ddim_sampler.sample, LoopTimer):
                    pipe.ddim_sampler.sample = pipe.ddim_sampler.sample.fn
            log.info("%s", {k: v for k, v in r.items() if k != "loop"})
            results.append(r)
    return results


def compile_row(args):
    """Child process: torch.compile the fast eager step; prints one JSON line of results."""
    model = make_model("cuda", config=args.config, random_weights=True)
    opts = dataclasses.replace(ablation_options("+channels_last", torch.float16),
                               compile=args.compile_mode)
    pipe = Canny2Image(model, mode="fast", options=opts)
    t = time.perf_counter()
    rows = run_row("compile", pipe, model, args, {}, pipe.fast)
    for r in rows:
        r["compile_mode"] = args.compile_mode
        r["wall_incl_compile_s"] = time.perf_counter() - t
    print("COMPILE_JSON " + json.dumps(rows))


def markdown(env, rows):
    lines = [f"# canny2image benchmark — {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}, HIP {env['hip']}), triton {env['triton']}, "
             f"cuDNN {env['cudnn']}, commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
             f"{env['time']}", "", f"`{env['command']}`", "",
             f"Seeded random weights ({os.path.basename(env.get('config', ''))}); end to end = process() incl. resize + Canny, CLIP, "
             "DDIM, VAE decode, uint8. eps err = relative L2 error of the first step's guided eps vs "
             "reference (fp32); PSNR vs reference mode's images (same seed).", "",
             "| row | size | batch | e2e median ms (min–max) | loop ms | it/s | × ref | peak GiB | eps err | PSNR dB | kernels/step | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["size"], r["batch"]): r.get("median_ms") for r in rows if r["row"] == "reference"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['size']} | {r['batch']} | – | – | – | – | – | – | – | – | {r['error'][:120]} |")
            continue
        base = ref.get((r["size"], r["batch"]))
        speed = f"{base / r['median_ms']:.1f}×" if base else "–"
        note = []
        if r.get("graph") is False and r["row"] == "+cuda_graph":
            note.append(f"no graph: {r.get('capture_error')}")
        if r.get("kernels_active") is False and r["row"] != "fp16":
            note.append("kernels inactive")
        f = lambda v, s: "–" if v is None else s.format(v)  # noqa: E731
        lines.append(
            f"| {r['row']} | {r['size']}² | {r['batch']} | {r['median_ms']:.1f} ({r['min_ms']:.1f}–{r['max_ms']:.1f}) | "
            f"{r['loop']['median_ms']:.1f} | {r['it_per_s']:.1f} | {speed} | {f(r.get('peak_mem_gib'), '{:.2f}')} | "
            f"{f(r.get('eps_rel_err'), '{:.2e}')} | {f(r.get('psnr_db'), '{:.1f}')} | "
            f"{r['step_profile']['kernels'] if 'step_profile' in r else '–'} | {'; '.join(note)} |")
    prof = [r for r in rows if "step_profile" in r]
    if prof:
        lines += ["", "One eager step (graph off) under torch.profiler: kernels, GPU ms (by family: "
                  "kernels/ms)", "", "| row | size | batch | step |", "|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['size']}² | {r['batch']} | {family_cell(r['step_profile'])} |"
                  for r in prof]
    for r in rows:  # --by-shape: GPU time by op x input shapes x kernel
        if "by_shape" in r.get("step_profile", {}):
            bs = r["step_profile"]["by_shape"]
            lines += ["", f"### {r['row']} {r['size']}² ×{r['batch']}: one step by op × shape × kernel "
                      f"({bs['gpu_ms']:.2f} ms of GPU time)", "", shape_table(bs["rows"], 15)]
        for ph, v in r.get("outside_profile", {}).get("phases", {}).items():
            lines += ["", f"{r['row']} {r['size']}² ×{r['batch']}, outside the loop, {ph}: "
                      f"{v['ms']:.2f} ms of GPU time, {v['kernels']} kernels", "",
                      shape_table(v["rows"], 6)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=9.0)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=3,
                    help="repeats of the (slow: 3-16 s a run on H100) reference row")
    ap.add_argument("--ablation-all-batches", action="store_true",
                    help="run the eager ablation rows at every batch size too (+3-4 min)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=["reference"] + [n for n, _ in ABLATION],
                    help="subset of: reference " + " ".join(n for n, _ in ABLATION)
                    + " " + " ".join(VARIANTS))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--no-eps-error", dest="eps_error", action="store_false")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the per-row profiled eager step (kernels/step column)")
    ap.add_argument("--by-shape", type=int, default=0, metavar="N",
                    help="the profiled step by op x input shapes x kernel (N costliest), and at "
                         "batch 1 the phases outside the loop (CLIP, precompute, VAE decode)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile row (slow)")
    ap.add_argument("--compile-timeout", type=int, default=300)
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default=None)
    ap.add_argument("--config", default=CONFIG_FULL,
                    help="model config (models/cldm_tiny.yaml for a quick CPU smoke run)")
    ap.add_argument("--_compile-child", dest="compile_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        log.warning("no GPU: timings are CPU timings (use --sizes 64 --batches 1 for a smoke run)")
    if args.compile_child:
        return compile_row(args)

    env = environment(args)
    env["config"] = os.path.relpath(os.path.abspath(args.config), REPO)  # no machine paths in results
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(device, config=args.config, random_weights=True)
    log.info("model ready in %.1f s", time.perf_counter() - t0)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if device == "cuda" else torch.float32
    rows, refs = [], {}
    os.makedirs(args.out, exist_ok=True)
    tag = args.tag or (env["device"].replace(" ", "_").replace("/", "_") + time.strftime("_%Y%m%d_%H%M%S"))
    base = os.path.join(args.out, f"bench_{tag}")

    def write():
        env["total_s"] = time.perf_counter() - t0
        with open(base + ".json", "w") as f:
            recorded = dict(vars(args), config=env["config"])  # repo-relative: no machine paths
            json.dump({"env": env, "args": recorded, "rows": rows}, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(markdown(env, rows))

    for name in args.rows:
        try:
            if name == "reference":
                rows += run_row(name, Canny2Image(model, mode="reference"), model, args, refs)
            else:
                opts = ablation_options(name, dtype)
                pipe = Canny2Image(model, mode="fast", options=opts)
                try:
                    new = run_row(name, pipe, model, args, refs, pipe.fast)
                finally:
                    pipe.close()  # frees its graphs and gives the model back as it was
                del pipe
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                rows += new
        except Exception as e:
            rows.append({"row": name, "size": None, "batch": None, "error": f"{type(e).__name__}: {e}"})
            log.error("row %s failed:\n%s", name, traceback.format_exc())
        write()  # after every row: a run cut short still leaves its results
    if args.compile:
        cmd = [sys.executable, os.path.abspath(__file__), "--_compile-child", "--compile-mode", args.compile_mode,
               "--steps", str(args.steps), "--scale", str(args.scale), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--config", args.config, "--sizes", *map(str, args.sizes[:1]), "--batches", "1",
               "--no-eps-error"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("COMPILE_JSON ")]
            if line:
                rows += json.loads(line[-1][len("COMPILE_JSON "):])
            else:
                rows.append({"row": "compile", "size": args.sizes[0], "batch": 1,
                             "error": f"exit {p.returncode}: {p.stderr[-300:]}"})
        except subprocess.TimeoutExpired:
            rows.append({"row": "compile", "size": args.sizes[0], "batch": 1,
                         "error": f"did not compile within {args.compile_timeout} s"})
    write()
    log.info("wrote %s.json / .md (%.0f s in all)", base, env["total_s"])
    try:
        from benchmarks.plot import plot
        plot(base + ".json")
    except Exception as e:  # plots are a convenience: never fail the run over them
        log.info("no plots (%s): run benchmarks/plot.py %s.json where matplotlib is installed", e, base)


if __name__ == "__main__":
    main()
