"""runtime/app.py, the one builder: the CLI and the demo build the same pipeline from the same
flags, the default mode per device, the CPU defaults, the default checkpoint, image files."""
import ast
import os

import numpy as np
import pytest
import torch
from PIL import Image

import gradio_canny2image as demo
import runtime.canny2image
import runtime.inputs
import runtime.weights
from runtime import app, cli
from tests.conftest import FULL_CONFIG, REPO, TINY_CONFIG


class _Stop(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Every entry point's build, recorded and stopped at Canny2Image (no model is built): a list
    of dicts (build_model's arguments, the mode, save_memory at build time). Runs in an empty
    working folder with no checkpoint beside the package."""
    import config
    from cldm.hack import disable_sliced_attention

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime.inputs, "REPO", str(tmp_path / "package"))
    calls = []

    def build_model(config_path, ckpt=None, random_weights=False, device="cpu", seed=0,
                    **options):
        calls.append(dict(config=config_path, ckpt=ckpt, random_weights=random_weights,
                          device=str(device), seed=seed, save_memory=config.save_memory,
                          options=options))
        return object()

    def canny2image(model, mode="reference", options=None):
        calls[-1].update(mode=mode, fast_options=options)
        raise _Stop()

    monkeypatch.setattr(runtime.weights, "build_model", build_model)
    monkeypatch.setattr(runtime.canny2image, "Canny2Image", canny2image)
    yield calls
    config.save_memory = False
    disable_sliced_attention()


def _cli_build(calls, flags, capsys):
    """The command's build for `flags` (on the built-in sample, CPU): the recorded call."""
    code = cli.main(["--device", "cpu", "--quiet", "--outdir", "out", *flags])
    err = capsys.readouterr().err
    assert code == 1 and "_Stop" in err, err       # stopped at Canny2Image, after the build
    return calls.pop()


def _demo_build(calls, flags):
    with pytest.raises(_Stop):
        demo.build_pipelines(demo.parse_args(["--device", "cpu", *flags]))
    return calls.pop()


@pytest.mark.parametrize("flags", [["--tiny"], ["--random-weights"], ["--tiny", "--low-vram"],
                                   ["--random-weights", "--mode", "reference"],
                                   ["--ckpt", "mine.safetensors"], []])
def test_cli_and_demo_build_the_same_pipeline(recorded, capsys, flags):
    open("mine.safetensors", "wb").close()
    if not flags:   # no weights flag: the default checkpoint, found by both
        os.makedirs("models")
        open(os.path.join("models", "control_sd15_canny.pth"), "wb").close()
    from_cli = _cli_build(recorded, flags, capsys)
    from_demo = _demo_build(recorded, flags)
    assert from_cli == from_demo
    assert from_cli["device"] == "cpu" and from_cli["mode"] == "reference"
    assert from_cli["save_memory"] == ("--low-vram" in flags)
    assert from_cli["config"] == (TINY_CONFIG if "--tiny" in flags else FULL_CONFIG)
    assert from_cli["random_weights"] == ("--tiny" in flags or "--random-weights" in flags)
    if "--ckpt" in flags:
        assert from_cli["ckpt"] == "mine.safetensors"
    elif not flags:
        assert os.path.samefile(from_cli["ckpt"], "models/control_sd15_canny.pth")
    else:
        assert from_cli["ckpt"] is None


class _Precompiling:
    """A stand-in for kernels.precompile's handle: what was asked of it."""

    def __init__(self, log, args):
        self.log = log
        log.append(("start", args))

    def wait(self):
        self.log.append(("wait",))
        return "kernels compiled"

    def cancel(self):
        self.log.append(("cancel",))


def test_cli_and_demo_precompile_the_first_request_and_cancel_on_a_failed_build(
        recorded, capsys, monkeypatch):
    from runtime.sample import sample_image
    log = []
    monkeypatch.setattr(app, "start_precompile", lambda device, mode, first, tiny=False,
                        early=None: _Precompiling(log, (str(device), mode, first, tiny)))
    # the CLI: the sample picture at --image-resolution, --num-samples images; its build fails
    # here (recorded stops it), so the child is cancelled, never awaited
    _cli_build(recorded, ["--random-weights", "--mode", "fast", "--image-resolution", "384",
                          "--num-samples", "3"], capsys)
    h, w = runtime.inputs.resized_shape(*sample_image().shape[:2], 384)
    assert log == [("start", ("cpu", "fast", (h, w, 3), False)), ("cancel",)]
    log.clear()
    # a folder: a square of --image-resolution, --batch-size x --num-samples images
    os.makedirs("photos")
    Image.fromarray(sample_image()).save("photos/a.png")
    cli.main(["--device", "cpu", "--quiet", "--outdir", "out", "photos", "--random-weights",
              "--mode", "fast", "--batch-size", "2", "--num-samples", "2",
              "--image-resolution", "448"])
    assert log == [("start", ("cpu", "fast", (448, 448, 4), False)), ("cancel",)]
    log.clear()
    # the demo: the warm-up's shape (512², one image)
    _demo_build(recorded, ["--random-weights", "--mode", "reference"])
    assert log == [("start", ("cpu", "reference", (512, 512, 1), False)), ("cancel",)]


def test_default_checkpoint_is_found_where_cli_and_demo_look(recorded, tmp_path, capsys):
    from cldm.model import DEFAULT_CHECKPOINT
    assert app.checkpoint_candidates() == (DEFAULT_CHECKPOINT, os.path.join(
        ".", "models", "control_sd15_canny.safetensors"))
    assert app.find_checkpoint() is None
    # none: the command refuses before any build, naming the default path and the way out
    assert cli.main(["--device", "cpu", "--outdir", "out"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Checkpoint not found: ./models/control_sd15_canny.pth" in err
    assert "--random-weights" in err and "\n" not in err and not recorded
    # beside the package (a checkout's models/), then in the working folder, which wins
    package_models = tmp_path / "package" / "models"
    package_models.mkdir(parents=True)
    (package_models / "control_sd15_canny.safetensors").write_bytes(b"")
    assert app.find_checkpoint() == str(package_models / "control_sd15_canny.safetensors")
    os.makedirs("models")
    open(os.path.join("models", "control_sd15_canny.safetensors"), "wb").close()
    here = str(tmp_path / "models" / "control_sd15_canny.safetensors")
    assert app.find_checkpoint() == here
    open(os.path.join("models", "control_sd15_canny.pth"), "wb").close()   # .pth first
    assert app.find_checkpoint() == str(tmp_path / "models" / "control_sd15_canny.pth")
    assert _cli_build(recorded, [], capsys)["ckpt"] == app.find_checkpoint()


def test_default_mode_per_device():
    assert app.default_mode("cpu") == "reference"
    assert app.default_mode(torch.device("cpu")) == "reference"
    for gpu in ("cuda", "cuda:1", torch.device("cuda", 0)):
        assert app.default_mode(gpu) == "fast"
    assert app.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(app.AppError, match="--device nonsense"):
        app.pick_device("nonsense")


def test_cpu_defaults():
    # upstream's defaults are 512 px and 20 steps; the CPU's are smaller unless given
    assert app.cpu_defaults("cuda:0") == (512, 20, [])
    assert app.cpu_defaults("cuda:0", 320, 5) == (320, 5, [])
    resolution, steps, choices = app.cpu_defaults("cpu")
    assert (resolution, steps) == (app.CPU_RESOLUTION, app.CPU_STEPS)
    assert resolution < 512 and steps < 20 and resolution % 64 == 0
    assert choices == [f"--image-resolution {resolution} (upstream: 512)",
                       f"--ddim-steps {steps} (upstream: 20)"]
    assert app.cpu_defaults(torch.device("cpu"), 384, None) == (
        384, steps, [f"--ddim-steps {steps} (upstream: 20)"])
    # the command's settings apply them
    args = cli.parse_args(["--tiny"])
    params, choices = app.settings(args, "cpu")
    assert (params["image_resolution"], params["ddim_steps"]) == (resolution, steps)
    assert params["prompt"] == "a house, best quality"     # the built-in sample's prompt
    params, choices = app.settings(cli.parse_args(["x.png", "--ddim-steps", "3"]), "cuda")
    assert (params["image_resolution"], params["ddim_steps"], params["prompt"]) == (512, 3, "")
    assert choices == []


def test_build_pipeline_on_the_tiny_model_runs():
    pipe = app.build_pipeline("cpu", tiny=True, weights_seed=3)
    assert isinstance(pipe, runtime.canny2image.Canny2Image)
    assert pipe.mode == "reference" and pipe.model.random_weights
    assert pipe.model.device == torch.device("cpu") and not pipe.model.training
    again = app.make_model("cpu", config=TINY_CONFIG, random_weights=True, weights_seed=3)
    other = app.make_model("cpu", tiny=True, weights_seed=4)
    for (name, a), b, c in zip(pipe.model.state_dict().items(), again.state_dict().values(),
                               other.state_dict().values()):
        assert torch.equal(a, b), name                   # the same seed, the same weights
    assert any(not torch.equal(a, c) for a, c in zip(again.state_dict().values(),
                                                     other.state_dict().values()))
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48] = 255
    images = pipe.process(image, "a box", "", "", 1, 64, 1, False, 1.0, 9.0, 1, 0.0, 100, 200)
    assert len(images) == 2 and images[1].shape == (64, 64, 3) and images[1].dtype == np.uint8


def test_make_model_errors_are_one_line(tmp_path):
    with pytest.raises(app.AppError, match="not both"):
        app.make_model("cpu", tiny=True, ckpt=str(tmp_path / "x.pth"))
    with pytest.raises(app.AppError, match="Checkpoint not found: .*missing.pth") as info:
        app.make_model("cpu", ckpt=str(tmp_path / "missing.pth"))
    assert "\n" not in str(info.value)


def test_png_round_trip_and_read_errors(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = str(tmp_path / "a.png")
    app.write_png(path, image, {"prompt": "a house", "seed": "7"})
    with Image.open(path) as png:
        assert png.text == {"prompt": "a house", "seed": "7"}
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)
    np.testing.assert_array_equal(app.read_image(path), image)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(app.AppError, match=r"^.*bad\.png: ") as info:
        app.read_image(str(tmp_path / "bad.png"))
    assert "\n" not in str(info.value)


def _code_strings(path):
    """String constants of a module that are not docstrings."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


def test_the_default_checkpoint_path_is_spelled_once():
    """Only cldm/model.py's DEFAULT_CHECKPOINT names the file in code (docstrings aside)."""
    spelled = []
    for folder in ("runtime", "cldm", "ldm", "benchmarks", "scripts", "."):
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            if folder == ".":
                dirs.clear()
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".py") and any("control_sd15_canny" in s
                                                for s in _code_strings(path)):
                    spelled.append(os.path.relpath(path, REPO))
    assert spelled == ["cldm/model.py"]


class _EarlyChild:
    """A stand-in for runtime/early.py's child: what was done with it."""

    def __init__(self):
        self.log = []

    def send(self, job):
        self.log.append("send")

    def discard(self):
        self.log.append("discard")


def test_the_cli_and_the_demo_hand_the_early_child_on_or_discard_it(recorded, capsys,
                                                                    monkeypatch):
    handed = []
    monkeypatch.setattr(app, "start_precompile", lambda device, mode, first, tiny=False,
                        early=None: handed.append(early))
    child = _EarlyChild()
    code = cli.main(["--device", "cpu", "--quiet", "--outdir", "out", "--random-weights",
                     "--mode", "fast"], early=child)
    assert code == 1 and handed == [child]   # to the precompile; discarded after (a no-op
    assert child.log == ["discard"]          # for a child that got its job)
    recorded.clear()
    # an error before the build: discarded all the same, no precompile
    child, handed[:] = _EarlyChild(), []
    assert cli.main(["--device", "cpu", "--outdir", "out", "missing.png"], early=child) == 1
    assert handed == [] and child.log == ["discard"]
    with pytest.raises(SystemExit):
        cli.main(["--help"], early=(child := _EarlyChild()))
    assert child.log == ["discard"]
    # the demo
    child = _EarlyChild()
    with pytest.raises(SystemExit):
        demo.main(["--device", "cpu", "--mode", "fast", "--port", "7999"], early=child)
    assert child.log == ["discard"]
    with pytest.raises(_Stop):
        demo.build_pipelines(demo.parse_args(["--device", "cpu", "--random-weights"]), child)
    assert handed == [child]
    capsys.readouterr()
