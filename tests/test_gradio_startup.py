"""The demo serves its page at once and builds and warms up the model behind it
(gradio_canny2image.Startup): the page says it is loading, then warming up; a request sent
meanwhile waits and then succeeds; a failed warm-up lets requests run; a failed build ends the
demo with one line. CPU, tiny model; the build and the warm-up are replaced by ones that wait for
the test (on the CPU there is nothing to warm up)."""
import os
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

import gradio_canny2image as app  # noqa: E402
from runtime.inputs import CONFIG_TINY  # noqa: E402
from runtime.sample import sample_image  # noqa: E402
from conftest import launch_demo  # noqa: E402
from test_gradio_app import DEFAULTS, FAST, ORDER  # noqa: E402


class _Gate:
    """Stands in for warm_up: records that it ran, and returns when the test opens the gate."""

    def __init__(self, fail=False):
        self.open, self.started, self.fail = threading.Event(), threading.Event(), fail
        self.calls = []

    def __call__(self, pipelines):
        self.started.set()
        self.calls.append(pipelines)
        assert self.open.wait(120)
        if self.fail:
            raise RuntimeError("warm-up broke")
        return 1.0


def _tiny_pipeline():
    """The tiny model's pipeline, whose process() records when it is called: (pipeline, calls)."""
    from runtime.canny2image import Canny2Image
    from runtime.weights import build_model

    model = build_model(CONFIG_TINY, random_weights=True, device="cpu", seed=0)
    pipeline = Canny2Image(model, mode="reference")
    calls = []
    real = pipeline.process

    def process(*args, **kwargs):
        calls.append(time.perf_counter())
        return real(*args, **kwargs)
    pipeline.process = process
    return pipeline, calls


def _serve(monkeypatch, gate, build=None):
    """main()'s start-up on the tiny model, up to a served page: (demo, url, startup, calls).
    `build`: what the Startup calls to build the pipelines (default: the tiny one, at once)."""
    monkeypatch.setattr(app, "warm_up", gate)
    pipeline, calls = _tiny_pipeline()
    startup = app.Startup(build or (lambda: ([pipeline], None)), workers=1)
    demo = app.create_demo(startup=startup)
    startup.start()
    url = launch_demo(demo)
    return demo, url, startup, calls


def _request(url, png):
    args = dict(DEFAULTS, **FAST)
    return Client(url, verbose=False).submit(handle_file(png), *(args[k] for k in ORDER),
                                             api_name="/process")


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(sample_image(96, 128)).save(path)
    return str(path)


def test_page_served_during_warm_up_and_requests_wait_then_succeed(monkeypatch, png):
    gate = _Gate()
    demo, url, startup, calls = _serve(monkeypatch, gate)
    try:
        assert gate.started.wait(30)
        page = httpx.get(url, timeout=30)            # served while the warm-up runs
        assert page.status_code == 200
        assert startup.status() == app.WARMING_UP
        assert 'id="warm-up"' in page.text or "warm-up" in str(demo.config)
        job = _request(url, png)
        time.sleep(3)
        assert not job.done() and calls == []       # waiting: the pipeline was not touched
        gate.open.set()
        images = job.result(timeout=300)
        assert len(images) == 2 and calls          # edge map + 1 sample
        first = np.asarray(Image.open(images[1]["image"]))
        assert first.shape[2] == 3
        assert startup.ready.is_set() and startup.status() == "" and startup.seconds == 1.0
        assert len(gate.calls) == 1
    finally:
        gate.open.set()
        demo.close()


def test_page_served_while_the_model_is_built(monkeypatch, png):
    """The build itself runs behind the page: until it returns the page says the model is
    loading and a request waits; then the warm-up runs and the request succeeds."""
    building, release = threading.Event(), threading.Event()
    pipeline, calls = _tiny_pipeline()

    def build():
        building.set()
        assert release.wait(120)
        return [pipeline], None
    gate = _Gate()
    gate.open.set()
    demo, url, startup, _ = _serve(monkeypatch, gate, build)
    try:
        assert building.wait(30)
        assert httpx.get(url, timeout=30).status_code == 200
        assert startup.status() == app.LOADING and not gate.started.is_set()
        job = _request(url, png)
        time.sleep(3)
        assert not job.done() and calls == []
        release.set()
        assert len(job.result(timeout=300)) == 2 and len(calls) == 1
        assert gate.calls == [[pipeline]] and startup.status() == ""
    finally:
        release.set()
        demo.close()


def test_failed_build_is_shown_and_refuses_requests(monkeypatch, png):
    from cldm.model import CheckpointError

    def build():
        raise CheckpointError("Could not read checkpoint /x.pth: it is not a checkpoint")
    gate = _Gate()
    demo, url, startup, _ = _serve(monkeypatch, gate, build)
    try:
        assert startup.ready.wait(30) and startup.built.is_set()
        assert startup.error == "Could not read checkpoint /x.pth: it is not a checkpoint"
        assert startup.status().startswith("**The demo could not start:** Could not read")
        with pytest.raises(Exception, match="The demo could not start: Could not read checkpoint"):
            _request(url, png).result(timeout=60)
        assert not gate.started.is_set()
    finally:
        demo.close()


@pytest.mark.parametrize("error, line", [
    (SystemExit("error: --device cuda: no GPU is visible to torch"),
     "--device cuda: no GPU is visible to torch"),
    (MemoryError(), "out of host memory while loading the model"),
    (KeyError("model.x"), "the model build failed (KeyError: 'model.x') (set CANNY2IMAGE_DEBUG=1"),
])
def test_startup_error_lines(error, line, monkeypatch, caplog):
    monkeypatch.delenv("CANNY2IMAGE_DEBUG", raising=False)
    assert app.startup_error(error).startswith(line)
    assert not [r for r in caplog.records if r.exc_info]
    monkeypatch.setenv("CANNY2IMAGE_DEBUG", "1")
    app.startup_error(error)          # the traceback only with CANNY2IMAGE_DEBUG, for a bug
    assert bool([r for r in caplog.records if r.exc_info]) == isinstance(error, KeyError)


def test_failed_warm_up_lets_requests_run(monkeypatch, png, caplog):
    gate = _Gate(fail=True)
    gate.open.set()
    demo, url, startup, calls = _serve(monkeypatch, gate)
    try:
        assert startup.ready.wait(30)
        assert startup.status() == "" and startup.seconds is None and startup.error is None
        assert "warm-up failed" in caplog.text
        images = _request(url, png).result(timeout=300)
        assert len(images) == 2 and len(calls) == 1
    finally:
        demo.close()


def _main_without_serving(monkeypatch, argv):
    """main(argv) with the flags' plan and the build stubbed, the page built but not served: the
    Startup it made."""
    startups = []
    real = app.create_demo
    monkeypatch.setattr(app, "plan_pipelines",
                        lambda args: app.Plan(["cpu"], "reference", None, True, None))
    monkeypatch.setattr(app, "build_pipelines",
                        lambda args, early=None, plan=None: ([object()], None, None))
    monkeypatch.setattr(app, "launch", lambda demo, **kw: None)
    monkeypatch.setattr(app, "clean_on_exit", lambda folder: None)
    monkeypatch.setattr(app, "own_cache_folder", lambda: None)
    monkeypatch.setattr(app, "create_demo", lambda banner=None, startup=None: (
        startups.append(startup), real(banner=banner, startup=startup))[1])
    app.main(argv)
    return startups[0]


def test_no_warmup_flag_means_no_warm_up(monkeypatch):
    """--no-warmup: requests wait for the build only."""
    started = []
    monkeypatch.setattr(app, "warm_up", lambda pipelines: started.append(pipelines) or 1.0)
    startup = _main_without_serving(monkeypatch, ["--no-warmup"])
    assert startup.ready.wait(10) and started == [] and startup.seconds is None
    startup = _main_without_serving(monkeypatch, [])
    assert startup.ready.wait(10) and len(started) == 1 and startup.seconds == 1.0


def test_warm_up_waits_for_the_kernel_precompile_first(monkeypatch):
    order = []

    class Precompiling:
        def wait(self):
            order.append("precompile")
            return "kernels compiled"
    monkeypatch.setattr(app, "warm_up", lambda pipelines: order.append("warm-up") or 1.0)
    startup = app.Startup.given([object()], Precompiling(), warm=True).start()
    assert startup.ready.wait(10)
    assert order == ["precompile", "warm-up"] and startup.seconds == 1.0


def test_a_checkpoint_that_fails_to_load_ends_the_demo_in_one_line(tmp_path):
    """The build runs behind the served page; its error still ends the process: status 1, the
    error as the last line, no traceback."""
    import subprocess
    import sys

    from conftest import REPO, free_port
    bad = tmp_path / "hello.pth"
    bad.write_bytes(b"hello world")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "gradio_canny2image.py"), "--ckpt",
                           str(bad), "--device", "cpu", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"error: Could not read checkpoint {bad}"), lines


def test_a_stop_that_hangs_still_ends_the_process(tmp_path):
    """stop() of a process that ends after it (the script, the installed command), when closing
    the server never returns (a stand-in demo): after STOP_GRACE_S the process still ends, with
    the stop's exit status, and the demo's cache folder is removed."""
    import subprocess
    import sys

    from conftest import REPO
    folder = tmp_path / "canny2image-demo-x"
    folder.mkdir()
    script = "\n".join([
        "import sys, threading",
        f"sys.path.insert(0, {REPO!r})",
        "import gradio_canny2image as app",
        "app.STOP_GRACE_S = 0.5",
        f"app.clean_on_exit({str(folder)!r})",
        "class Demo:",
        "    def close(self, verbose=True):",
        "        threading.Event().wait()   # never closes",
        "class Startup:",
        "    def busy(self):",
        "        return False",
        "app.stop(Demo(), Startup(), 130, exiting=True)",
        "print('stop returned')",
    ])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert "stopping took over" in proc.stderr and "stop returned" not in proc.stdout
    assert not folder.exists()


@pytest.mark.parametrize("signum, code", [("SIGTERM", 0), ("SIGINT", 130)])
def test_a_signal_during_the_build_ends_the_demo_cleanly(tmp_path, signum, code):
    """Stopped while the (full-size, CPU) model is still being built behind the served page: the
    exit status of the signal, the upload cache removed, no abort from torch ("terminate
    called ...", status -6) and no traceback."""
    import signal
    import subprocess
    import sys

    from conftest import REPO, free_port
    port = free_port()
    cache = tmp_path / "cache"
    cache.mkdir()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "gradio_canny2image.py"), "--device", "cpu",
             "--random-weights", "--port", str(port)], stdout=log_file,
            stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "GRADIO_TEMP_DIR": str(cache)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/config", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert "mode: reference" not in log_path.read_text(), "built already: nothing tested"
        server.send_signal(getattr(signal, signum))
        assert server.wait(timeout=60) == code, log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
    text = log_path.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text
    assert not [f for f in os.listdir(cache) if f.startswith("canny2image-demo-")], \
        "the demo's cache folder is left"
    assert signum in text or signum == "SIGINT"
