"""benchmarks/bench_web_path.py on a small stand-in: every path measured (the page in headless
Chromium too), and the web path is the raw HTTP request's time less the direct call's."""
import json
import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_web_path  # noqa: E402


def test_small_run_reports_every_path(tmp_path):
    out = tmp_path / "web.json"
    assert bench_web_path.main(["--size", "256", "--samples", "2", "--repeats", "2", "--warmup",
                                "1", "--browser", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 2 and result["size"] == 256
    for key in ("direct_ms", "png_ms", "client_ms", "raw_ms", "browser_ms"):
        assert result[key] > 0, key
    # the direct call does the PNG encoding (once a coroutine that was never awaited: ~0 ms)
    assert result["direct_ms"] > 0.3 * result["png_ms"]
    assert 0 < result["browser_result_ms"] <= result["browser_files_ms"] <= result["browser_ms"]
    assert result["web_path_ms"] == result["raw_ms"] - result["direct_ms"]
    assert result["client_overhead_ms"] == result["client_ms"] - result["direct_ms"]
    assert result["browser_web_path_ms"] == result["browser_ms"] - result["direct_ms"]


def test_the_direct_call_must_return_the_files(monkeypatch):
    """A direct call that returns no files (as when it was a coroutine never awaited) is an
    error, not a 0 ms measurement."""
    import gradio_canny2image as app
    monkeypatch.setattr(app, "make_process", lambda pipelines: (lambda *a, **k: _none(), 1))
    with pytest.raises(SystemExit, match="the direct call returned None"):
        bench_web_path.main(["--size", "64", "--repeats", "1", "--warmup", "0"])


async def _none():
    return None


def test_stand_in_returns_edge_map_and_samples():
    images = bench_web_path.StandIn(64, 3).process()
    assert len(images) == 4 and images[0].shape == (64, 64, 3) and images[0].dtype.name == "uint8"
