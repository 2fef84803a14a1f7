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
    assert names == [("cold", "fast", (1, 4)), ("warm", "fast", (1,)),
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
