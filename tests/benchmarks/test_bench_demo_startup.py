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
    assert "| launch | page served s | model built s | first image s |" in table
    assert table.count("| – | – |") == 2
