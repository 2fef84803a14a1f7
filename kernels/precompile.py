"""Compile fast mode's Triton kernels before its first request: in parallel, in a child process,
while the parent builds the model.

    pre = precompile.start(device, (512, 640), batch=1)   # spawns the child, or None
    ...                                                   # build the model meanwhile
    print(pre.wait())                                     # "34 kernels compiled in 2.1 s ..."

Without it the first request compiles every kernel in turn as it reaches its first launch (34 on
an H200: 11 s of the 30 s to a cold first image, plus the C launchers Triton 3.6 builds). The
child (`python -m kernels.precompile`) records the launches on meta tensors as
kernels.compile_report does, for the real GPU (platform.device_target()) and the run's image size
and batch, and hands each distinct one, as soon as it is recorded, to a pool of worker processes
that compile it with triton.compile and build its launcher. Both land in Triton's on-disk cache
(TRITON_CACHE_DIR, else ~/.triton/cache: per user, kept across runs) under the keys the parent's
own JIT computes, so the parent's first launches load them from disk. A launch the recording misses is compiled by the parent as before:
only slower, never different. A marker in the cache folder (per Triton, torch, kernel sources,
GPU, size and batch) makes a second launch skip the child altogether.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from . import platform

_KERNELS = os.path.dirname(os.path.abspath(__file__))


def cache_dir() -> str:
    """Triton's on-disk cache folder, as Triton itself resolves it."""
    from triton import knobs
    return knobs.cache.dir


def _key(target: platform.Target, hw, batch, config=None) -> str:
    import torch
    import triton
    h = hashlib.sha256(repr((triton.__version__, torch.__version__, dataclasses.astuple(target),
                             tuple(hw), batch)).encode())
    if config:
        with open(config, "rb") as f:
            h.update(f.read())
    for name in sorted(os.listdir(_KERNELS)):
        if name.endswith(".py"):
            with open(os.path.join(_KERNELS, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:32]


def _marker(key: str) -> str:
    return os.path.join(cache_dir(), "canny2image_precompiled", key)


class Precompile:
    """A running child: wait() for it, or cancel() it."""

    def __init__(self, proc, result_path, started, early=False):
        self.proc, self.result_path, self.started, self.early = proc, result_path, started, early

    def cancel(self):
        """Stop the child (the caller's build failed: nothing will use its kernels)."""
        self.proc.kill()
        self.proc.wait()
        try:
            os.unlink(self.result_path)
        except OSError:
            pass

    def wait(self, timeout=300.0) -> str:
        """Wait for the child (at most `timeout` s) and say in one line what it did."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"kernel precompile stopped after {timeout:.0f} s; the rest compile on first use"
        waited = time.perf_counter() - self.started
        try:
            with open(self.result_path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"error": f"the precompile process ended with status {self.proc.returncode}"}
        finally:
            try:
                os.unlink(self.result_path)
            except OSError:
                pass
        if "error" in res:
            return f"kernel precompile skipped ({res['error']}); kernels compile on first use"
        failed = f", {len(res['failed'])} failed (compiled on first use)" if res["failed"] else ""
        when = " (spawned before the imports)" if self.early else ""
        return (f"{res['kernels']} kernels compiled in {res['seconds']:.1f} s by {res['workers']} "
                f"processes{failed}; ready {waited:.1f} s after the start{when}")


def start(device, hw, batch=1, config=None, early=None) -> Precompile | None:
    """Start the child for fast mode on `device` (a CUDA/HIP torch.device) at image size
    hw = (H, W) and `batch` images per request, for the model of `config` (default: the
    full-size one); None where there is nothing to do: no GPU kernels (CPU, no Triton, the
    interpreter), a Triton release the recorder is not verified on, or this exact set already
    compiled (the marker). `early`: a runtime.early.EarlyChild, spawned before the caller's
    imports, that gets the job instead of a new child (and is discarded where there is none)."""
    job = _job(device, hw, batch, config)
    if job is None:
        if early is not None:
            early.discard()
        return None
    if early is not None:
        early.send(job)
        return Precompile(early.proc, job["result"], early.started, early=True)
    args = [sys.executable, "-m", "kernels.precompile"]
    for flag, value in job.items():
        args += [f"--{flag}", *map(str, value if isinstance(value, list) else [value])]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen(args, cwd=os.path.dirname(_KERNELS), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return Precompile(proc, job["result"], time.perf_counter())


def _job(device, hw, batch, config):
    """The child's flags as a dict (start()'s docstring says when there is no job: None)."""
    import torch
    from .compile_report import triton_version_ok
    device = torch.device(device)
    if device.type != "cuda" or not platform.triton_available() or platform.is_interpreter():
        return None
    if not triton_version_ok()[0]:
        return None
    target = platform.device_target(device.index)
    config = os.path.abspath(config) if config else None
    key = _key(target, hw, batch, config)
    if os.path.exists(_marker(key)):
        return None
    fd, result_path = tempfile.mkstemp(prefix="canny2image_precompile_", suffix=".json")
    os.close(fd)
    os.unlink(result_path)  # the child writes it when done
    job = {"target": json.dumps(dataclasses.asdict(target)), "hw": list(hw), "batch": batch,
           "key": key, "result": result_path}
    if config:
        job["config"] = config
    return job


# -- the child ------------------------------------------------------------------------------------
def _launcher_cls():
    from triton.runtime.driver import driver
    try:
        return driver.active.launcher_cls   # loads the driver library; no GPU context
    except RuntimeError:   # no GPU driver here (compiling for another machine): no launchers
        return None


def _compile(job):
    """Worker: compile one launch (a picklable description of it) for the target and build its
    launcher (Triton 3.6 compiles each launcher with the C compiler, cached like the kernel).
    (seconds, error or None)."""
    import triton
    from triton.compiler import ASTSource
    from .compile_report import _gpu_target
    module, name, signature, constexprs, attrs, options, target = job
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(module), name)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=_gpu_target(target), options=options)
        launcher_cls = _launcher_cls()
        if launcher_cls is not None:
            launcher_cls(compiled.src, compiled.metadata)
    except Exception as e:  # the parent compiles it on first use and says so
        return time.perf_counter() - t0, f"{name}: {type(e).__name__}: {e}".splitlines()[0]
    return time.perf_counter() - t0, None


def precompile(target: platform.Target, hw, batch=1, workers=None, config=None,
               model=None) -> dict:
    """Record fast mode's launches for `target` at image size hw and `batch` (the model of
    `config`, default full size, or `model`: that one already built on meta tensors), each
    compiled in a pool of `workers` processes (default: all cores but two: the parent builds its
    model meanwhile) as soon as the recording meets it. What was done, as a dict."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    from .compile_report import CONFIG_FULL, build_model, record
    t0 = time.perf_counter()
    torch.set_num_threads(1)   # meta tensors: no work for threads; the cores are the workers'
    workers = workers or max(1, (os.cpu_count() or 2) - 2)
    cuda_before_fork = torch.cuda.is_initialized()
    futures = []
    # fork: the workers start with this process's modules imported; it has not touched the GPU.
    # The workers run at a lower priority: the recording here and the parent's build are the
    # critical path, the compiles fill the cores they leave.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=os.nice, initargs=(5,)) as pool:
        def submit(lch):
            futures.append(pool.submit(_compile, (lch.fn.module, lch.fn.__name__, lch.signature,
                                                  lch.constexprs, lch.attrs, lch.options, target)))
        model = model or build_model(config=config or CONFIG_FULL)
        # model batches: [uncond; cond] rows of the batch (and of one image), CLIP's two prompts
        launches = record(target, model, batches=sorted({2, 2 * batch}), size=tuple(hw),
                          decode_batch=batch, on_new=submit)
        recorded = time.perf_counter() - t0
        results = [f.result() for f in futures]
    return {"kernels": len(launches), "workers": workers, "record_s": round(recorded, 2),
            "cuda_initialized_before_fork": cuda_before_fork,
            "seconds": round(time.perf_counter() - t0, 2),
            "compile_s": round(sum(s for s, _ in results), 2),
            "failed": [err for _, err in results if err]}


def _job_from_stdin():
    """--job-stdin: build the full-size meta model while the parent is still importing, then
    read the job (the flags below as one JSON object) from stdin; (job, model) or None on EOF
    (the parent discarded the child)."""
    from .compile_report import CONFIG_FULL, build_model
    model = build_model(config=CONFIG_FULL)
    line = sys.stdin.readline()
    if not line.strip():
        return None
    job = json.loads(line)
    if job.get("config") and os.path.abspath(job["config"]) != os.path.abspath(CONFIG_FULL):
        model = None   # another model: precompile() builds it
    return job, model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job-stdin", action="store_true",
                   help="prepare at once, then read the flags below from stdin as one JSON "
                        "object (runtime/early.py); nothing there: exit")
    p.add_argument("--target", help="a platform.Target as JSON")
    p.add_argument("--hw", type=int, nargs=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--key", help="write the marker of this key when every launch compiled")
    p.add_argument("--result", help="write what was done here (JSON)")
    p.add_argument("--workers", type=int)
    p.add_argument("--config", help="model config (default: the full-size one)")
    args = p.parse_args(argv)
    model = None
    if args.job_stdin:
        got = _job_from_stdin()
        if got is None:
            return 0
        job, model = got
        args = argparse.Namespace(**{**vars(args), **job})
    if not (args.target and args.hw and args.result):
        p.error("--target, --hw and --result are needed (or --job-stdin)")
    try:
        target = platform.Target(**json.loads(args.target))
        res = precompile(target, args.hw, args.batch, args.workers, args.config, model)
        if args.key and not res["failed"]:
            os.makedirs(os.path.dirname(_marker(args.key)), exist_ok=True)
            open(_marker(args.key), "w").close()
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, args.result)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
