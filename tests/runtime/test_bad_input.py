"""Bad input through the Python API and the `canny2image` command, on the tiny model: every case
must end in one clear line (InputError / CheckpointError / NonFiniteOutputError for the API, one
`canny2image: error:` line and a non-zero exit for the CLI), never a traceback, and never decode
an image over the pixel limit or run a pickle's code. The demo's cases are in
tests/test_gradio_bad_input.py."""
import os
import pickle
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from annotator.util import HWC3, resize_image
from runtime import app, cli, inputs
from runtime.canny2image import Canny2Image
from runtime.errors import InputError, NonFiniteOutputError, device_out_of_memory
from tests.conftest import TINY_CONFIG


def params(**overrides):
    return {**dict(prompt="a box", a_prompt=inputs.A_PROMPT, n_prompt=inputs.N_PROMPT,
                   num_samples=1, image_resolution=64, ddim_steps=1, guess_mode=False,
                   strength=1.0, scale=9.0, seed=1, eta=0.0, low_threshold=100,
                   high_threshold=200), **overrides}


IMAGE = np.zeros((64, 80, 3), np.uint8)
IMAGE[16:48, 20:60] = 200

# --- the API: check_inputs (what Canny2Image.process runs first) ------------------------------

# A 50 MP + 1 px view that takes no memory: the check must refuse it before any copy is made.
OVER_LIMIT = np.broadcast_to(np.uint8(0), (1, inputs.MAX_INPUT_PIXELS + 1, 3))
API_BAD = [
    (dict(input_image=OVER_LIMIT), "too large.*more than the 50,000,000"),
    (dict(input_image=np.broadcast_to(np.uint16(0), (7072, 7072))), "too large"),
    (dict(input_image=[[0, 0], [0, 0]]), "numpy array"),
    (dict(input_image="photo.png"), "numpy array"),
    (dict(input_image=np.zeros((8, 8, 3), bool)), "uint8 or uint16"),
    (dict(input_image=np.zeros((8, 8, 3), np.float64)), "multiply by 255"),
    (dict(prompt=["a"]), "prompt must be a string"),
    (dict(a_prompt=5), "a_prompt must be a string"),
    (dict(ddim_steps="abc"), "ddim_steps must be an integer"),
    (dict(ddim_steps=None), "ddim_steps must be an integer"),
    (dict(ddim_steps=[1]), "ddim_steps must be an integer"),
    (dict(ddim_steps=float("inf")), "ddim_steps must be an integer"),
    (dict(num_samples=-3), r"num_samples must be in 1\.\.32"),
    (dict(seed=float("nan")), "seed must be an integer"),
    (dict(strength=None), "strength must be a number"),
    (dict(strength="1"), "strength must be a number"),
    (dict(scale=float("-inf")), "scale must be a finite number"),
    (dict(scale=1e9), r"scale must be > 0\.0 and <= 100"),
    (dict(eta=True), "eta must be a number"),
    (dict(low_threshold=[100]), "low_threshold must be a number"),
    (dict(high_threshold=1e6), r"high_threshold must be in 0\.0\.\.2040"),
    (dict(guess_mode=None), "guess_mode must be True or False"),
    (dict(guess_mode=1), "guess_mode must be True or False"),
    (dict(input_image=np.zeros((2, 3000, 3), np.uint8), image_resolution=64),
     "aspect ratio is too extreme"),
]


@pytest.mark.parametrize("bad, message", API_BAD, ids=[str(i) for i in range(len(API_BAD))])
def test_api_bad_values(bad, message):
    p = params(**bad)
    with pytest.raises(InputError, match=message):
        inputs.check_inputs(p.pop("input_image", IMAGE), **p)


def test_pixel_limit_is_one_rule():
    inputs.check_pixels(10_000, 5_000)                        # exactly 50 MP passes
    with pytest.raises(InputError, match=r"10001x5000 = 50,005,000 pixels, more than the 50,000,000 \(50 megapixels\) allowed"):
        inputs.check_pixels(10_001, 5_000)
    assert inputs.MAX_UPLOAD_BYTES == 3 * inputs.MAX_INPUT_PIXELS


@pytest.fixture(scope="module")
def nan_model():
    """The tiny model with one NaN weight in the UNet's last conv: every image is NaN."""
    from runtime.weights import build_model
    model = build_model(TINY_CONFIG, random_weights=True, seed=0)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight[0, 0, 0, 0] = float("nan")
    return model


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_nan_weights_are_reported_not_a_black_image(nan_model, mode):
    """Upstream would hand back black images (NaN cast to uint8). Fast mode on the CPU runs its
    fp32 logic: the redo on the reference sampler is NaN too, and then it says so."""
    pipe = Canny2Image(nan_model, mode=mode)
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite values.*weights") as info:
        pipe.process(IMAGE, **params())
    assert "\n" not in str(info.value)
    if mode == "fast":
        assert "after its float32 redo" in str(info.value)


# --- the CLI -------------------------------------------------------------------------------

def _cli(argv, capfd):
    """main(argv) in this process: (exit code, stdout, stderr), stderr at the file-descriptor
    level (OpenCV writes its warnings there, past Python)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:          # argparse
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def _one_error_line(err, pattern):
    """The error is one line, the last; the lines before it are the CLI's own progress notes
    (no warnings of OpenCV, PIL or torch, no traceback)."""
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("canny2image: ") for line in lines), err
    assert [line for line in lines if line.startswith("canny2image: error: ")] == lines[-1:], err
    assert re.search(pattern, lines[-1]), (pattern, lines[-1])
    assert "Traceback" not in err and "WARN" not in err and "Warning" not in err


def _make_files(d):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[10:40, 12:50] = (220, 120, 30)
    files = {}

    def save(name, image, **kw):
        files[name] = str(d / name)
        image.save(files[name], **kw)

    save("huge_1bit.png", Image.new("1", (30000, 30000), 1))     # 109 KB, 900 MP
    save("over_limit.png", Image.new("1", (8000, 7000), 1))      # 56 MP: over the limit
    save("float.tif", Image.fromarray(np.zeros((48, 64), np.float32)))
    good = Image.fromarray(rgb)
    good.save(d / "good.png")
    data = (d / "good.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("hello world")
    (d / "junk.jpg").write_bytes(os.urandom(2048))
    for name in ("truncated.png", "empty.png", "text.png", "junk.jpg", "good.png"):
        files[name] = str(d / name)
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _make_files(tmp_path_factory.mktemp("cli_bad"))


@pytest.mark.parametrize("name, pattern", [
    ("huge_1bit.png", "too large"),
    ("over_limit.png", r"too large: 8000x7000 = 56,000,000 pixels, more than the 50,000,000"),
])
def test_cli_pixel_limit_before_decoding(files, name, pattern, no_decoding, tmp_path, capfd):
    code, out, err = _cli([files[name], "--tiny", "--outdir", str(tmp_path / "o")], capfd)
    assert code == 1
    _one_error_line(err, pattern)


@pytest.mark.parametrize("name, pattern", [
    ("truncated.png", "the image data is truncated or corrupt"),
    ("empty.png", "not an image that can be read"),
    ("text.png", "not an image that can be read"),
    ("junk.jpg", "not an image that can be read"),
    ("float.tif", "32-bit float images are not supported"),
])
def test_cli_unreadable_images_no_opencv_warnings(files, name, pattern, tmp_path, capfd):
    code, out, err = _cli([files[name], "--tiny", "--outdir", str(tmp_path / "o")], capfd)
    assert code == 1
    _one_error_line(err, pattern)


@pytest.mark.parametrize("flags, pattern", [
    (["--ddim-steps", "abc"], "argument --ddim-steps: invalid int value: 'abc'"),
    (["--num-samples", "1.5"], "argument --num-samples: invalid int value"),
    (["--seed", ""], "argument --seed: invalid int value"),
    (["--strength", "x"], "argument --strength: invalid float value"),
    (["--mode", "turbo"], "argument --mode: invalid choice"),
    (["--tiny", "--ckpt", "x.pth"], "argument --ckpt: not allowed with argument --tiny"),
    (["--nonsense"], "unrecognized arguments: --nonsense"),
])
def test_cli_bad_flags_one_line(flags, pattern, files, capfd):
    code, out, err = _cli([files["good.png"], *flags], capfd)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canny2image: error: "), err
    assert re.search(pattern, lines[0]) and lines[0].endswith("(see --help)"), lines[0]


@pytest.mark.parametrize("flags, pattern", [
    (["--strength", "nan"], "strength must be a finite number"),
    (["--scale", "inf"], "scale must be a finite number"),
    (["--scale", "0"], "scale must be > 0"),
    (["--num-samples", "0"], r"num_samples must be in 1\.\.32"),
    (["--image-resolution", "10"], r"image_resolution must be in 64\.\.2048"),
    (["--low-threshold", "-1"], "low_threshold must be in"),
    (["--eta", "2"], r"eta must be in 0\.0\.\.1"),
    (["--seed", str(2 ** 32)], "seed must be in -1"),
    (["--prompt", "x" * 10001], "prompt is too long"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--device", "nonsense"], "--device nonsense"),
])
def test_cli_bad_values_one_line(flags, pattern, files, tmp_path, capfd):
    code, out, err = _cli([files["good.png"], "--tiny", *flags, "--outdir", str(tmp_path / "o")],
                          capfd)
    assert code == 1
    _one_error_line(err, pattern)
    assert not (tmp_path / "o").exists()            # refused before anything was written


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cli_junk_checkpoint_one_line(files, tmp_path, capfd):
    """A text file named .pth gave IndexError: pop from empty list; now the CheckpointError."""
    ckpt = tmp_path / "junk.pth"
    ckpt.write_text("this is not a checkpoint\n")
    code, out, err = _cli([files["good.png"], "--ckpt", str(ckpt), "--image-resolution", "64",
                           "--outdir", str(tmp_path / "o")], capfd)
    assert code == 1
    _one_error_line(err, rf"Could not read checkpoint {re.escape(str(ckpt))}: it is not a "
                         r"checkpoint")


def test_cli_malicious_protocol4_pickle_named_never_run(files, tmp_path, capfd):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": _Evil(marker)}, f, protocol=4)
    code, out, err = _cli([files["good.png"], "--ckpt", str(ckpt), "--image-resolution", "64",
                           "--outdir", str(tmp_path / "o")], capfd)
    assert code == 1 and not marker.exists()
    first = next(line for line in err.splitlines() if line.startswith("canny2image: error: "))
    assert first.startswith(f"canny2image: error: Refusing to load {ckpt}: its pickle references "
                            f"Python objects (posix.system"), err
    # the rest of the message is the conversion snippet, not torch's warnings or a traceback
    assert "Traceback" not in err and "Warning" not in err and "truncated" not in err


def test_cli_nan_output_is_an_error(files, tmp_path, capfd, monkeypatch):
    build = app.build_pipeline

    def poisoned(device, **flags):
        pipeline = build(device, **flags)
        with torch.no_grad():
            pipeline.model.model.diffusion_model.out[2].weight.fill_(float("nan"))
        return pipeline

    monkeypatch.setattr(app, "build_pipeline", poisoned)
    outdir = tmp_path / "o"
    code, out, err = _cli([files["good.png"], "--tiny", "--quiet", "--image-resolution", "64",
                           "--ddim-steps", "1", "--outdir", str(outdir)], capfd)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(
        "canny2image: error: the model computed NaN or infinite values (reference mode)")
    assert "invalid value encountered" not in err
    assert not os.listdir(outdir)                      # no black image written


def _no_build(monkeypatch):
    built = []
    monkeypatch.setattr(app, "build_pipeline", lambda *a, **k: built.append(a))
    return built


def test_cli_outdir_that_cannot_be_created_is_found_first(files, tmp_path, capfd, monkeypatch):
    built = _no_build(monkeypatch)
    (tmp_path / "a_file").write_text("")
    code, out, err = _cli([files["good.png"], "--tiny", "--outdir", str(tmp_path / "a_file" / "o")],
                          capfd)
    assert code == 1 and not built
    _one_error_line(err, "--outdir .*: cannot write there")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_cli_unwritable_existing_outdir_is_found_first(files, tmp_path, capfd, monkeypatch):
    built = _no_build(monkeypatch)
    outdir = tmp_path / "readonly"
    outdir.mkdir()
    outdir.chmod(0o500)
    try:
        code, out, err = _cli([files["good.png"], "--tiny", "--outdir", str(outdir)], capfd)
    finally:
        outdir.chmod(0o700)
    assert code == 1 and not built
    _one_error_line(err, "--outdir .*: cannot write there")


def test_cli_out_of_memory_is_recognised_by_type(files, tmp_path, capfd, monkeypatch):
    class Pipeline:
        model = None

        def process(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(app, "build_pipeline", lambda *a, **k: Pipeline())
    code, out, err = _cli([files["good.png"], "--tiny", "--quiet", "--outdir", str(tmp_path)],
                          capfd)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "canny2image: error: out of device memory: try a lower --image-resolution or fewer "
        "--num-samples")
    # a class that merely has the name is not taken for one
    assert not isinstance(type("OutOfMemoryError", (Exception,), {})(), device_out_of_memory())


ODD_FORMATS = {
    "palette.png": lambda rgb: Image.fromarray(rgb).convert("P"),
    "onebit.png": lambda rgb: Image.fromarray(rgb).convert("1"),
    "gray_alpha.png": lambda rgb: Image.fromarray(rgb).convert("LA"),
    "rgba.png": lambda rgb: Image.fromarray(rgb).convert("RGBA"),
    "cmyk.jpg": lambda rgb: Image.fromarray(rgb).convert("CMYK"),
    "anim_gif.gif": lambda rgb: Image.fromarray(rgb),
    "anim_webp.webp": lambda rgb: Image.fromarray(rgb),
    "photo_bmp.bmp": lambda rgb: Image.fromarray(rgb),
    "photo_tif.tif": lambda rgb: Image.fromarray(rgb),
}


def test_cli_odd_image_formats(tmp_path, capfd):
    """Every format PIL and OpenCV both read goes through (a folder run: one model build); an
    animation gives its first frame."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[8:40, 10:54] = rng.integers(100, 256, (32, 44, 3), dtype=np.uint8)
    for name, make in ODD_FORMATS.items():
        image = make(rgb)
        if name.startswith("anim"):
            later = Image.fromarray(np.zeros_like(rgb))
            image.save(folder / name, save_all=True, append_images=[later], lossless=True)
        else:
            image.save(folder / name)
    sixteen = (rgb.astype(np.uint16) * 257)[:, :, ::-1]
    cv2.imwrite(str(folder / "rgb16.png"), sixteen)
    outdir = tmp_path / "out"
    code, out, err = _cli([str(folder), "--tiny", "--quiet", "--image-resolution", "64",
                           "--ddim-steps", "1", "--outdir", str(outdir)], capfd)
    assert code == 0, err
    names = sorted(n for n in os.listdir(outdir) if n != "manifest.json")  # the folder job's
    stems = [os.path.splitext(n)[0] for n in [*ODD_FORMATS, "rgb16.png"]]
    assert names == sorted([f"{s}_edges.png" for s in stems]
                           + [f"{s}_0_seed12345_random-weights.png" for s in stems])
    expected = 255 - HWC3(cv2.Canny(resize_image(HWC3(rgb), 64), 100, 200))
    assert (expected == 0).any()                         # the picture has edges
    for name in ("anim_webp.webp", "photo_bmp.bmp", "photo_tif.tif", "rgba.png", "rgb16.png"):
        # lossless formats (the animation: its first frame; the second one is blank), and the
        # 16-bit picture reduced by >> 8: the edges of the 8-bit picture
        edges = np.asarray(Image.open(outdir / f"{os.path.splitext(name)[0]}_edges.png"))
        np.testing.assert_array_equal(edges, expected, err_msg=name)
    gif = np.asarray(Image.open(outdir / "anim_gif_edges.png"))
    assert (gif == 0).any()                              # palette colours, but not the blank frame
