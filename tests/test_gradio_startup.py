"""The demo serves its page at once and warms up behind it (gradio_canny2image.WarmUp): the page
says it is warming up, a request sent meanwhile waits for the warm-up and then succeeds, and a
failed warm-up lets requests run. CPU, tiny model; the warm-up itself is replaced by one that
waits for the test (on the CPU there is nothing to warm up)."""
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


def _serve(monkeypatch, gate):
    """main()'s start-up on the tiny model, up to a served page: (demo, url, warming, calls)."""
    from runtime.canny2image import Canny2Image
    from runtime.weights import build_model

    monkeypatch.setattr(app, "warm_up", gate)
    model = build_model(CONFIG_TINY, random_weights=True, device="cpu", seed=0)
    pipeline = Canny2Image(model, mode="reference")
    calls = []
    real = pipeline.process

    def process(*args, **kwargs):
        calls.append(time.perf_counter())
        return real(*args, **kwargs)
    pipeline.process = process
    warming = app.WarmUp([pipeline])
    demo = app.create_demo([pipeline], warming=warming)
    warming.start()
    url = launch_demo(demo)
    return demo, url, warming, calls


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
    demo, url, warming, calls = _serve(monkeypatch, gate)
    try:
        assert gate.started.wait(30)
        page = httpx.get(url, timeout=30)            # served while the warm-up runs
        assert page.status_code == 200
        assert warming.status() == app.WARMING_UP
        assert 'id="warm-up"' in page.text or "warm-up" in str(demo.config)
        job = _request(url, png)
        time.sleep(3)
        assert not job.done() and calls == []       # waiting: the pipeline was not touched
        gate.open.set()
        images = job.result(timeout=300)
        assert len(images) == 2 and calls          # edge map + 1 sample
        first = np.asarray(Image.open(images[1]["image"]))
        assert first.shape[2] == 3
        assert warming.done.is_set() and warming.status() == "" and warming.seconds == 1.0
        assert len(gate.calls) == 1
    finally:
        gate.open.set()
        demo.close()


def test_failed_warm_up_lets_requests_run(monkeypatch, png, caplog):
    gate = _Gate(fail=True)
    gate.open.set()
    demo, url, warming, calls = _serve(monkeypatch, gate)
    try:
        assert warming.done.wait(30)
        assert warming.status() == "" and warming.seconds is None
        assert "warm-up failed" in caplog.text
        images = _request(url, png).result(timeout=300)
        assert len(images) == 2 and len(calls) == 1
    finally:
        demo.close()


def test_no_warmup_flag_means_no_waiting(monkeypatch):
    """--no-warmup: no WarmUp, the pool never waits (create_demo without `warming`)."""
    started = []
    monkeypatch.setattr(app, "warm_up", lambda pipelines: started.append(pipelines))
    monkeypatch.setattr(app, "build_pipelines", lambda args, early=None: ([object()], None, None))
    launched = []
    monkeypatch.setattr(app, "launch", lambda demo, **kw: launched.append(demo))
    monkeypatch.setattr(app, "create_demo",
                        lambda pipelines, banner=None, warming=None: launched.append(warming))
    app.main(["--no-warmup"])
    assert launched[0] is None and started == []
    launched.clear()
    app.main([])
    assert isinstance(launched[0], app.WarmUp)
    assert launched[0].done.wait(10) and len(started) == 1
