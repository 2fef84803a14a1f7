"""Cancel that cancels: a request cancelled through gradio_client, or whose event stream the
client closes (raw HTTP), stops its generation at the next DDIM step, and the next request runs at
once (tiny model, CPU, the demo launched in-process)."""
import json
import os
import sys
import threading
import time

import httpx
import pytest
from gradio_client import Client, handle_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio_canny2image as app  # noqa: E402
from runtime.canny2image import Canny2Image  # noqa: E402
from runtime.errors import Cancelled  # noqa: E402
from runtime.inputs import CONFIG_TINY  # noqa: E402
from runtime.weights import build_model  # noqa: E402
from conftest import free_port, launch_demo  # noqa: E402
from test_gradio_app import DEFAULTS, FAST, ORDER  # noqa: E402

STEP_SECONDS = 0.3          # each DDIM step made this slow: 100 steps would take 30 s
LONG = {**DEFAULTS, **FAST, "ddim_steps": 100}
SHORT = {**DEFAULTS, **FAST, "ddim_steps": 1}


class SlowPipeline(Canny2Image):
    """The real pipeline, each step slowed down; records the steps and how each call ended."""

    def __init__(self, model):
        super().__init__(model)
        self.steps, self.ended = [], []
        self.changed = threading.Condition()

    def _record(self, what, value):
        with self.changed:
            what.append(value)
            self.changed.notify_all()

    def process(self, *args, progress=None, **kwargs):
        def slow(done, total):
            time.sleep(STEP_SECONDS)
            self._record(self.steps, done)
            if progress is not None:
                progress(done, total)
        try:
            result = super().process(*args, progress=slow, **kwargs)
        except Cancelled:
            self._record(self.ended, "cancelled")
            raise
        self._record(self.ended, "done")
        return result

    def wait(self, predicate, timeout):
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), (self.steps, self.ended)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from PIL import Image
    from runtime.sample import sample_image

    png = tmp_path_factory.mktemp("in") / "rgb.png"
    Image.fromarray(sample_image(320, 256)).save(png)
    model = build_model(CONFIG_TINY, random_weights=True, device="cpu", seed=0)
    pipeline = SlowPipeline(model)
    demo = app.create_demo(pipeline)
    url = launch_demo(demo)
    try:
        yield url, pipeline, str(png)
    finally:
        demo.close()


def _reset(pipeline):
    pipeline.steps.clear()
    pipeline.ended.clear()


def _stopped_early_then_next_runs(url, pipeline, png, max_steps):
    pipeline.wait(lambda: pipeline.ended, timeout=20)
    assert pipeline.ended == ["cancelled"] and len(pipeline.steps) < max_steps, pipeline.steps
    start = time.monotonic()
    result = Client(url, verbose=False).predict(handle_file(png), *(SHORT[k] for k in ORDER),
                                                api_name="/process")
    assert len(result) == 2 and time.monotonic() - start < 30


def test_cancel_through_gradio_client(served, capfd):
    url, pipeline, png = served
    _reset(pipeline)
    job = Client(url, verbose=False).submit(handle_file(png), *(LONG[k] for k in ORDER),
                                            api_name="/process")
    pipeline.wait(lambda: len(pipeline.steps) >= 2, timeout=60)
    job.cancel()
    _stopped_early_then_next_runs(url, pipeline, png, max_steps=10)
    assert "Traceback" not in capfd.readouterr().err


def test_closed_event_stream_stops_the_run(served, capfd):
    url, pipeline, png = served
    _reset(pipeline)
    with open(png, "rb") as f:
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("in.png", f)}).json()
    data = [{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}]
    data += [LONG[k] for k in ORDER]
    event_id = httpx.post(url + "gradio_api/call/process", content=json.dumps({"data": data}),
                          headers={"content-type": "application/json"}).json()["event_id"]
    with httpx.stream("GET", url + f"gradio_api/call/process/{event_id}", timeout=60) as stream:
        assert stream.status_code == 200              # open (its first line: a heartbeat, later)
        pipeline.wait(lambda: len(pipeline.steps) >= 2, timeout=60)
    # the stream is closed: the client has left
    _stopped_early_then_next_runs(url, pipeline, png, max_steps=10)
    assert "Traceback" not in capfd.readouterr().err


# --- the process: signals, ports -----------------------------------------------------------------

def _start(tmp_path, *argv, user=None):
    import subprocess
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "cache")}
    (tmp_path / "cache").mkdir(exist_ok=True)
    script = os.path.join(os.path.dirname(app.__file__), "gradio_canny2image.py")
    prefix = []
    if user is not None and os.geteuid() == 0:       # root could listen anywhere: drop it
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    log = open(tmp_path / "server.log", "w")
    return subprocess.Popen([*prefix, sys.executable, script, "--tiny", *argv], stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path, env=env)


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_signals_clean_the_upload_cache_and_exit(tmp_path, signum):
    import signal
    port = free_port()
    server = _start(tmp_path, "--port", str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                httpx.get(url + "config", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        uploaded = httpx.post(url + "gradio_api/upload",
                              files={"files": ("a.png", b"not checked here")}).json()[0]
        own = os.path.relpath(uploaded, tmp_path / "cache").split(os.sep)[0]
        assert own.startswith("canny2image-demo-") and os.path.exists(uploaded)
        server.send_signal(getattr(signal, signum))
        assert server.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
    assert not os.path.exists(tmp_path / "cache" / own), "the demo's cache folder is left"
    assert signum in (tmp_path / "server.log").read_text()


def test_port_80_as_a_normal_user_says_permission(tmp_path):
    if os.geteuid() == 0 and not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("running as root without setpriv: any port can be listened on")
    server = _start(tmp_path, "--port", "80", user=65534)
    assert server.wait(timeout=180) == 1
    out = (tmp_path / "server.log").read_text().strip().splitlines()
    assert out[-1].startswith("error: no permission to listen on port 80"), out
    assert "Traceback" not in "\n".join(out)


def test_port_in_use_says_so(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = _start(tmp_path, "--port", str(s.getsockname()[1]))
        assert server.wait(timeout=180) == 1
    out = (tmp_path / "server.log").read_text().strip().splitlines()
    assert "is in use by another program" in out[-1], out
