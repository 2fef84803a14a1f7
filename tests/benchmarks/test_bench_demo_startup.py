"""benchmarks/bench_demo_startup.py on the CPU with the tiny model and no requests: two launches
of the real demo script, each with the time its page was served and its model was built."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_page_and_model_times_of_two_launches(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench_demo_startup.py", "--no-requests",
                           "--timeout", "120", "--out", str(tmp_path), "--tag", "t", "--",
                           "--tiny", "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "demo_startup_t.json").read_text())
    assert data["demo_flags"] == ["--tiny", "--device", "cpu"]
    for name in ("cold", "warm"):
        launch = data["launches"][name]
        assert "error" not in launch, launch
        assert 0 < launch["page_s"] < 120 and 0 < launch["model_s"] < 120, launch
        assert "first_image_s" not in launch
    table = (tmp_path / "demo_startup_t.md").read_text()
    assert "| launch | page served s | model built s | first image s | steady request ms" in table
    assert table.count("| – | – / – |") == 2


def test_requests_through_both_clients(tmp_path):
    """With requests (a small shape on the CPU): the first image and the steady requests through
    gradio_client and plain HTTP."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_demo_startup.py", "--repeats", "2",
                           "--size", "256", "--steps", "1", "--timeout", "200", "--out",
                           str(tmp_path), "--tag", "r", "--", "--tiny", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "demo_startup_r.json").read_text())
    assert (data["size"], data["steps"]) == (256, 1)
    for launch in data["launches"].values():
        assert "error" not in launch, launch
        assert launch["page_s"] < launch["first_image_s"], launch
        assert launch["steady_ms"] > 0 and launch["steady_raw_ms"] > 0, launch
    assert "requests of one image, 256², 1 step." in (tmp_path / "demo_startup_r.md").read_text()
