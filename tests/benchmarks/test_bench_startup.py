"""benchmarks/bench_startup.py's smoke mode: fresh processes on the tiny model on the CPU, its
JSON and markdown, and the comparisons it makes (reference vs low-VRAM, cold vs warm launch)."""
import json
import os
import sys

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_startup  # noqa: E402


def test_smoke_run_on_the_tiny_model(tmp_path):
    code = bench_startup.main(["--tiny", "--device", "cpu", "--modes", "reference",
                               "reference-lowvram", "--batches", "1", "--steps", "1",
                               "--ref-repeats", "1", "--out", str(tmp_path), "--tag", "smoke"])
    assert code == 0
    result = json.loads((tmp_path / "startup_smoke.json").read_text())
    records = result["records"]
    assert [(r["mode"], r["launch"]) for r in records] == [
        ("reference", "cold"), ("reference", "warm"), ("reference-lowvram", "warm")]
    for r in records:
        assert "error" not in r, r
        assert 0 < r["imported_s"] < r["built_s"] < r["first_image_s"] <= r["wall_s"]
        assert r["pipeline_mode"] == "reference"
        (row,) = r["rows"]
        assert row["batch"] == 1 and row["steady_n"] == 1 and row["steady_ms"] > 0
        assert row["repeatable"] is True
    assert {(c["a"], c["b"]): c["identical"] for c in result["checks"]} == {
        ("reference", "reference-lowvram"): True, ("reference cold", "reference warm"): True}
    assert result["env"]["torch"] and result["env"]["command"]
    text = (tmp_path / "startup_smoke.md").read_text()
    assert "| reference-lowvram | warm | 1 |" in text and "reference vs reference-lowvram" in text


def test_plan_runs_the_default_mode_cold_then_warm_then_the_rest():
    gpu = bench_startup.parse_args(["--device", "cuda"])
    names = [(name, spec["mode"], tuple(spec["batches"])) for name, spec in bench_startup.plan(gpu)]
    assert names == [("cold", "fast", (1, 4)), ("warm", "fast", (1, 4)),
                     ("warm", "reference", (1, 4)), ("warm", "fast-lowvram", (1, 4)),
                     ("warm", "reference-lowvram", (1, 4))]
    cpu = bench_startup.parse_args(["--device", "cpu", "--tiny"])
    assert [spec["mode"] for _, spec in bench_startup.plan(cpu)] == [
        "reference", "reference", "reference-lowvram"]
    assert (cpu.size, cpu.steps) == (64, 2)


def test_fast_low_vram_row_on_the_tiny_model(tmp_path):
    """The fast-lowvram row builds and runs fast mode under --low-vram (not a fallback to
    reference) and gives the images of the fast row (on the CPU fast mode is fp32 and the
    low-VRAM moves stay in host memory, so bit for bit)."""
    code = bench_startup.main(["--tiny", "--device", "cpu", "--modes", "fast", "fast-lowvram",
                               "--batches", "1", "--steps", "1", "--repeats", "1",
                               "--out", str(tmp_path), "--tag", "fast"])
    assert code == 0
    result = json.loads((tmp_path / "startup_fast.json").read_text())
    assert [(r["mode"], r["launch"], r["pipeline_mode"]) for r in result["records"]] == [
        ("fast", "cold", "fast"), ("fast", "warm", "fast"), ("fast-lowvram", "warm", "fast")]
    assert {(c["a"], c["b"]): c["identical"] for c in result["checks"]} == {
        ("fast", "fast-lowvram"): True, ("fast cold", "fast warm"): True}


def test_phases_cudnn_flip_and_synthetic_checkpoints_on_the_tiny_model(tmp_path):
    """Every launch reports its phases (they add up to no more than its first image); the
    cudnn.benchmark-flipped launch and the launches that load the synthetic .pth / .safetensors
    checkpoints (the seeded random weights, saved) give the random-weight launch's very images."""
    code = bench_startup.main(["--tiny", "--device", "cpu", "--modes", "fast", "--batches", "1",
                               "--steps", "1", "--repeats", "0", "--cudnn-ab", "--checkpoints",
                               "--out", str(tmp_path), "--tag", "phases"])
    assert code == 0
    result = json.loads((tmp_path / "startup_phases.json").read_text())
    records = result["records"]
    assert [(r["launch"], r.get("variant")) for r in records] == [
        ("cold", None), ("warm", None), ("warm", "cudnn.benchmark=True"),
        ("warm", ".pth checkpoint"), ("warm", ".safetensors checkpoint")]
    digests = {r["rows"][0]["digest"] for r in records}
    assert len(digests) == 1
    assert [r["cudnn_benchmark"] for r in records] == [False, False, True, False, False]
    for r in records:
        phases = r["phases"]
        assert list(phases) == ["imports", "construct", "weights", "fast_convert",
                                "first_request_b1"]
        assert all(p["s"] >= 0 for p in phases.values())
        assert sum(p["s"] for p in phases.values()) <= r["first_image_s"] + 0.5
        assert r["rows"][0]["triton_compiles"] == 0        # no kernels on the CPU
    assert set(result["checkpoints_written"]) == {".pth", ".safetensors"}
    text = (tmp_path / "startup_phases.md").read_text()
    assert "| fast (.safetensors checkpoint) warm |" in text and "cuDNN autotuning" in text
