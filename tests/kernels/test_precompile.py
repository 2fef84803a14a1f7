"""kernels/precompile.py: fast mode's kernels compiled ahead, in a child process, into Triton's
on-disk cache under the keys the runtime's own JIT computes.

CPU: the child (`python -m kernels.precompile`, its real command line) compiles every recorded
launch for sm90 (the H100/H200) with no GPU, and a second process that compiles the same launches
finds each one in the cache (Triton's compilation listener says cache_hit); the marker makes a
second start a no-op; a child that fails is reported in one line; the child runtime/early.py
spawns before the job is known takes it on stdin. GPU: a fast generation after the precompile
(early child, as the installed CLI) compiles nothing itself (every JIT compile is a cache hit).
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import platform, precompile
from runtime import app

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


def _python(code, env, timeout=900):
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_child_compiles_every_launch_into_the_cache_the_jit_reads(tmp_path):
    from kernels.compile_report import triton_version_ok
    if not triton_version_ok()[0]:
        pytest.fail(triton_version_ok()[1])
    cache, result = tmp_path / "cache", tmp_path / "result.json"
    target = json.dumps(dataclasses.asdict(platform.TARGETS["sm90"]))
    res = subprocess.run([sys.executable, "-m", "kernels.precompile", "--target", target,
                          "--hw", "256", "320", "--batch", "1", "--key", "k1",
                          "--result", str(result)], cwd=REPO, env=_env(cache),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    done = json.loads(result.read_text())
    assert done["failed"] == [] and done["kernels"] > 20, done
    assert (cache / "canny2image_precompiled" / "k1").exists()
    assert done["cuda_initialized_before_fork"] is False
    # Another process records the same launches and compiles them as Triton's JIT does
    # (triton.compile(ASTSource, target, options)): every one is a cache hit.
    out = _python("""
        import json
        import triton
        from triton import knobs
        from triton.compiler import ASTSource
        from kernels import compile_report
        hits = []
        knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        launches = compile_report.record("sm90", batches=(2,), size=(256, 320))
        for lch in launches:
            triton.compile(ASTSource(lch.fn, lch.signature, lch.constexprs, lch.attrs),
                           target=compile_report._gpu_target(compile_report.platform.TARGETS["sm90"]),
                           options=lch.options)
        print(json.dumps({"launches": len(launches), "hits": hits}))
        """, _env(cache))
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["launches"] > 20 and len(seen["hits"]) == seen["launches"]
    assert all(seen["hits"]), f"{seen['hits'].count(False)} of {seen['launches']} compiled again"


def test_a_failing_child_is_one_line_and_the_marker_skips_a_second_start(tmp_path, monkeypatch):
    result = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "-m", "kernels.precompile", "--target",
                             '{"name": "nonsense"}', "--hw", "64", "64", "--result", str(result)],
                            cwd=REPO, env=_env(tmp_path / "cache"))
    line = precompile.Precompile(proc, str(result), 0.0).wait(timeout=120)
    assert line.startswith("kernel precompile skipped (TypeError") and "\n" not in line, line
    assert not result.exists()

    # start(): nothing to do on the CPU, nor where this exact set is marked as compiled
    assert precompile.start(torch.device("cpu"), (512, 512)) is None
    target = platform.TARGETS["sm90"]
    monkeypatch.setattr(platform, "device_target", lambda index=None: target)
    monkeypatch.setattr(platform, "is_interpreter", lambda: False)
    monkeypatch.setattr(precompile, "cache_dir", lambda: str(tmp_path / "cache"))
    marker = precompile._marker(precompile._key(target, (512, 512), 1))
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    assert precompile.start(torch.device("cuda"), (512, 512), 1) is None
    # another size, batch or config is another key
    assert precompile._key(target, (512, 640), 1) != precompile._key(target, (512, 512), 1)
    assert precompile._key(target, (512, 512), 4) != precompile._key(target, (512, 512), 1)


def test_the_early_child_gets_its_job_on_stdin_and_compiles_it(tmp_path, monkeypatch):
    """runtime/early.py's child, spawned before the job is known, as the installed CLI spawns it
    (a GPU is faked for start(): the sm90 target)."""
    from runtime import early
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    target = platform.TARGETS["sm90"]
    monkeypatch.setattr(platform, "device_target", lambda index=None: target)
    monkeypatch.setattr(platform, "is_interpreter", lambda: False)
    monkeypatch.setattr(precompile, "cache_dir", lambda: str(cache))
    monkeypatch.setattr(early, "GPU_DEVICE_FILES", (__file__,))   # a GPU driver, as it were
    child = early.spawn(["--prompt", "a house"])
    pre = precompile.start(torch.device("cuda"), (128, 192), 1, early=child)
    assert pre is not None and pre.proc is child.proc
    line = pre.wait(timeout=600)
    assert "kernels compiled" in line and "failed" not in line, line
    assert line.endswith("(spawned before the imports)"), line
    assert os.path.exists(precompile._marker(precompile._key(target, (128, 192), 1)))
    # compiled: a second start has nothing to do, and discards the child it was handed
    child = early.spawn([])
    assert precompile.start(torch.device("cuda"), (128, 192), 1, early=child) is None
    assert child.proc.poll() is not None


def test_the_early_child_is_spawned_only_where_fast_mode_may_run_and_exits_on_eof(
        monkeypatch, tmp_path):
    from runtime import early
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(early, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert early.spawn([]) is None    # no GPU driver
    (tmp_path / "nvidiactl").touch()
    for argv in (["--tiny"], ["--help"], ["--mode", "reference"], ["--mode=reference"],
                 ["--device", "cpu"], ["x.png", "--device=cpu"]):
        assert early.spawn(argv) is None, argv
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert early.spawn([]) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    child = early.spawn(["--mode", "fast", "photo.png"])
    child.proc.stdin.close()         # the parent ended without a job: the child just exits
    assert child.proc.wait(120) == 0
    child = early.spawn(["--device", "cuda"])
    child.discard()                  # or is stopped
    assert child.proc.poll() is not None
    # the CLI and the demo discard it where there is no job: reference mode on the CPU
    assert app.start_precompile(torch.device("cpu"), "reference", (512, 512, 1),
                                early=(child := early.spawn([]))) is None
    assert child.proc.poll() is not None


def test_app_precompiles_only_for_fast_mode_on_the_full_model():
    assert app.start_precompile(torch.device("cpu"), "reference", (512, 512, 1)) is None
    assert app.start_precompile(torch.device("cuda"), "fast", (512, 512, 1), tiny=True) is None


@pytest.mark.gpu
def test_a_fast_generation_after_the_precompile_compiles_nothing_itself(tmp_path):
    out = _python("""
        from runtime import early
        child = early.spawn([])   # as the installed CLI: before the imports
        import json, time
        import numpy as np
        import torch
        from triton import knobs
        from runtime import app
        from runtime.sample import sample_image
        device = torch.device("cuda")
        pre = app.start_precompile(device, "fast", (512, 512, 1), early=child)
        pipe = app.build_pipeline(device, mode="fast", random_weights=True)
        line = pre.wait()
        misses = []
        knobs.compilation.listener = lambda src, cache_hit, **kw: cache_hit or misses.append(src.name)
        pipe.process(sample_image(512, 512), prompt="a house", a_prompt="", n_prompt="",
                     num_samples=1, image_resolution=512, ddim_steps=2, guess_mode=False,
                     strength=1.0, scale=9.0, seed=1, eta=0.0, low_threshold=100,
                     high_threshold=200)
        print(json.dumps({"line": line, "misses": misses, "early": child is not None}))
        """, _env(tmp_path / "cache"), timeout=600)
    seen = json.loads(out.strip().splitlines()[-1])
    assert "kernels compiled" in seen["line"] and "failed" not in seen["line"], seen["line"]
    assert seen["line"].endswith("(spawned before the imports)"), seen["line"]
    assert seen["misses"] == [] and seen["early"], seen
