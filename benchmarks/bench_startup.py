"""Start-up and memory benchmark: every figure from a fresh process, as a user launches one.

Each configuration runs in its own subprocess, built with the CLI's steps (lowvram.configure,
build_model with fast mode's host_children, Canny2Image: the same weights, mode and --low-vram
handling), and reports:
  * the phases to the first image, each with its seconds and the GPU memory held after it and
    its peak: interpreter + imports, model build (modules on the meta device), weights (random,
    or a checkpoint), fp16 conversion + transfer + kernel patch (fast mode), the first request,
    and inside it (hooks in this benchmark) Triton compilation, the graph entries' warm-up +
    capture and the capture proper; cuDNN autotuning from a launch with it flipped (--cudnn-ab);
  * with --checkpoints, launches that load synthetic full-size checkpoints (.pth as upstream's,
    .safetensors) through the real loading path;
  * time to the first image, from the moment the process is spawned (interpreter start, imports,
    model build, the first request with its kernel compilation and graph capture);
  * the model build alone and the first request alone;
  * steady-state latency of process() (median of --repeats requests after the first);
  * peak GPU memory (torch.cuda.max_memory_allocated): over a steady request, over the whole
    process (build and first request included), and after / at most during the model build;
  * a digest of the images, so configurations that must agree bit for bit can be compared
    (reference vs reference low-VRAM; a cold vs a warm launch).

Launches: the device's default mode twice with one Triton cache folder, empty before the first
("cold") and filled by it for the second ("warm", i.e. a second launch); with --precompile-ab two
more cold launches, each in a fresh cache folder: the precompile child spawned after the imports
(as before runtime/early.py), and none (kernels compile on first use); then the other modes.
Fast mode launches precompile as the installed CLI does (a child process spawned before the
imports compiles the kernels while the model is built; "waiting for the kernel precompile" is
what remains of it).
Modes: reference, fast, fast low-VRAM, reference low-VRAM (fast ones only on a GPU), at --size²
with each of --batches. Input: runtime.sample's picture; seeded random weights (timings do not
depend on their values). Results: startup_<tag>.json and startup_<tag>.md under --out, with
device, versions, commit (git, else the GIT_COMMIT variable) and the command.

  python benchmarks/bench_startup.py                       # GPU: the full set (~4 min on an H200)
  python benchmarks/bench_startup.py --modes fast reference --cudnn-ab --checkpoints   # phases
  python benchmarks/bench_startup.py --tiny --device cpu   # smoke run on the tiny model (seconds)
  python benchmarks/bench_startup.py --tiny --device cpu --modes fast fast-lowvram   # its fast rows

Needs what the CLI needs (torch, numpy, opencv, safetensors, omegaconf, PyYAML); no gradio,
diffusers, open_clip or ftfy.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MARK = "STARTUP_JSON "
MODES = ("reference", "fast", "fast-lowvram", "reference-lowvram")


# --- the child: one launch ---------------------------------------------------------------------

def _timers():
    """Benchmark-only hooks (nothing in the runtime knows of them): seconds spent in Triton's
    compiler (JITFunction._do_compile, a cache hit's load from disk included; None where this
    Triton has no such method), in fast mode's graph entries' capture (Entry.capture: two eager
    warm-up steps, where cuDNN autotunes and kernels compile, plus the capture) and in the
    capture proper (CUDAGraph.capture_begin to capture_end: recording and instantiation)."""
    import torch
    spent = {"triton_compile_s": 0.0, "triton_compiles": 0, "capture_warmup_s": 0.0,
             "graph_capture_s": 0.0}

    def timed(owner, name, key, count=None):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
                if count:
                    spent[count] += 1
        setattr(owner, name, wrapper)
    try:
        from triton.runtime.jit import JITFunction
        if hasattr(JITFunction, "_do_compile"):
            timed(JITFunction, "_do_compile", "triton_compile_s", "triton_compiles")
        else:
            spent["triton_compile_s"] = spent["triton_compiles"] = None
    except ImportError:
        spent["triton_compile_s"] = spent["triton_compiles"] = None
    from runtime.fast import graphs
    timed(graphs.Entry, "capture", "capture_warmup_s")
    if torch.cuda.is_available():
        began = []
        real_begin, real_end = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end

        def begin(self, *args, **kwargs):
            began.append(time.perf_counter())
            return real_begin(self, *args, **kwargs)

        def end(self, *args, **kwargs):
            try:
                return real_end(self, *args, **kwargs)
            finally:
                spent["graph_capture_s"] += time.perf_counter() - began.pop()
        torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.capture_end = begin, end
    return spent


def child(spec):
    """Runs in the fresh process: build as the CLI does (runtime.cli.build_pipeline's steps, each
    timed with the peak GPU memory it reached), time requests, print one JSON line."""
    spawned = float(os.environ["BENCH_SPAWN_TIME"])
    early_child = None
    if spec.get("precompile", True) and spec.get("early", True):
        from runtime import early   # as the installed commands do: before the imports
        early_child = early.spawn(["--tiny"] if spec["tiny"] else
                                  ["--mode", spec["mode"].split("-")[0]])
    import numpy as np
    import torch

    from runtime import lowvram
    from runtime.canny2image import Canny2Image
    from runtime.fast import FastOptions
    from runtime.fast.nets import host_children
    from runtime.inputs import CONFIG_FULL, CONFIG_TINY
    from runtime.sample import sample_image
    from runtime.weights import build_model

    cuda = spec["device"].startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gib(value):
        return value / 2**30 if cuda else None

    record = {"imported_s": time.time() - spawned}
    spent = _timers()
    phases = {"imports": {"s": record["imported_s"]}}
    last = [time.perf_counter()]

    def phase(name):
        """End of a phase: its seconds, the GPU memory held after it and its peak."""
        sync()
        phases[name] = {"s": time.perf_counter() - last[0]}
        if cuda:
            phases[name].update(held_gib=gib(torch.cuda.memory_allocated()),
                                peak_gib=gib(torch.cuda.max_memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        last[0] = time.perf_counter()

    mode = spec["mode"].split("-")[0]
    options = None
    if mode == "fast" and spec.get("cudnn_benchmark") is not None:
        options = FastOptions.for_device(spec["device"], cudnn_benchmark=spec["cudnn_benchmark"])
    start = time.perf_counter()
    pre = None
    if spec.get("precompile", True):   # as the CLI does: kernels compile while the model builds
        from runtime import app
        pre = app.start_precompile(spec["device"], mode, (spec["size"], spec["size"],
                                                          spec["batches"][0]), tiny=spec["tiny"],
                                   early=early_child)
    lowvram.configure(spec["mode"].endswith("lowvram"))
    model = build_model(CONFIG_TINY if spec["tiny"] else CONFIG_FULL, ckpt=spec.get("ckpt"),
                        random_weights=spec.get("ckpt") is None, device=spec["device"], seed=0,
                        host_children=host_children(mode, spec["device"]), on_phase=phase)
    pipe = Canny2Image(model, mode=mode, options=options)
    phase("fast_convert" if mode == "fast" else "pipeline")
    if pre is not None:
        record["precompile"] = pre.wait()
        phase("precompile")
    record["build_s"] = time.perf_counter() - start
    record["built_s"] = time.time() - spawned
    record["after_build_gib"] = phases[list(phases)[-1]].get("held_gib")
    record["build_peak_gib"] = max((p.get("peak_gib") or 0) for p in phases.values()) \
        if cuda else None
    image = sample_image(spec["size"], spec["size"])
    rows = []
    for batch in spec["batches"]:
        params = dict(prompt="a house under the sun", a_prompt="best quality, extremely detailed",
                      n_prompt="lowres, bad anatomy, worst quality", num_samples=batch,
                      image_resolution=spec["size"], ddim_steps=spec["steps"], guess_mode=False,
                      strength=1.0, scale=9.0, seed=12345, eta=0.0, low_threshold=100,
                      high_threshold=200)
        before = dict(spent)
        last[0] = start = time.perf_counter()
        images = pipe.process(image, **params)
        phase(f"first_request_b{batch}")
        row = {"batch": batch, "first_request_s": time.perf_counter() - start}
        row.update({k: (v - before[k] if v is not None else None) for k, v in spent.items()})
        if cuda:
            row["first_request_peak_gib"] = phases[f"first_request_b{batch}"]["peak_gib"]
        if "first_image_s" not in record:
            record["first_image_s"] = time.time() - spawned
        steady = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            again = pipe.process(image, **params)
            sync()
            steady.append(time.perf_counter() - start)
        if cuda:
            row["steady_peak_gib"] = gib(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        row["steady_ms"] = 1e3 * float(np.median(steady)) if steady else None
        row["steady_n"] = len(steady)
        row["repeatable"] = all(np.array_equal(a, b) for a, b in zip(images, again)) if steady \
            else None
        row["digest"] = hashlib.sha256(b"".join(np.ascontiguousarray(i).tobytes()
                                                for i in images)).hexdigest()[:16]
        rows.append(row)
    if cuda:
        record["process_peak_gib"] = max([p.get("peak_gib") or 0 for p in phases.values()]
                                         + [r["steady_peak_gib"] for r in rows])
        record["reserved_at_end_gib"] = gib(torch.cuda.memory_reserved())
    record["phases"] = phases
    record["rows"] = rows
    record["pipeline_mode"] = getattr(pipe, "mode", None)
    record["cudnn_benchmark"] = pipe.fast.options.cudnn_benchmark if pipe.fast else None
    print(MARK + json.dumps(record), flush=True)


# --- the parent: launches, results ----------------------------------------------------------------

def environment(args):
    import torch
    env = {"device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                      else platform.processor() or "cpu"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
           "python": platform.python_version(),
           "command": " ".join(shlex.quote(a) for a in sys.argv),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["commit"] = os.environ.get("GIT_COMMIT")  # first: a copied tree's .git may be stale
    if not env["commit"]:
        try:
            env["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO,
                                                    text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:      # no .git (a copied tree) and no GIT_COMMIT
            env["commit"] = None
    return env


def launch(spec, triton_cache, timeout):
    """One fresh process for `spec`; its record, or an error. spec["fresh_cache"]: an empty
    Triton cache folder of its own (in `triton_cache`) instead of `triton_cache` itself."""
    if spec.get("fresh_cache"):
        triton_cache = tempfile.mkdtemp(prefix="fresh_", dir=triton_cache)
    env = dict(os.environ, TRITON_CACHE_DIR=triton_cache, BENCH_SPAWN_TIME=repr(time.time()),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"did not finish within {timeout} s")
    wall = time.perf_counter() - started
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return dict(spec, **json.loads(line[len(MARK):]), wall_s=wall)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(spec, error=f"exit {done.returncode}: {tail[:300]}", wall_s=wall)


def plan(args, checkpoints=None):
    """(launch name, spec) in order: the default mode cold then warm, (--cudnn-ab) warm again with
    cuDNN's benchmark flipped, the other modes, then (--checkpoints) the default mode loading
    each synthetic checkpoint {kind: path}."""
    gpu = args.device.startswith("cuda")
    modes = args.modes
    first = "fast" if gpu and "fast" in modes else modes[0]
    base = dict(device=args.device, tiny=args.tiny, size=args.size, steps=args.steps)

    def spec(mode, batches, **extra):
        repeats = args.ref_repeats if mode.startswith("reference") else args.repeats
        return dict(base, mode=mode, batches=batches, repeats=repeats, **extra)
    yield "cold", spec(first, args.batches)
    yield "warm", spec(first, args.batches)    # a second launch: every batch's first request
    if args.precompile_ab and first.startswith("fast"):
        # cold again: the precompile child spawned after the imports, then none at all
        yield "cold", spec(first, args.batches[:1], early=False, fresh_cache=True,
                           variant="late precompile")
        yield "cold", spec(first, args.batches[:1], precompile=False, fresh_cache=True,
                           variant="no precompile")
    if args.cudnn_ab and first.startswith("fast"):
        from runtime.fast import FastOptions
        flipped = not FastOptions().cudnn_benchmark
        yield "warm", spec(first, args.batches[:1], cudnn_benchmark=flipped,
                           variant=f"cudnn.benchmark={flipped}")
    for mode in modes:
        if mode != first:
            yield "warm", spec(mode, args.batches)
    for kind, path in (checkpoints or {}).items():
        yield "warm", spec(first, args.batches[:1], ckpt=path, variant=f"{kind} checkpoint")


def write_checkpoints(args, folder):
    """Synthetic checkpoints of the benchmarked model's full layout and size (seeded random
    values): upstream's kind (a torch.save'd state dict, .pth) and .safetensors. {kind: path},
    and how long each took to write."""
    import safetensors.torch
    import torch

    from runtime.inputs import CONFIG_FULL, CONFIG_TINY
    from runtime.weights import build_model
    state = build_model(CONFIG_TINY if args.tiny else CONFIG_FULL, random_weights=True,
                        seed=0).state_dict()
    paths, info = {}, {}
    for kind in (".pth", ".safetensors"):
        path = os.path.join(folder, "synthetic" + kind)
        start = time.perf_counter()
        if kind == ".pth":
            torch.save(state, path)
        else:
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
        info[kind] = {"write_s": time.perf_counter() - start,
                      "gb": os.path.getsize(path) / 1e9}
        paths[kind] = path
    return paths, info


def compare(records):
    """Which launches produced the very same images as which (same batch)."""
    found = {}
    for r in records:
        for row in r.get("rows", []) if not r.get("variant") else []:
            found.setdefault((r["mode"], row["batch"]), row["digest"])
    checks = []
    for a, b in (("reference", "reference-lowvram"), ("fast", "fast-lowvram")):
        for (mode, batch), digest in sorted(found.items()):
            if mode == a and (b, batch) in found:
                checks.append({"a": a, "b": b, "batch": batch,
                               "identical": digest == found[(b, batch)]})
    by_variant = [r for r in records if "rows" in r]
    for r in by_variant:
        if r.get("variant", "").startswith(("cudnn", "no precompile", "late precompile")):
            base = next((b for b in by_variant if b["mode"] == r["mode"] and b["launch"] == "warm"
                         and not b.get("variant")), None)
            if base:
                checks.append({"a": f"{r['mode']}", "b": f"{r['mode']} {r['variant']}",
                               "batch": 1, "identical": base["rows"][0]["digest"]
                               == r["rows"][0]["digest"]})
    cold = next((r for r in records if r.get("launch") == "cold" and "rows" in r), None)
    warm = next((r for r in records if r.get("launch") == "warm" and cold and not r.get("variant")
                 and r["mode"] == cold["mode"] and "rows" in r), None)
    if cold and warm:
        checks.append({"a": f"{cold['mode']} cold", "b": f"{warm['mode']} warm",
                       "batch": warm["rows"][0]["batch"],
                       "identical": cold["rows"][0]["digest"] == warm["rows"][0]["digest"]})
    return checks


def build_mem(record):
    if record.get("after_build_gib") is None:
        return "–"
    return f"{record['after_build_gib']:.2f} ({record['build_peak_gib']:.2f})"


def label(record):
    return record["mode"] + (f" ({record['variant']})" if record.get("variant") else "")


PHASES = (("imports", "interpreter + imports"), ("construct", "model build (meta)"),
          ("weights", "weights"), ("fast_convert", "fp16 + transfer + patch"),
          ("precompile", "waiting for the kernel precompile"), ("pipeline", "pipeline"))


def phase_table(records, f):
    """Where each launch's time to the first image goes, and the GPU memory of each phase."""
    lines = ["", "Phases of each launch to its first image (seconds; GPU memory held after the "
             "phase / its peak, GiB). The first request's Triton compile, capture + warm-up "
             "(two eager steps, where cuDNN autotunes and kernels compile, and the capture) and "
             "graph capture proper are parts of it, measured by hooks in this benchmark; "
             "cuDNN autotuning is the difference to the launch with cudnn.benchmark flipped.", "",
             "| launch | " + " | ".join(name for _, name in PHASES[:-1]) +
             " | first request | Triton compile (kernels) | capture + warm-up | graph capture "
             "| first image | first request peak GiB | steady peak GiB |",
             "|---|" + "---|" * (len(PHASES) - 1) + "---|---|---|---|---|---|---|"]
    for r in records:
        if "phases" not in r:
            continue
        p = r["phases"]
        cells = []
        for key, _ in PHASES[:-1]:
            ph = p.get(key) or (p.get("pipeline") if key == "fast_convert" else None)
            if ph is None:
                cells.append("–")
                continue
            mem = (f" ({ph['held_gib']:.2f} / {ph['peak_gib']:.2f})"
                   if ph.get("held_gib") is not None else "")
            cells.append(f"{ph['s']:.2f}{mem}")
        row = r["rows"][0]
        compiles = f(row.get("triton_compile_s"), "{:.2f}") + \
            (f" ({row['triton_compiles']})" if row.get("triton_compiles") is not None else "")
        lines.append(f"| {label(r)} {r['launch']} | " + " | ".join(cells) +
                     f" | {row['first_request_s']:.2f} | {compiles} | "
                     f"{f(row.get('capture_warmup_s'), '{:.2f}')} | "
                     f"{f(row.get('graph_capture_s'), '{:.2f}')} | "
                     f"{f(r.get('first_image_s'), '{:.1f}')} | "
                     f"{f(row.get('first_request_peak_gib'), '{:.2f}')} | "
                     f"{f(row.get('steady_peak_gib'), '{:.2f}')} |")
    ab = [(b, r) for r in records if "rows" in r and str(r.get("variant", "")).startswith("cudnn")
          for b in records if "rows" in b and b["mode"] == r["mode"] and b["launch"] == "warm"
          and not b.get("variant")][:1]
    for base, flipped in ab:
        on, off = (base, flipped) if base.get("cudnn_benchmark") else (flipped, base)
        a, b = on["rows"][0], off["rows"][0]
        lines += ["", f"cuDNN autotuning (warm launches, {on['mode']}, batch {a['batch']}): "
                  f"first request {a['first_request_s']:.2f} s with cudnn.benchmark on, "
                  f"{b['first_request_s']:.2f} s off (autotuning ≈ "
                  f"{a['first_request_s'] - b['first_request_s']:.2f} s); process peak "
                  f"{f(on.get('process_peak_gib'), '{:.2f}')} vs "
                  f"{f(off.get('process_peak_gib'), '{:.2f}')} GiB; steady "
                  f"{f(a['steady_ms'], '{:.0f}')} vs {f(b['steady_ms'], '{:.0f}')} ms "
                  f"(median of {a['steady_n']})."]
    return lines


def markdown(env, args, records, checks, written=None):
    f = lambda v, fmt: "–" if v is None else fmt.format(v)  # noqa: E731
    lines = [f"# canny2image start-up and memory — {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}, HIP {env['hip']}), triton {env['triton']}, "
             f"Python {env['python']}, commit {env['commit']}, {env['time']}", "",
             f"`{env['command']}`", "",
             f"{'Tiny model' if args.tiny else 'SD1.5 + ControlNet'}, seeded random weights, "
             f"{args.size}², {args.steps} DDIM steps, guidance 9. Every launch is a fresh process; "
             "\"cold\" starts with an empty Triton cache folder, \"warm\" reuses it (a second "
             "launch). First image = from spawning the process to the first process() result. "
             "Peak = max_memory_allocated over the steady requests; process peak: the whole "
             "process (build, every batch's first and steady requests; per phase below).", "",
             "| mode | launch | batch | first image s | build s | first request s | steady ms | "
             "peak GiB | process peak GiB | build GiB (peak) | repeatable | digest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {label(r)} | {r['launch']} | – | – | – | – | – | – | – | – | "
                         f"– | {r['error'][:150]} |")
            continue
        for i, row in enumerate(r["rows"]):
            first = f(r.get("first_image_s"), "{:.1f}") if i == 0 else ""
            lines.append(
                f"| {label(r)} | {r['launch']} | {row['batch']} | {first} | "
                f"{f(r['build_s'], '{:.1f}') if i == 0 else ''} | {row['first_request_s']:.2f} | "
                f"{f(row['steady_ms'], '{:.0f}')} | {f(row.get('steady_peak_gib'), '{:.2f}')} | "
                f"{f(r.get('process_peak_gib'), '{:.2f}') if i == 0 else ''} | "
                f"{build_mem(r) if i == 0 else ''} | "
                f"{f(row['repeatable'], '{}')} | `{row['digest']}` |")
    if written:
        lines += ["", "Synthetic checkpoints, written by this run (so the loads below read them "
                  "from a warm page cache): " + ", ".join(
                      f"{kind} {w['gb']:.2f} GB in {w['write_s']:.1f} s"
                      for kind, w in written.items())]
    lines += phase_table(records, f)
    if checks:
        lines += ["", "| same images? | batch | identical |", "|---|---|---|"]
        lines += [f"| {c['a']} vs {c['b']} | {c['batch']} | {'yes' if c['identical'] else 'NO'} |"
                  for c in checks]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (smoke run)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 512; tiny: 64)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 20; tiny: 2)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=None,
                    help="default: all on a GPU; on the CPU the reference ones (fast mode runs "
                         "there only in fp32 without kernels or graphs: name it to smoke-test it)")
    ap.add_argument("--repeats", type=int, default=3, help="steady requests per fast row")
    ap.add_argument("--ref-repeats", type=int, default=1, help="steady requests per reference row")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per launch")
    ap.add_argument("--cudnn-ab", action="store_true",
                    help="one more warm launch of the default mode with cudnn.benchmark flipped")
    ap.add_argument("--precompile-ab", action="store_true",
                    help="two more cold launches of fast mode: the kernel precompile spawned "
                         "after the imports, and none (kernels compile on first use)")
    ap.add_argument("--checkpoints", action="store_true",
                    help="write synthetic checkpoints (.pth as upstream's, .safetensors) of the "
                         "model's full size and time launches that load them")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: device and date)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.modes is None:
        gpu = args.device.startswith("cuda")
        args.modes = [m for m in MODES if gpu or not m.startswith("fast")]
    args.size = args.size or (64 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 20)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    env = environment(args)
    began = time.perf_counter()
    triton_cache = tempfile.mkdtemp(prefix="bench_startup_triton_")
    records = []
    checkpoints, written = None, None
    try:
        if args.checkpoints:
            checkpoints, written = write_checkpoints(args, triton_cache)
            print(f"[{time.perf_counter() - began:6.1f} s] wrote synthetic checkpoints: "
                  f"{written}", flush=True)
        for name, spec in plan(args, checkpoints):
            record = dict(launch(spec, triton_cache, args.timeout), launch=name)
            records.append(record)
            status = record.get("error") or (f"first image {record['first_image_s']:.1f} s, "
                                             f"build {record['build_s']:.1f} s")
            print(f"[{time.perf_counter() - began:6.1f} s] {label(spec):30s} {name}: {status}",
                  flush=True)
    finally:
        shutil.rmtree(triton_cache, ignore_errors=True)
    checks = compare(records)
    tag = args.tag or (re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")
                       + ("_tiny" if args.tiny else "") + time.strftime("_%Y%m%d"))
    os.makedirs(args.out, exist_ok=True)
    result = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "child"},
              "records": records, "checks": checks, "checkpoints_written": written,
              "total_s": time.perf_counter() - began}
    paths = [os.path.join(args.out, f"startup_{tag}.{ext}") for ext in ("json", "md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(env, args, records, checks, written)
    with open(paths[1], "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {paths[0]} and {paths[1]} ({result['total_s']:.0f} s)")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
