"""Hostile and malformed input to the demo, through gradio_client and raw HTTP against the app
launched in-process on 127.0.0.1 (tiny model, 1 DDIM step), and at start-up: every case gets a
clear message (never Gradio's bare error or {"error": null}), the server log gets no traceback,
nothing over the pixel limit is decoded, no server path or URL is read, and the server keeps
serving. tests/test_gradio_app.py has the working paths and the first bad-input cases."""
import asyncio
import base64
import http.server
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time

import cv2
import httpx
import numpy as np
import PIL.ImageFile
import PIL.ImageOps
import pytest
from PIL import Image
from conftest import gradio_result, launch_demo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import gradio_canny2image as app  # noqa: E402
from annotator.util import HWC3, resize_image  # noqa: E402
from runtime import inputs  # noqa: E402
from runtime.errors import NonFiniteOutputError  # noqa: E402

ORDER = app.ORDER
VALUES = dict(prompt="a box", a_prompt=inputs.A_PROMPT, n_prompt=inputs.N_PROMPT, num_samples=1,
              image_resolution=256, ddim_steps=1, guess_mode=False, strength=1.0, scale=9.0,
              seed=5, eta=0.0, low_threshold=100, high_threshold=200)
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(app.__file__)), "gradio_canny2image.py")



@pytest.fixture(scope="module")
def url():
    from runtime.app import build_pipeline

    demo = app.create_demo(build_pipeline("cpu", tiny=True, mode="reference"))
    url = launch_demo(demo)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


def _picture():
    rng = np.random.default_rng(0)
    rgb = np.full((96, 128, 3), 30, np.uint8)
    rgb[20:76, 24:104] = rng.integers(120, 256, (56, 80, 3), dtype=np.uint8)
    return rgb


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_inputs")
    rgb = _picture()
    out = {}

    def save(name, image, **kw):
        out[name] = str(d / name)
        image.save(out[name], **kw)

    save("rgb.png", Image.fromarray(rgb))
    save("over_limit.png", Image.new("1", (8000, 7000), 1))      # 56 MP, 100 KB
    save("huge_1bit.png", Image.new("1", (30000, 30000), 1))     # 900 MP, 109 KB
    save("float.tif", Image.fromarray(np.zeros((64, 64), np.float32)))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("onebit.png", Image.fromarray(rgb).convert("1"))
    save("gray_alpha.png", Image.fromarray(rgb).convert("LA"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    save("photo.bmp", Image.fromarray(rgb))
    save("photo.tif", Image.fromarray(rgb))
    blank = Image.fromarray(np.zeros_like(rgb))
    save("anim.gif", Image.fromarray(rgb), save_all=True, append_images=[blank])
    save("anim.webp", Image.fromarray(rgb), save_all=True, append_images=[blank], lossless=True)
    exif = Image.Exif()
    exif[274] = 6                                        # "rotate 90° clockwise to view"
    save("rotated.jpg", Image.fromarray(rgb), exif=exif)
    cv2.imwrite(str(d / "rgb16.png"), (rgb.astype(np.uint16) * 257)[:, :, ::-1])
    out["rgb16.png"] = str(d / "rgb16.png")
    data = open(out["rgb.png"], "rb").read()
    for name, content in [("truncated.png", data[: len(data) // 2]), ("empty.png", b""),
                          ("text.png", b"hello world"), ("random.jpg", os.urandom(4096)),
                          ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')]:
        (d / name).write_bytes(content)
        out[name] = str(d / name)
    return out


def gallery(result):
    return [np.asarray(Image.open(item["image"])) for item in result]


def predict(client, image, **overrides):
    values = {**VALUES, **overrides}
    return client.predict(handle_file(image) if image else None, *(values[k] for k in ORDER),
                          api_name="/process")


def raw_call(url, image, values):
    """POST /gradio_api/call/process with `image` as the first value (a payload, not a file) and
    `values` after it, through Python's json (NaN allowed): (event, data)."""
    return raw_data(url, [image, *values])


def raw_data(url, data):
    body = json.dumps({"data": data})
    response = httpx.post(url + "gradio_api/call/process", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    if response.status_code != 200:
        return response.status_code, response.text
    event_id = response.json()["event_id"]
    return gradio_result(url, event_id, timeout=120)


def upload(url, path, name="in.png"):
    with open(path, "rb") as f:
        response = httpx.post(url + "gradio_api/upload", files={"files": (name, f)}, timeout=60)
    assert response.status_code == 200, response.text
    return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}


def assert_clear_error(event_data, match, capfd=None):
    event, data = event_data
    assert event == "error", event_data
    assert data["error"], f"no message: {data}"
    assert match.lower() in data["error"].lower(), data["error"]
    assert "Traceback" not in data["error"]
    if capfd is not None:
        err = capfd.readouterr().err
        assert "Traceback" not in err and "ComponentProcessingError" not in err, err


# --- wrong types and odd numbers through raw HTTP -------------------------------------------

WRONG = [
    ("ddim_steps", "abc", "Steps must be a number, got 'abc'."),
    ("ddim_steps", None, "Steps must be a number, got None."),
    ("ddim_steps", [1], "Steps must be a number, got [1]."),
    ("ddim_steps", True, "Steps must be a number, got True."),
    ("ddim_steps", {"a": 1}, "Steps must be a number"),
    ("num_samples", "2", "Images must be a number, got '2'."),
    ("seed", None, "Seed must be a number, got None."),
    ("strength", "strong", "Control Strength must be a number"),
    ("eta", "abc", "eta (DDIM) must be a number"),
    ("eta", None, "eta (DDIM) must be a number, got None."),
    ("eta", math.nan, "eta (DDIM) must be a finite number, got nan."),
    ("eta", math.inf, "eta (DDIM) must be a finite number, got inf."),
    ("scale", -math.inf, "Guidance Scale must be a finite number"),
    ("high_threshold", math.nan, "Canny high threshold must be a finite number"),
    ("guess_mode", "yes", "Guess Mode must be true or false, got 'yes'."),
    ("guess_mode", 1, "Guess Mode must be true or false, got 1."),
    ("guess_mode", None, "Guess Mode must be true or false"),
    ("prompt", None, "Prompt must be text, got None."),
    ("prompt", 5, "Prompt must be text, got 5."),
    ("n_prompt", ["a"], "Negative Prompt must be text"),
    # numbers of the right type, out of range: the sliders' ranges, then runtime/inputs.py's
    ("ddim_steps", -1, "less than minimum value 1"),
    ("ddim_steps", 1e9, "greater than maximum value 100"),
    ("seed", 2 ** 40, "greater than maximum value"),
    ("strength", -0.5, "less than minimum value"),
    ("scale", 0, "less than minimum value"),
    ("eta", 7, "eta (DDIM) must be in 0.0..1.0, got 7"),
    ("eta", -1, "eta (DDIM) must be in 0.0..1.0, got -1"),
    ("ddim_steps", 2.5, "Steps must be an integer, got 2.5"),
    ("prompt", "x" * 20_000, "Prompt is too long: 20000 characters"),
]


@pytest.mark.parametrize("key, value, match", WRONG, ids=[f"{w[0]}={w[1]!r}"[:40] for w in WRONG])
def test_wrong_values_by_raw_http(url, files, key, value, match, capfd):
    image = upload(url, files["rgb.png"])
    values = [value if k == key else VALUES[k] for k in ORDER]
    assert_clear_error(raw_call(url, image, values), match, capfd)


@pytest.mark.parametrize("count", [0, 2, len(ORDER), len(ORDER) + 2])   # too few, too many
def test_wrong_number_of_values(url, files, count, capfd):
    data = ([upload(url, files["rgb.png"])] + [VALUES[k] for k in ORDER] * 2)[:count]
    assert_clear_error(raw_data(url, data), f"takes {len(ORDER) + 1} values", capfd)
    assert_clear_error(raw_data(url, data), f"got {count}.", capfd)


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests = []

    def do_GET(self):                                   # noqa: N802 (http.server's name)
        _Recorder.requests.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.end_headers()
        buf = io.BytesIO()
        Image.fromarray(_picture()).save(buf, format="PNG")
        self.wfile.write(buf.getvalue())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    """A local web server with a real PNG: a URL named as the image must never be fetched."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/picture.png"
    finally:
        server.shutdown()


def _payloads(files, image_url):
    png = base64.b64encode(open(files["rgb.png"], "rb").read()).decode()
    meta = {"_type": "gradio.FileData"}
    return {
        "server path": {"path": files["rgb.png"], "meta": meta},
        "server path, no marker": {"path": files["rgb.png"]},
        "system file": {"path": "/etc/hostname", "meta": meta},
        "relative path": {"path": "../../README.md", "meta": meta},
        "url as path": {"path": image_url, "meta": meta},
        "url field": {"path": "picture.png", "url": image_url, "meta": meta},
        "url, no marker": {"url": image_url, "path": image_url},
        "data url": {"path": None, "url": f"data:image/png;base64,{png}", "meta": meta},
        "plain string": files["rgb.png"],
        "number": 5,
        "list": [files["rgb.png"]],
        "no path": {"meta": meta},
        "null path": {"path": None, "meta": meta},
    }


PAYLOADS = list(_payloads({"rgb.png": __file__}, "http://x"))


@pytest.mark.parametrize("case", PAYLOADS)
def test_image_must_be_an_upload(url, files, image_server, case, capfd):
    _Recorder.requests.clear()
    payload = _payloads(files, image_server)[case]
    assert_clear_error(raw_call(url, payload, [VALUES[k] for k in ORDER]),
                       "must be a file uploaded to this demo", capfd)
    assert _Recorder.requests == []                   # the URL was not fetched


# --- files through gradio_client ---------------------------------------------------------------

def test_over_the_pixel_limit_is_refused_from_the_header(client, files, no_decoding):
    with pytest.raises(AppError, match=r"The image is too large: 8000x7000 = 56,000,000 pixels, "
                                       r"more than the 50,000,000 \(50 megapixels\) allowed"):
        predict(client, files["over_limit.png"])


BAD_FILES = [
    ("huge_1bit.png", "too large (over 179 megapixels)"),
    ("float.tif", "32-bit float images are not supported"),
    ("truncated.png", "The image data is truncated or corrupt"),
    ("empty.png", "Not an image that can be read"),
    ("text.png", "Not an image that can be read"),
    ("random.jpg", "Not an image that can be read"),
    ("drawing.svg", "Not an image that can be read"),
]


@pytest.mark.parametrize("name, match", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_unreadable_files(client, files, name, match, capfd):
    with pytest.raises(AppError) as info:
        predict(client, files[name])
    assert match.lower() in str(info.value).lower(), str(info.value)
    assert "Traceback" not in capfd.readouterr().err


ODD = ["palette.png", "onebit.png", "gray_alpha.png", "cmyk.jpg", "photo.bmp", "photo.tif",
       "anim.gif", "anim.webp", "rgb16.png", "rotated.jpg"]


@pytest.mark.parametrize("name", ODD)
def test_odd_formats_work(client, files, name):
    """Converted as Gradio 3 did for upstream: PIL's RGB of the (first frame of the) file, EXIF
    rotation applied; the edge map is upstream's for that picture."""
    out = gallery(predict(client, files[name]))
    assert len(out) == 2
    with Image.open(files[name]) as im:
        rgb = np.asarray(PIL.ImageOps.exif_transpose(im).convert("RGB"))
    if name == "rotated.jpg":
        assert rgb.shape[:2] == (128, 96)              # upright: the sides swapped
    expected = 255 - HWC3(cv2.Canny(resize_image(HWC3(rgb), 256), 100, 200))
    np.testing.assert_array_equal(out[0], expected)


def test_concurrent_good_and_bad_requests(client, files):
    """Requests at once, good and bad: each gets its own answer, the server keeps serving."""
    cases = [("rgb.png", {}, None), ("over_limit.png", {}, "too large"),
             ("rgb.png", {"seed": 9}, None), ("text.png", {}, "Not an image that can be read"),
             ("rgb.png", {"ddim_steps": 1000}, "maximum")]
    answers = [None] * len(cases)

    def request(i, name, overrides):
        try:
            answers[i] = len(predict(client, files[name], **overrides))
        except AppError as e:
            answers[i] = str(e)
        except Exception as e:        # reported below: a thread's exception would be lost
            answers[i] = e

    threads = [threading.Thread(target=request, args=(i, n, o))
               for i, (n, o, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for (name, _, match), answer in zip(cases, answers):
        if match is None:
            assert answer == 2, answer
        else:
            assert isinstance(answer, str) and match.lower() in answer.lower(), answer
    assert len(gallery(predict(client, files["rgb.png"]))) == 2


# --- uploads: size limit and clean-up ----------------------------------------------------------

def test_upload_size_limit(url):
    big = b"\0" * (inputs.MAX_UPLOAD_BYTES + 1)
    response = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big)},
                          timeout=120)
    assert response.status_code == 413, (response.status_code, response.text[:200])
    small = httpx.post(url + "gradio_api/upload", files={"files": ("s.png", b"\0" * 1000)})
    assert small.status_code == 200


class _Echo:
    def process(self, input_image, *args, progress=None, **kwargs):
        return [input_image]


def test_uploads_are_cleaned_up(files, monkeypatch):
    monkeypatch.setattr(app, "DELETE_CACHE", (1, 1))   # the schedule, fast: every second
    demo = app.create_demo(_Echo())
    assert demo.delete_cache == (1, 1)
    url = launch_demo(demo)
    try:
        kept = upload(url, files["rgb.png"])["path"]
        assert os.path.exists(kept)
        deadline = time.monotonic() + 30
        while os.path.exists(kept) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not os.path.exists(kept), "the upload is still in the cache"
        last = upload(url, files["rgb.png"])["path"]
    finally:
        demo.close()
    assert not os.path.exists(last)                    # and all of them when the server stops


def test_the_real_cache_schedule():
    frequency, age = app.DELETE_CACHE
    assert 0 < frequency <= age <= 24 * 3600


# --- the handler: non-finite output -------------------------------------------------------------

def test_non_finite_output_is_a_message(files):
    class NaNPipeline:
        def process(self, *args, **kwargs):
            raise NonFiniteOutputError("the model computed NaN or infinite values (reference "
                                       "mode) instead of an image")

    process, _ = app.make_process([NaNPipeline()])
    with pytest.raises(gr.Error, match="NaN or infinite values"):
        asyncio.run(process(Image.open(files["rgb.png"]), *(VALUES[k] for k in ORDER),
                            progress=lambda *a, **k: None))


# --- start-up ------------------------------------------------------------------------------

def _main(argv, capsys):
    """app.main(argv) in this process, up to before launch: (exit code, the one message)."""
    with pytest.raises(SystemExit) as info:
        app.main(argv)
    code = info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip()
    return (1 if isinstance(code, str) else code), message


@pytest.mark.parametrize("argv, match", [
    (["--device", "nonsense"], "--device nonsense"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--port", "70000"], "argument --port: invalid port '70000': use 1..65535"),
    (["--port", "abc"], "argument --port: invalid port 'abc'"),
    (["--port", "-1"], "argument --port"),
    (["--tiny", "--ckpt", "x.pth"], "argument --ckpt: not allowed with argument --tiny"),
    (["--random-weights", "--ckpt", "x.pth"], "not allowed with argument --random-weights"),
    (["--mode", "turbo"], "argument --mode: invalid choice"),
    (["--tiny", "--device", "cpu", "--mode", "fast"], "--mode fast needs a GPU"),
    (["--device", "cpu", "--ckpt", "{missing}"], "Checkpoint not found"),
    (["--device", "cpu", "--ckpt", "{junk}"], "it is not a checkpoint"),
])
def test_start_up_errors_are_one_line(argv, match, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_text("hello world")
    argv = [a.format(missing=tmp_path / "missing.pth", junk=junk) for a in argv]
    code, message = _main(argv, capsys)
    assert code not in (0, None)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert match in message, message


@pytest.mark.parametrize("which, match", [("missing", "Checkpoint not found"),
                                          ("folder", "a directory, not a file")])
def test_a_checkpoint_that_is_no_file_ends_before_the_page(which, match, tmp_path, capsys,
                                                           monkeypatch):
    """Checked with the flags (cldm.model.check_checkpoint_path), not behind the served page."""
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("the page was served"))
    path = tmp_path / "missing.pth" if which == "missing" else tmp_path
    code, message = _main(["--device", "cpu", "--ckpt", str(path)], capsys)
    assert code == 1 and message.startswith("error: ") and match in message, message


def test_real_process_port_taken_is_one_line(tmp_path):
    """`python gradio_canny2image.py --tiny --port P` with P taken: one line, exit status 1,
    before any model is built."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--port",
                                 str(port)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(port) in last, result.stderr
    assert "Traceback" not in result.stderr
    assert "building" not in result.stderr, result.stderr
