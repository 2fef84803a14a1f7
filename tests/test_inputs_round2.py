"""Hostile inputs, round 2 (issues 21 and 22), the input and model parts, through the entry points
a user has (the CLI as a subprocess, the demo over HTTP, the Python API), tiny model on CPU:

* one image reader: EXIF orientation, 16-bit RGBA and a PNG with a bad IDAT CRC give the same
  edge map in the CLI, the folder job, the demo and the API; data PIL cannot decode is refused by
  all with one line;
* memory answered up front: runtime/memory.py's formula, refusals before any work, sliced
  attention bounding its logits under --low-vram;
* configs are data (no `target: os.system`), YAML alias bombs, a sparse 50 GB .safetensors;
* checkpoint paths named for what they are: no GPU, permission denied, FIFO, directory, device,
  symbolic link loop; the 50-megapixel message.

New names are imported inside the tests, so that on an older tree each test fails on its own."""
import io
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runtime import inputs  # noqa: E402
from runtime.errors import InputError  # noqa: E402

TINY = os.path.join(REPO, "models", "cldm_tiny.yaml")
FULL = os.path.join(REPO, "models", "cldm_v15.yaml")
PARAMS = dict(prompt="a box", a_prompt=inputs.A_PROMPT, n_prompt=inputs.N_PROMPT, num_samples=1,
              image_resolution=256, ddim_steps=1, guess_mode=False, strength=1.0, scale=9.0,
              seed=5, eta=0.0, low_threshold=100, high_threshold=200)
CLI_FLAGS = ["--tiny", "--num-samples", "1", "--image-resolution", "256", "--ddim-steps", "1",
             "--seed", "5", "--prompt", "a box", "--quiet"]


def cli(*argv, env=None, timeout=240, user=None):
    """`python -m runtime.cli ...` from the repository: (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "runtime.cli", *argv]
    if user is not None:
        command = ["setpriv", "--reuid", str(user), "--regid", str(user), "--clear-groups",
                   *command]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(err):
    """The CLI's last stderr line, after checking it is the only error line and no traceback."""
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    assert all(line.startswith("canny2image: ") for line in lines), err
    assert lines[-1].startswith("canny2image: error: "), err
    return lines[-1]


# --- test pictures -----------------------------------------------------------------------------

def _picture():
    """96 x 128 px, not symmetric: a rotation changes its edge map."""
    rng = np.random.default_rng(3)
    rgb = np.full((96, 128, 3), 30, np.uint8)
    rgb[10:50, 8:100] = rng.integers(120, 256, (40, 92, 3), dtype=np.uint8)
    rgb[60:90, 90:120] = (200, 40, 90)
    return rgb


def _png_chunks(data):
    """[(offset of the length field, type, body)] of a PNG's chunks."""
    chunks, at = [], 8
    while at < len(data):
        n = struct.unpack(">I", data[at:at + 4])[0]
        chunks.append((at, data[at + 4:at + 8], data[at + 8:at + 8 + n]))
        at += 12 + n
    return chunks


def _replace_idat(data, body=None, bad_crc=False):
    """The PNG `data` with its (first) IDAT chunk's body replaced and/or its CRC made wrong."""
    for at, kind, old in _png_chunks(data):
        if kind == b"IDAT":
            body = old if body is None else body
            crc = zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF
            if bad_crc:
                crc ^= 0xFFFFFFFF
            return (data[:at] + struct.pack(">I", len(body)) + b"IDAT" + body
                    + struct.pack(">I", crc) + data[at + 12 + len(old):])
    raise AssertionError("no IDAT chunk")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    rgb = _picture()
    files = {}
    for orientation in (6, 8):
        exif = Image.Exif()
        exif[274] = orientation
        for ext, kw in (("jpg", dict(quality=95)), ("png", {})):
            name = f"exif{orientation}.{ext}"
            Image.fromarray(rgb).save(d / name, exif=exif, **kw)
            files[name] = d / name
    rgba16 = np.concatenate([rgb, np.full((96, 128, 1), 255, np.uint8)], axis=2).astype(np.uint16)
    rgba16 = rgba16 * 257 + np.random.default_rng(1).integers(0, 200, rgba16.shape).astype(
        np.uint16)
    rgba16[:, :64, 3] = 9000                                    # half of it mostly transparent
    cv2.imwrite(str(d / "rgba16.png"), cv2.cvtColor(rgba16, cv2.COLOR_RGBA2BGRA))
    files["rgba16.png"] = d / "rgba16.png"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png = buf.getvalue()
    (d / "badcrc.png").write_bytes(_replace_idat(png, bad_crc=True))
    files["badcrc.png"] = d / "badcrc.png"
    idat = next(body for _, kind, body in _png_chunks(png) if kind == b"IDAT")
    garbled = idat[:2] + bytes(b ^ 0x5A for b in idat[2:-4]) + idat[-4:]
    (d / "corrupt.png").write_bytes(_replace_idat(png, body=garbled))
    files["corrupt.png"] = d / "corrupt.png"
    return {k: str(v) for k, v in files.items()}


ACCEPTED = ("exif6.jpg", "exif6.png", "exif8.jpg", "exif8.png", "rgba16.png", "badcrc.png")


# --- the demo, launched in this process -------------------------------------------------------

# The tiny demo and its client: the fixtures `url` and `client` of test_gradio_bad_input.
from test_gradio_bad_input import client, url  # noqa: E402,F401


def demo_predict(client, path, **overrides):
    from gradio_client import handle_file
    import gradio_canny2image as app
    values = {**PARAMS, **overrides}
    return client.predict(handle_file(path), *(values[k] for k in app.ORDER), api_name="/process")


def demo_edges(client, path):
    result = demo_predict(client, path)
    return np.asarray(Image.open(result[0]["image"]).convert("RGB"))


# --- one image reader --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_edges(pictures, tmp_path_factory):
    """The edge map the CLI writes for each accepted picture: a folder job over all of them, and
    one single-file run (both are the CLI's paths to the reader)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("out")
    for name in ACCEPTED:
        shutil.copy(pictures[name], src / name)
    code, stdout, err = cli(str(src), *CLI_FLAGS, "--outdir", str(out / "folder"))
    edges = {"folder job": (code, err)}
    for name in ACCEPTED:
        for stem in (name, name[:-4]):    # two files share a stem: each keeps its extension
            if os.path.exists(out / "folder" / f"{stem}_edges.png"):
                edges[name] = np.asarray(Image.open(out / "folder" / f"{stem}_edges.png"))
    code, stdout, err = cli(pictures["exif6.jpg"], *CLI_FLAGS, "--outdir", str(out / "single"))
    assert code == 0, err
    edges["single exif6.jpg"] = np.asarray(Image.open(out / "single" / "exif6_edges.png"))
    return edges


def test_reader_rule_is_gradios_numpy_image(pictures):
    """read_image gives what Gradio's gr.Image(type="numpy") gives (upstream's demo): upright by
    EXIF, 8-bit RGB with alpha dropped; a bad IDAT CRC decodes as in PIL."""
    from gradio.data_classes import ImageData
    from gradio.image_utils import preprocess_image
    for name in ACCEPTED:
        ours = inputs.read_image(pictures[name])
        theirs = preprocess_image(ImageData(path=pictures[name], orig_name=name),
                                  cache_dir=os.path.dirname(pictures[name]), format="webp",
                                  image_mode="RGB", type="numpy")
        assert ours.dtype == np.uint8 and ours.shape[2] == 3, name
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    assert inputs.read_image(pictures["exif6.png"]).shape == (128, 96, 3)    # upright


def test_exif_16bit_alpha_and_bad_crc_same_edges_in_cli_demo_and_api(pictures, cli_edges,
                                                                     client):
    from runtime.canny2image import Canny2Image
    from runtime.weights import build_model
    pipeline = Canny2Image(build_model(TINY, random_weights=True, device="cpu", seed=0))
    # orientation 6 and 8 turn the 128 x 96 picture upright: 256 wide, 320 high at 256 px
    for name in ("exif6.jpg", "exif6.png", "exif8.jpg", "exif8.png"):
        assert cli_edges[name].shape[:2] == (320, 256), name
    np.testing.assert_array_equal(cli_edges["single exif6.jpg"], cli_edges["exif6.jpg"])
    for name in ACCEPTED:
        demo = demo_edges(client, pictures[name])
        assert name in cli_edges, f"the CLI refused {name}: {cli_edges['folder job']}"
        np.testing.assert_array_equal(cli_edges[name], demo, err_msg=name)
        api = pipeline.process(inputs.read_image(pictures[name]), **PARAMS)[0]
        np.testing.assert_array_equal(api, demo, err_msg=name)
    assert cli_edges["folder job"][0] == 0, cli_edges["folder job"]
    assert not np.array_equal(cli_edges["exif6.png"], cli_edges["exif8.png"])


def test_undecodable_png_refused_by_cli_demo_and_api_in_one_line(pictures, client, tmp_path):
    from gradio_client.exceptions import AppError
    code, _, err = cli(pictures["corrupt.png"], *CLI_FLAGS, "--outdir", str(tmp_path))
    line = one_error_line(err)
    assert code == 1 and "truncated or corrupt" in line, line
    with pytest.raises(AppError, match="truncated or corrupt") as e:
        demo_predict(client, pictures["corrupt.png"])
    assert "\n" not in str(e.value).strip()
    with pytest.raises(InputError, match="truncated or corrupt"):
        inputs.read_image(pictures["corrupt.png"])
    assert os.listdir(tmp_path) == []


def test_fifo_as_image_is_named_not_opened(tmp_path):
    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    code, _, err = cli(str(fifo), *CLI_FLAGS, "--outdir", str(tmp_path / "o"), timeout=120)
    assert code == 1 and "a FIFO (named pipe), not an image file" in one_error_line(err)


def test_pixel_limit_message_reads_sensibly():
    inputs.check_pixels(10_000, 5_000)
    with pytest.raises(InputError) as e:
        inputs.check_pixels(10_001, 5_000)
    assert ("10001x5000 = 50,005,000 pixels, more than the 50,000,000 (50 megapixels) allowed"
            in str(e.value)), e.value


# --- memory answered up front ------------------------------------------------------------------

SD15 = dict(level=0, heads=8, model_channels=320, vae_channels=128, vae_attention=True,
            diffusion_bytes=4_883_200_336)


def test_geometry_of_the_full_size_config():
    from cldm.model import create_model
    from runtime import memory
    with torch.device("meta"):
        model = create_model(FULL)
    assert memory.geometry(model).__dict__ == SD15


def test_cached_geometry_follows_dtype_and_place():
    """Each request reads the cached geometry; a conversion (fast mode) or a move (low-VRAM
    shifts) of the diffusion networks computes it again."""
    from runtime import memory
    from runtime.weights import build_model
    from tests.conftest import TINY_CONFIG
    model = build_model(TINY_CONFIG, random_weights=True, seed=0)
    fp32 = memory.cached_geometry(model)
    assert fp32 == memory.geometry(model) and memory.cached_geometry(model) is fp32
    for net in (model.model.diffusion_model, model.control_model):
        net.half()
    fp16 = memory.cached_geometry(model)
    assert fp16 == memory.geometry(model) and fp16.diffusion_bytes * 2 == fp32.diffusion_bytes
    model.control_model.to("meta")
    assert memory._signature(model)[1][1].type == "meta"
    assert memory.cached_geometry(model) is not fp16


def test_estimate_formula():
    from cldm.hack import SLICE_BYTES
    from runtime import memory
    geo = memory.Geometry(**SD15)

    def formula(h, w, b, mode="reference", sliced=False, device="cpu", on_host=False):
        n = (h // 8) * (w // 8)
        s, rows = (2, 2 * b) if mode == "fast" else (4, b)
        if mode == "fast":
            ua = va = 0
        elif sliced:
            ua = 2 * min(SLICE_BYTES, rows * 8 * n * n * 4)
            va = 2 * min(SLICE_BYTES, b * n * n * 4)
        else:
            ua, va = 2 * rows * 8 * n * n * 4, 2 * b * n * n * 4
        step = memory.A_UNET * rows * n * 320 * s + ua + (SD15["diffusion_bytes"] if on_host
                                                          else 0)
        decode = memory.A_VAE * b * h * w * 128 * s + va
        return int(memory.SAFETY * max(step, decode) + memory.MARGIN)

    for args in [(512, 512, 1), (768, 768, 2), (768, 768, 12), (2048, 2048, 1), (256, 384, 3)]:
        for kw in [{}, dict(sliced=True), dict(mode="fast", device="cuda"),
                   dict(sliced=True, device="cuda", on_host=True)]:
            got = memory.estimate(geo, *args, mode=kw.get("mode", "reference"),
                                  sliced=kw.get("sliced", False),
                                  device_type=kw.get("device", "cpu"),
                                  diffusion_on_host=kw.get("on_host", False))
            assert got == formula(*args, **kw), (args, kw)
    # the cases: the attention logits dominate reference mode
    assert memory.estimate(geo, 2048, 2048, 1) > 100e9                 # issue: 107 GB asked
    assert memory.estimate(geo, 768, 768, 12) > 25e9                   # issue: 25 GB asked
    assert memory.estimate(geo, 768, 768, 2) > 9e9                     # issue: 9 GB, then failed
    # sliced attention: the logits no longer grow with the square of the pixels
    big = memory.estimate(geo, 2048, 2048, 1)
    assert memory.estimate(geo, 2048, 2048, 1, sliced=True) < big / 4
    assert memory.estimate(geo, 768, 768, 2, sliced=True) < memory.estimate(geo, 768, 768, 2)
    assert memory.parse_size("12G") == 12e9 and memory.parse_size("512MB") == 512e6
    assert memory.parse_size("1000") == 1000


def test_estimate_bounds_the_measured_peaks():
    """benchmarks/results/memory_cpu.json: peaks measured on a CPU with the full-size model; the
    estimate of each phase must not be below any of them (nor more than 3x above: a useful
    bound)."""
    from runtime import memory
    with open(os.path.join(REPO, "benchmarks", "results", "memory_cpu.json")) as f:
        measured = json.load(f)
    geo = memory.Geometry(**measured["geometry"])
    assert geo == memory.Geometry(**SD15)
    for row in measured["rows"]:
        phase = {"apply_model": "diffusion step", "decode_first_stage": "VAE decode"}[row["phase"]]
        need = memory.phases(geo, row["height"], row["width"], row["batch"])[phase]
        estimate = memory.SAFETY * need + memory.MARGIN
        assert row["added_bytes"] <= estimate <= 3 * row["added_bytes"], (estimate, row)


@pytest.fixture
def full_size_geometry(monkeypatch):
    """The tiny model's pipeline estimates as if it were the full-size model."""
    from runtime import memory
    monkeypatch.setattr(memory, "geometry", lambda model: memory.Geometry(**SD15))


def test_2048_refused_up_front_through_the_api(full_size_geometry, monkeypatch):
    from runtime.canny2image import Canny2Image
    from runtime.memory import MemoryNeedError
    from runtime.weights import build_model
    monkeypatch.setenv("CANNY2IMAGE_MEMORY", "64G")
    pipeline = Canny2Image(build_model(TINY, random_weights=True, device="cpu", seed=0))
    image = np.zeros((512, 512, 3), np.uint8)
    start = time.perf_counter()
    with pytest.raises(MemoryNeedError) as e:
        pipeline.process(image, **{**PARAMS, "image_resolution": 2048})
    assert time.perf_counter() - start < 1.0
    message = str(e.value)
    assert "\n" not in message
    assert "1 sample at 2048x2048 in reference mode needs about" in message, message
    assert "64.0 GB is available" in message and "--low-vram" in message, message
    assert "a lower resolution" in message and "fast mode on a GPU" in message, message
    monkeypatch.setenv("CANNY2IMAGE_MEMORY", "off")                 # the override
    assert pipeline.process(image, **{**PARAMS, "image_resolution": 64})


def test_low_vram_768_x_12_refused_up_front_with_what_fits(full_size_geometry, monkeypatch,
                                                            sliced):
    """The issue's `--low-vram` at 768 x 12 ran 452 s, then failed: now it is refused at once
    (the VAE decodes the 12 samples at once) and the line says how many samples fit."""
    from runtime.canny2image import Canny2Image
    from runtime.memory import MemoryNeedError
    from runtime.weights import build_model
    monkeypatch.setenv("CANNY2IMAGE_MEMORY", "24G")
    pipeline = Canny2Image(build_model(TINY, random_weights=True, device="cpu", seed=0))
    start = time.perf_counter()
    with pytest.raises(MemoryNeedError) as e:
        pipeline.process(np.zeros((768, 768, 3), np.uint8),
                         **{**PARAMS, "image_resolution": 768, "num_samples": 12})
    assert time.perf_counter() - start < 1.0
    assert "12 samples at 768x768 in reference mode with --low-vram need about" in str(e.value)
    assert "24.0 GB is available: try at most 5 samples at this resolution" in str(e.value)


def test_demo_slider_maxima_refused_at_once(full_size_geometry, monkeypatch, client, pictures):
    from gradio_client.exceptions import AppError
    monkeypatch.setenv("CANNY2IMAGE_MEMORY", "16G")
    start = time.perf_counter()
    with pytest.raises(AppError) as e:
        demo_predict(client, pictures["exif6.png"], image_resolution=768, num_samples=12)
    assert time.perf_counter() - start < 3.0
    message = str(e.value).strip()
    assert "\n" not in message
    assert "12 samples at 768x1024 in reference mode need about" in message, message
    assert "16.0 GB is available" in message, message


def test_cli_2048_refused_with_the_real_available_memory(tmp_path):
    """No override: the tiny model's own attention at 2048 px (4 heads x 65536² logits) needs
    over 100 GB; the refusal comes before any work and names the way out."""
    code, _, err = cli(*CLI_FLAGS, "--image-resolution", "2048", "--outdir", str(tmp_path))
    line = one_error_line(err)
    assert code == 1 and "needs about" in line and "GB of CPU memory" in line, line
    assert "--low-vram" in line and "CANNY2IMAGE_MEMORY=off" in line, line
    assert os.listdir(tmp_path) == []


@pytest.fixture
def sliced():
    from cldm.hack import disable_sliced_attention, enable_sliced_attention
    enable_sliced_attention()
    try:
        yield
    finally:
        disable_sliced_attention()


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op creates."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_sliced_attention_bounds_its_logits(sliced):
    """At 8192 tokens a (batch, head) slice of logits is 256 MiB; the slices stay within
    SLICE_BYTES (64 MiB), for the UNet's CrossAttention and the VAE's AttnBlock, and the result
    equals the unsliced attention."""
    from cldm.hack import SLICE_BYTES, disable_sliced_attention, enable_sliced_attention
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock
    torch.manual_seed(0)
    n = 8192
    attention, block = CrossAttention(16, heads=2, dim_head=8).eval(), AttnBlock(32).eval()
    x, image = torch.randn(1, n, 16), torch.randn(1, 32, 64, 128)
    with torch.no_grad():
        with LargestTensor() as mode:
            sliced_out = attention(x)
            sliced_image = block(image)
        disable_sliced_attention()
        plain_out, plain_image = attention(x), block(image)
        enable_sliced_attention()
    assert mode.largest <= SLICE_BYTES, mode.largest
    assert torch.equal(sliced_out, plain_out) and torch.equal(sliced_image, plain_image)


# --- configs are data --------------------------------------------------------------------------

def test_config_target_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  target: os.system\n  params:\n    command: touch {marker}\n")
    from cldm.model import create_model
    with pytest.raises(Exception) as e:
        create_model(str(config))
    assert type(e.value).__name__ == "ConfigError", repr(e.value)
    assert "'os.system' is refused" in str(e.value) and "allow_any_target=True" in str(e.value)
    assert not marker.exists()
    nested = tmp_path / "nested.yaml"        # a config target allowed, its nested one not
    nested.write_text(open(TINY).read().replace("target: torch.nn.Identity",
                                                "target: subprocess.Popen"))
    with pytest.raises(Exception, match="'subprocess.Popen' is refused"):
        create_model(str(nested))


def test_config_targets_opt_in_and_upstream_configs():
    from ldm.util import instantiate_from_config
    from cldm.model import create_model
    assert type(create_model(TINY)).__name__ == "ControlLDM"
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    for target in ("collections.OrderedDict", "ldm.util.importlib", "torch.nn.functional.relu"):
        with pytest.raises(Exception, match="is refused") as e:
            instantiate_from_config({"target": target})
        assert type(e.value).__name__ == "ConfigError"
    assert instantiate_from_config({"target": "collections.OrderedDict"},
                                   allow_any_target=True) == {}


def test_config_opt_in_by_environment(monkeypatch):
    from ldm.util import instantiate_from_config
    monkeypatch.setenv("CONTROLNET_ALLOW_ANY_TARGET", "1")
    assert instantiate_from_config({"target": "collections.OrderedDict"}) == {}


BILLION_LAUGHS = "".join(
    [f'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["model: *i\n"])


def test_yaml_billion_laughs_one_clear_error(tmp_path):
    config = tmp_path / "lol.yaml"
    config.write_text(BILLION_LAUGHS)
    from cldm.model import create_model
    start = time.perf_counter()
    with pytest.raises(Exception) as e:
        create_model(str(config))
    assert time.perf_counter() - start < 5
    assert type(e.value).__name__ == "ConfigError", repr(e.value)
    assert "alias expansion bomb" in str(e.value) and "\n" not in str(e.value)


# --- checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    return str(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_load_onto_cuda_without_a_gpu_says_so(small_ckpt):
    from cldm.model import CheckpointError, load_state_dict
    with pytest.raises(CheckpointError) as e:
        load_state_dict(small_ckpt, location="cuda")
    assert "no GPU here (CUDA is not available to torch)" in str(e.value), e.value
    assert "Download it again" not in str(e.value)
    assert torch.equal(load_state_dict(small_ckpt, location="cpu")["w"], torch.zeros(3))


@pytest.fixture
def open_dir():
    """A folder every user may enter (pytest's tmp_path is private to its owner)."""
    path = tempfile.mkdtemp(prefix="inputs_round2_")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_checkpoint_says_permission_denied(small_ckpt, open_dir, tmp_path):
    """As a user who may not read it (root reads everything: the CLI then runs as nobody)."""
    path = open_dir / "locked.pth"
    shutil.copy(small_ckpt, path)
    os.chmod(path, 0)
    user = None
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot test as another user")
        user = 65534
    code, _, err = cli("--ckpt", str(path), "--outdir", str(tmp_path / "o"), user=user)
    line = one_error_line(err)
    assert code == 1 and "permission denied: this user may not read it" in line, line
    assert "Download" not in line


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "loop"])
def test_checkpoint_that_is_not_a_file_is_named(kind, tmp_path):
    path = tmp_path / "model.pth"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path = "/dev/zero"
    else:
        os.symlink(path, path)
    expected = {"fifo": "a FIFO (named pipe), not a file", "directory": "a directory, not a file",
                "device": "a character device, not a file",
                "loop": "a symbolic link loop, not a file"}[kind]
    code, _, err = cli("--ckpt", str(path), "--outdir", str(tmp_path / "o"), timeout=120)
    line = one_error_line(err)
    assert code == 1 and expected in line and "not found" not in line, line
    from cldm.model import CheckpointError, load_state_dict
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_state_dict(str(path))


@pytest.fixture
def sparse_safetensors(tmp_path):
    """A 50 GB .safetensors, sparse (nothing written but the header), whose header is valid."""
    size = 50 << 30
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4],
                               "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + size)
    return str(path)


def test_sparse_50gb_safetensors_one_line_in_cli_and_demo(sparse_safetensors, tmp_path):
    env = {"CANNY2IMAGE_DEBUG": ""}
    code, _, err = cli("--ckpt", sparse_safetensors, "--outdir", str(tmp_path / "o"), env=env)
    line = one_error_line(err)
    assert code == 1 and "holds 53.7 GB of tensors, more than the" in line, line
    proc = subprocess.run([sys.executable, "gradio_canny2image.py", "--ckpt", sparse_safetensors,
                           "--device", "cpu", "--no-warmup"], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds 53.7 GB of tensors" in lines[-1] and "MemoryError" not in proc.stderr, lines
