"""Start-up and memory benchmark: every figure from a fresh process, as a user launches one.

Each configuration runs in its own subprocess, which builds its pipeline as every entry point does
(runtime.app.build_pipeline: the same weights, mode and --low-vram handling), and reports:
  * time to the first image, from the moment the process is spawned (interpreter start, imports,
    model build, the first request with its kernel compilation and graph capture);
  * the model build alone and the first request alone;
  * steady-state latency of process() (median of --repeats requests after the first);
  * peak GPU memory (torch.cuda.max_memory_allocated): over a steady request, over the whole
    process (build and first request included), and after / at most during the model build;
  * a digest of the images, so configurations that must agree bit for bit can be compared
    (reference vs reference low-VRAM; a cold vs a warm launch).

Launches: the device's default mode twice with one Triton cache folder, empty before the first
("cold") and filled by it for the second ("warm", i.e. a second launch); then the other modes.
Modes: reference, fast, fast low-VRAM, reference low-VRAM (fast ones only on a GPU), at --size²
with each of --batches. Input: runtime.sample's picture; seeded random weights (timings do not
depend on their values). Results: startup_<tag>.json and startup_<tag>.md under --out, with
device, versions, commit (git, else the GIT_COMMIT variable) and the command.

  python benchmarks/bench_startup.py                       # GPU: the full set (~4 min on an H200)
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

def child(spec):
    """Runs in the fresh process: build as every entry point does (runtime.app), time requests,
    print one JSON line."""
    spawned = float(os.environ["BENCH_SPAWN_TIME"])
    import numpy as np
    import torch

    from runtime.app import build_pipeline
    from runtime.sample import sample_image

    cuda = spec["device"].startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gib(value):
        return value / 2**30 if cuda else None

    record = {"imported_s": time.time() - spawned}
    start = time.perf_counter()
    pipe = build_pipeline(spec["device"], mode=spec["mode"].split("-")[0], tiny=spec["tiny"],
                          random_weights=not spec["tiny"],
                          low_vram=spec["mode"].endswith("lowvram"))
    sync()
    record["build_s"] = time.perf_counter() - start
    record["built_s"] = time.time() - spawned
    record["after_build_gib"] = gib(torch.cuda.memory_allocated()) if cuda else None
    record["build_peak_gib"] = gib(torch.cuda.max_memory_allocated()) if cuda else None
    image = sample_image(spec["size"], spec["size"])
    rows = []
    process_peak = 0           # the allocator's peak is reset per steady request: keep the max

    def peak_so_far():
        return max(process_peak, torch.cuda.max_memory_allocated()) if cuda else 0
    for batch in spec["batches"]:
        params = dict(prompt="a house under the sun", a_prompt="best quality, extremely detailed",
                      n_prompt="lowres, bad anatomy, worst quality", num_samples=batch,
                      image_resolution=spec["size"], ddim_steps=spec["steps"], guess_mode=False,
                      strength=1.0, scale=9.0, seed=12345, eta=0.0, low_threshold=100,
                      high_threshold=200)
        start = time.perf_counter()
        images = pipe.process(image, **params)
        sync()
        row = {"batch": batch, "first_request_s": time.perf_counter() - start}
        if "first_image_s" not in record:
            record["first_image_s"] = time.time() - spawned
        steady = []
        process_peak = peak_so_far()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            again = pipe.process(image, **params)
            sync()
            steady.append(time.perf_counter() - start)
        if cuda:
            row["steady_peak_gib"] = gib(torch.cuda.max_memory_allocated())
        row["steady_ms"] = 1e3 * float(np.median(steady)) if steady else None
        row["steady_n"] = len(steady)
        row["repeatable"] = all(np.array_equal(a, b) for a, b in zip(images, again)) if steady \
            else None
        row["digest"] = hashlib.sha256(b"".join(np.ascontiguousarray(i).tobytes()
                                                for i in images)).hexdigest()[:16]
        rows.append(row)
    if cuda:
        record["process_peak_gib"] = gib(peak_so_far())
        record["reserved_at_end_gib"] = gib(torch.cuda.memory_reserved())
    record["rows"] = rows
    record["pipeline_mode"] = getattr(pipe, "mode", None)
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
    """One fresh process for `spec`; its record, or an error."""
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


def plan(args):
    """(launch name, spec) in order: the default mode cold then warm, then the other modes."""
    gpu = args.device.startswith("cuda")
    modes = args.modes
    first = "fast" if gpu and "fast" in modes else modes[0]
    base = dict(device=args.device, tiny=args.tiny, size=args.size, steps=args.steps)

    def spec(mode, batches):
        repeats = args.ref_repeats if mode.startswith("reference") else args.repeats
        return dict(base, mode=mode, batches=batches, repeats=repeats)
    yield "cold", spec(first, args.batches)
    yield "warm", spec(first, args.batches[:1])
    for mode in modes:
        if mode != first:
            yield "warm", spec(mode, args.batches)


def compare(records):
    """Which launches produced the very same images as which (same batch)."""
    found = {}
    for r in records:
        for row in r.get("rows", []):
            found.setdefault((r["mode"], row["batch"]), row["digest"])
    checks = []
    for a, b in (("reference", "reference-lowvram"), ("fast", "fast-lowvram")):
        for (mode, batch), digest in sorted(found.items()):
            if mode == a and (b, batch) in found:
                checks.append({"a": a, "b": b, "batch": batch,
                               "identical": digest == found[(b, batch)]})
    cold = next((r for r in records if r.get("launch") == "cold" and "rows" in r), None)
    warm = next((r for r in records if r.get("launch") == "warm" and cold
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


def markdown(env, args, records, checks):
    f = lambda v, fmt: "–" if v is None else fmt.format(v)  # noqa: E731
    lines = [f"# canny2image start-up and memory — {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}, HIP {env['hip']}), triton {env['triton']}, "
             f"Python {env['python']}, commit {env['commit']}, {env['time']}", "",
             f"`{env['command']}`", "",
             f"{'Tiny model' if args.tiny else 'SD1.5 + ControlNet'}, seeded random weights, "
             f"{args.size}², {args.steps} DDIM steps, guidance 9. Every launch is a fresh process; "
             "\"cold\" starts with an empty Triton cache folder, \"warm\" reuses it (a second "
             "launch). First image = from spawning the process to the first process() result. "
             "Peak = max_memory_allocated over one steady request; process peak includes the "
             "build and the first request.", "",
             "| mode | launch | batch | first image s | build s | first request s | steady ms | "
             "peak GiB | process peak GiB | build GiB (peak) | repeatable | digest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['launch']} | – | – | – | – | – | – | – | – | – | "
                         f"{r['error'][:150]} |")
            continue
        for i, row in enumerate(r["rows"]):
            first = f(r.get("first_image_s"), "{:.1f}") if i == 0 else ""
            lines.append(
                f"| {r['mode']} | {r['launch']} | {row['batch']} | {first} | "
                f"{f(r['build_s'], '{:.1f}') if i == 0 else ''} | {row['first_request_s']:.2f} | "
                f"{f(row['steady_ms'], '{:.0f}')} | {f(row.get('steady_peak_gib'), '{:.2f}')} | "
                f"{f(r.get('process_peak_gib'), '{:.2f}') if i == 0 else ''} | "
                f"{build_mem(r) if i == 0 else ''} | "
                f"{f(row['repeatable'], '{}')} | `{row['digest']}` |")
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
    try:
        for name, spec in plan(args):
            record = dict(launch(spec, triton_cache, args.timeout), launch=name)
            records.append(record)
            status = record.get("error") or (f"first image {record['first_image_s']:.1f} s, "
                                             f"build {record['build_s']:.1f} s")
            print(f"[{time.perf_counter() - began:6.1f} s] {spec['mode']:18s} {name}: {status}",
                  flush=True)
    finally:
        shutil.rmtree(triton_cache, ignore_errors=True)
    checks = compare(records)
    tag = args.tag or (re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")
                       + ("_tiny" if args.tiny else "") + time.strftime("_%Y%m%d"))
    os.makedirs(args.out, exist_ok=True)
    result = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "child"},
              "records": records, "checks": checks,
              "total_s": time.perf_counter() - began}
    paths = [os.path.join(args.out, f"startup_{tag}.{ext}") for ext in ("json", "md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(env, args, records, checks)
    with open(paths[1], "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {paths[0]} and {paths[1]} ({result['total_s']:.0f} s)")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
