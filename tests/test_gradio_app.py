"""The Gradio demo, driven through gradio_client against the app launched in-process on 127.0.0.1
with the tiny model on CPU: a full run, every kind of bad input (each must come back as a clear
message, never a traceback, and the server must keep serving), and two requests at once.
"""
import json
import math
import os
import sys
import threading

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from conftest import free_port, gradio_result, launch_demo

# The demo is a script at the repo root, not part of the installed packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import gradio_canny2image as app  # noqa: E402
from annotator.util import HWC3, resize_image  # noqa: E402
import runtime.inputs  # noqa: E402
from runtime.inputs import CONFIG_FULL, CONFIG_TINY  # noqa: E402
from runtime.sample import sample_image  # noqa: E402

# Small and quick on the CPU: 256 px short side, 1 DDIM step.
FAST = dict(image_resolution=256, ddim_steps=1, num_samples=1)
ORDER = ("prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps",
         "guess_mode", "strength", "scale", "seed", "eta", "low_threshold", "high_threshold")
DEFAULTS = dict(prompt="a house", a_prompt=app.A_PROMPT, n_prompt=app.N_PROMPT, num_samples=1,
                image_resolution=512, ddim_steps=20, guess_mode=False, strength=1.0, scale=9.0,
                seed=12345, eta=0.0, low_threshold=100, high_threshold=200)



def launch_tiny(banner=None):
    """The demo with the tiny random-weights model, on a free 127.0.0.1 port: (demo, url)."""
    from runtime.canny2image import Canny2Image
    from runtime.weights import build_model

    model = build_model(CONFIG_TINY, random_weights=True, device="cpu", seed=0)
    demo = app.create_demo(Canny2Image(model, mode="reference"), banner=banner)
    return demo, launch_demo(demo)


@pytest.fixture(scope="module")
def client():
    demo, url = launch_tiny(banner="tiny model, random weights")
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Input files of every kind the tests upload: path by name, plus the RGB sample array."""
    d = tmp_path_factory.mktemp("inputs")
    rgb = sample_image(640, 480)
    files = {}

    def save(name, image, **kw):
        files[name] = str(d / name)
        image.save(files[name], **kw)

    save("rgb.png", Image.fromarray(rgb))
    save("gray.png", Image.fromarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    save("rgba.png", Image.fromarray(rgba))
    gray16 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
    cv2.imwrite(str(d / "gray16.png"), gray16)
    files["gray16.png"] = str(d / "gray16.png")
    save("tiny.png", Image.fromarray(np.full((1, 1, 3), 200, np.uint8)))
    save("thin.png", Image.fromarray(np.full((32, 2000, 3), 200, np.uint8)))
    # 10000x8000: 1 bit per pixel keeps the file and its encoding small; the size is what counts.
    save("huge.png", Image.new("1", (10000, 8000), 1))
    # Over twice PIL's MAX_IMAGE_PIXELS: PIL refuses it already when Gradio opens the file.
    save("bomb.png", Image.new("1", (14000, 13000), 1))
    (d / "not_an_image.png").write_bytes(b"this is not a png")
    files["not_an_image.png"] = str(d / "not_an_image.png")
    return files, rgb


def run(client, image, **overrides):
    """Call /process with upstream's argument order; DEFAULTS for what is not overridden."""
    values = {**DEFAULTS, **overrides}
    image = handle_file(image) if image is not None else None
    return client.predict(image, *(values[k] for k in ORDER), api_name="/process")


def gallery_arrays(result):
    return [np.asarray(Image.open(item["image"])) for item in result]


def assert_error(client, image, match, **overrides):
    with pytest.raises(AppError) as info:
        run(client, image, **overrides)
    message = str(info.value)
    assert "Traceback" not in message
    assert match.lower() in message.lower(), message


def test_full_run(client, images):
    files, rgb = images
    result = run(client, files["rgb.png"], **{**FAST, "num_samples": 3, "ddim_steps": 2})
    out = gallery_arrays(result)
    assert len(out) == 3 + 1
    # 640x480 at 256: short side 256, long side round(341.3 / 64) * 64 = 320.
    for a in out:
        assert a.shape == (256, 320, 3) and a.dtype == np.uint8
    # First item: the inverted edge map, exactly upstream's (png keeps it lossless).
    expected = 255 - HWC3(cv2.Canny(resize_image(HWC3(rgb), 256), 100, 200))
    np.testing.assert_array_equal(out[0], expected)
    assert len({a.tobytes() for a in out[1:]}) == 3, "the samples should differ"


def test_same_seed_same_images(client, images):
    files, _ = images
    a = gallery_arrays(run(client, files["rgb.png"], seed=7, **FAST))
    b = gallery_arrays(run(client, files["rgb.png"], seed=7, **FAST))
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "gray16.png"])
def test_other_image_formats_work(client, images, name):
    """Gray and RGBA become RGB (alpha dropped, as on upstream's Gradio 3); 16-bit is scaled to
    8 bits, so its edges are those of the 8-bit picture (PIL alone would clip it to white)."""
    files, rgb = images
    out = gallery_arrays(run(client, files[name], **FAST))
    assert len(out) == 2 and out[0].shape == (256, 320, 3)
    if name != "rgba.png":
        gray = HWC3(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        expected = 255 - HWC3(cv2.Canny(resize_image(gray, 256), 100, 200))
        np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize("prompt", ["", "a house, " * 200])
def test_empty_and_long_prompts_work(client, images, prompt):
    """Upstream runs both: an empty prompt still has the added prompt; CLIP keeps 77 tokens."""
    out = gallery_arrays(run(client, images[0]["rgb.png"], prompt=prompt, **FAST))
    assert len(out) == 2


BAD = [
    # (case id, image name or None, overrides, words the message must contain)
    ("no image", None, {}, "upload an image"),
    ("huge image", "huge.png", {}, "too large"),
    ("decompression bomb", "bomb.png", {}, "too large (over 179 megapixels)"),
    ("not an image", "not_an_image.png", {}, "image"),
    ("elongated image", "thin.png", {"image_resolution": 768}, "aspect ratio is too extreme"),
    ("huge prompt", "rgb.png", {"prompt": "x" * 100_000}, "Prompt is too long"),
    ("huge negative prompt", "rgb.png", {"n_prompt": "x" * 100_000}, "Negative Prompt is too long"),
    ("steps 0", "rgb.png", {"ddim_steps": 0}, "less than minimum value 1"),
    ("steps 1000", "rgb.png", {"ddim_steps": 1000}, "greater than maximum value 100"),
    ("resolution 10000", "rgb.png", {"image_resolution": 10000}, "greater than maximum value 768"),
    ("negative images", "rgb.png", {"num_samples": -3}, "less than minimum value 1"),
    ("fractional images", "rgb.png", {"num_samples": 1.5}, "Images must be an integer"),
    ("seed too large", "rgb.png", {"seed": 2**40}, "greater than maximum value"),
]


def test_low_above_high_and_a_1x1_image_work_as_upstream(client, images):
    """Upstream has no rule against either: cv2.Canny swaps the thresholds, resize_image scales a
    1x1 picture up to the resolution."""
    files, rgb = images
    out = gallery_arrays(run(client, files["rgb.png"], low_threshold=250, high_threshold=50,
                             **FAST))
    np.testing.assert_array_equal(out[0], 255 - HWC3(cv2.Canny(resize_image(HWC3(rgb), 256),
                                                               50, 250)))
    out = gallery_arrays(run(client, files["tiny.png"], **FAST))
    assert out[0].shape == (256, 256, 3)


@pytest.mark.parametrize("case,name,overrides,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gives_clear_error(client, images, case, name, overrides, match):
    files, _ = images
    image = files[name] if name else None
    assert_error(client, image, match, **{**FAST, **overrides})


def _raw_call(url, image_path, **overrides):
    """POST /process through Gradio's REST API with Python's JSON, which can send NaN (the client
    refuses to: "Out of range float values are not JSON compliant"). Returns (event, data)."""
    with open(image_path, "rb") as f:
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("in.png", f)}).json()
    values = {**DEFAULTS, **FAST, **overrides}
    data = [{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}]
    data += [values[k] for k in ORDER]
    event_id = httpx.post(url + "gradio_api/call/process", content=json.dumps({"data": data}),
                          headers={"content-type": "application/json"}).json()["event_id"]
    return gradio_result(url, event_id, timeout=60)


@pytest.mark.parametrize("key,label", [("eta", "eta (DDIM)"), ("scale", "Guidance Scale"),
                                       ("ddim_steps", "Steps")])
def test_nan_gives_clear_error(client, images, key, label):
    event, data = _raw_call(client.src, images[0]["rgb.png"], **{key: math.nan})
    assert event == "error"
    assert data["error"] == f"{label} must be a finite number, got nan."


def test_still_serving_after_errors(client, images):
    files, _ = images
    for name, overrides, match in [(None, {}, "upload"), ("huge.png", {}, "too large"),
                                   ("rgb.png", {"ddim_steps": 1000}, "maximum")]:
        assert_error(client, files[name] if name else None, match, **{**FAST, **overrides})
    assert len(gallery_arrays(run(client, files["rgb.png"], **{**FAST, "num_samples": 2}))) == 3


def test_two_requests_at_once(client, images):
    files, _ = images
    results, errors = {}, []

    def request(i):
        try:
            results[i] = gallery_arrays(run(client, files["rgb.png"], seed=i, **FAST))
        except Exception as e:        # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [1, 2]
    assert all(len(r) == 2 for r in results.values())


# --- the handler itself, without a server ------------------------------------------------------

class _Pipeline:
    """Stands in for Canny2Image to test how the handler maps failures and reports progress."""

    def __init__(self, fail=None):
        self.fail, self.calls = fail, 0

    def process(self, input_image, *args, progress=None, **kwargs):
        self.calls += 1
        steps = kwargs["ddim_steps"]
        for i in range(steps):
            progress(i + 1, steps)
        if self.fail is not None:
            raise self.fail
        return [input_image]


def _call(process, progress=None, request=None, **overrides):
    """Call the handler (a coroutine function) as Gradio would, outside of a server."""
    import asyncio
    values = {**DEFAULTS, **FAST, **overrides}
    image = Image.fromarray(sample_image(128, 96))
    return asyncio.run(process(image, *(values[k] for k in ORDER),
                               progress=progress or (lambda *a, **k: None), request=request))


def test_progress_goes_over_the_ddim_steps():
    seen = []
    process, workers = app.make_process([_Pipeline()])
    assert workers == 1
    _call(process, progress=lambda value, **kw: seen.append(value), ddim_steps=4)
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_failures_become_short_messages(caplog):
    from runtime.errors import InputError

    cases = [(InputError("bad prompt"), "bad prompt"),
             (ValueError("bad value"), "bad value"),
             (RuntimeError("kernel exploded"), "internal error")]
    for exc, match in cases:
        process, _ = app.make_process([_Pipeline(fail=exc)])
        with pytest.raises(gr.Error, match=f"(?i){match}"):   # messages start with a capital
            _call(process)
    assert "kernel exploded" in caplog.text      # the traceback goes to the server log


def test_out_of_memory_frees_and_recovers(monkeypatch):
    import torch

    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    pipeline = _Pipeline(fail=torch.cuda.OutOfMemoryError("CUDA out of memory"))
    process, _ = app.make_process([pipeline])
    with pytest.raises(gr.Error, match="Out of GPU memory: try fewer images or a lower resolution"):
        _call(process)
    assert freed
    pipeline.fail = None
    assert len(_call(process)) == 1          # the pipeline went back to the pool: next one works


# --- startup: flags, checkpoint discovery, the banner ------------------------------------------

@pytest.fixture
def built(monkeypatch):
    """build_pipelines (through runtime/app.py) with runtime.weights.build_model replaced by a
    recorder (no model built)."""
    import runtime.canny2image
    import runtime.weights

    calls = []

    class _Model:
        device = "cpu"

    def build_model(config_path, ckpt=None, random_weights=False, device="cpu", seed=0,
                    **placement):
        calls.append(dict(config=config_path, ckpt=ckpt, random_weights=random_weights,
                          device=device))
        return _Model()

    monkeypatch.setattr(runtime.weights, "build_model", build_model)
    monkeypatch.setattr(runtime.canny2image, "Canny2Image",
                        lambda model, mode, options=None: _Named(model, mode))

    def build(*argv):
        pipelines, banner, _ = app.build_pipelines(app.parse_args(["--device", "cpu", *argv]))
        return calls[-1], pipelines, banner
    return build


class _Named:
    def __init__(self, model, mode):
        self.model, self.mode = model, mode


def test_without_checkpoint_starts_with_random_weights_and_a_banner(built, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime.inputs, "REPO", str(tmp_path))   # no models/ beside the package
    call, pipelines, banner = built()
    assert call == dict(config=CONFIG_FULL, ckpt=None, random_weights=True, device="cpu")
    assert pipelines[0].mode == "reference"
    assert "noise" in banner and "./models/control_sd15_canny.pth" in banner
    assert "https://huggingface.co/lllyasviel/ControlNet/tree/main/models" in banner


@pytest.mark.parametrize("name", ["control_sd15_canny.pth", "control_sd15_canny.safetensors"])
def test_checkpoint_in_models_is_found(built, tmp_path, monkeypatch, name):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    call, _, banner = built()
    assert call["ckpt"] == str(tmp_path / "models" / name) and not call["random_weights"]
    assert banner is None


def test_flags(built, tmp_path):
    call, _, banner = built("--tiny")
    assert call["config"] == CONFIG_TINY and call["random_weights"] and "--tiny" in banner
    call, _, banner = built("--random-weights")
    assert call["config"] == CONFIG_FULL and call["random_weights"] and "noise" in banner
    (tmp_path / "my.safetensors").write_bytes(b"")      # a file: the demo checks that at once
    call, _, banner = built("--ckpt", str(tmp_path / "my.safetensors"))
    assert call["ckpt"] == str(tmp_path / "my.safetensors") and banner is None
    with pytest.raises(SystemExit, match="needs a GPU"):
        built("--mode", "fast")
    args = app.parse_args([])
    assert (args.port, args.listen, args.share, args.device) == (7860, False, False, "auto")


def test_low_vram_flag_sets_save_memory_before_the_build(built, monkeypatch):
    import config
    import runtime.weights
    from cldm.hack import disable_sliced_attention, sliced_attention_enabled

    recorder = runtime.weights.build_model
    seen = []

    def build_model(*args, **kwargs):
        seen.append((config.save_memory, sliced_attention_enabled()))
        return recorder(*args, **kwargs)

    monkeypatch.setattr(runtime.weights, "build_model", build_model)
    try:
        built("--tiny")
        built("--tiny", "--low-vram")
    finally:
        config.save_memory = False
        disable_sliced_attention()
    assert seen == [(False, False), (True, True)]


def test_command_line_smoke_run(tmp_path):
    """`python gradio_canny2image.py --tiny --port P` serves the page on 127.0.0.1 only."""
    import subprocess
    import time

    port = free_port()
    script = os.path.join(os.path.dirname(app.__file__), "gradio_canny2image.py")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([sys.executable, script, "--tiny", "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        page = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200, log_path.read_text()
        assert "Tiny model with random weights" in page.text
        assert "Control Stable Diffusion with Canny Edge Maps" in page.text
        assert f"http://127.0.0.1:{port}" in log_path.read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_one_worker_per_pipeline(images):
    """Two pipelines (two GPUs) → two requests run at the same time, each on its own pipeline."""
    barrier = threading.Barrier(2, timeout=60)   # passes only if both requests run at once
    users = []

    class _Meeting:
        def process(self, input_image, *args, progress=None, **kwargs):
            users.append(self)
            barrier.wait()
            return [input_image]

    demo = app.create_demo([_Meeting(), _Meeting()])
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(),
                            prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        jobs = [client.submit(handle_file(images[0]["rgb.png"]),
                              *({**DEFAULTS, **FAST}[k] for k in ORDER), api_name="/process")
                for _ in range(2)]
        assert [len(job.result(timeout=120)) for job in jobs] == [1, 1]
        assert len(users) == 2 and users[0] is not users[1]
    finally:
        demo.close()


# --- results, the line under the gallery, warm-up -----------------------------------------------

def test_results_are_fast_pngs_in_gradios_cache_with_exact_pixels(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8) for _ in range(3)]
    paths = app.save_results(images)
    assert len(paths) == 3 and len({os.path.dirname(p) for p in paths}) == 1
    for path, image in zip(paths, images):
        assert path.startswith(str(tmp_path)) and path.endswith(".png")
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
        data = open(path, "rb").read()
        idat = data.index(b"IDAT") + 4
        assert data[idat] == 0x78 and data[idat + 1] >> 6 == 0     # zlib header: fastest level
    assert app.save_results(images[:1])[0] != paths[0]             # a new folder per request


def test_the_line_under_the_gallery_says_time_device_and_mode():
    process, _ = app.make_process([_Pipeline()])

    class Request:
        session_hash = "abc"

    _call(process, request=Request())
    line = process.infos.pop(Request())
    assert line.startswith("0 images at ") and " s · CPU · ? mode" in line, line
    assert process.infos.pop(Request()) == ""                      # shown once


def test_warm_up_runs_the_default_shape_on_gpu_pipelines_only():
    import torch

    class Model:
        def __init__(self, device):
            self.device = torch.device(device)

    class Pipeline:
        def __init__(self, device):
            self.model, self.calls = Model(device), []

        def process(self, image, progress=None, **kwargs):
            self.calls.append((image.shape, kwargs))
            progress(1, kwargs["ddim_steps"])
            return [image]

    gpu, cpu = Pipeline("meta"), Pipeline("cpu")        # meta: stands in for an accelerator
    assert app.warm_up([gpu, cpu]) > 0
    assert cpu.calls == []
    (shape, kwargs), = gpu.calls
    assert shape == (512, 512, 3)
    assert (kwargs["num_samples"], kwargs["image_resolution"], kwargs["ddim_steps"]) == (1, 512, 20)
    assert app.warm_up([cpu]) == 0.0
    assert app.parse_args(["--no-warmup"]).no_warmup and not app.parse_args([]).no_warmup


def test_low_vram_fast_mode_does_not_fall_back(monkeypatch):
    """--low-vram on a GPU (device list stubbed; the tiny model built on the CPU): a real
    fast-mode pipeline, not reference mode."""
    import config
    import runtime.weights
    from cldm.hack import disable_sliced_attention
    from tests.conftest import TINY_CONFIG

    real = runtime.weights.build_model
    monkeypatch.setattr(app, "_devices", lambda spec: ["cuda:0"])
    monkeypatch.setattr(runtime.weights, "build_model", lambda *a, **k: real(
        TINY_CONFIG, random_weights=True, seed=0, device="cpu"))
    try:
        pipelines, _, _ = app.build_pipelines(app.parse_args(["--tiny", "--low-vram"]))
        assert config.save_memory
        (pipe,) = pipelines
        assert pipe.mode == "fast" and pipe.fast is not None
        pipe.close()
    finally:
        config.save_memory = False
        disable_sliced_attention()
