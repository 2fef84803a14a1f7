"""The canny2image command on the tiny model, and its error paths (one line, no traceback)."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime.cli import main
from tests.conftest import REPO


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = np.full((70, 90, 3), 20, np.uint8)
    rgb[15:55, 20:70] = rng.integers(120, 256, size=(40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "box.png"), rgb[:, :, ::-1])
    cv2.imwrite(str(folder / "deep.png"), (rgb[:, :, 0].astype(np.uint16) << 8) | 7)  # 16-bit
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_file_input_writes_pngs_and_says_where(images, tmp_path, capsys):
    outdir = tmp_path / "out"
    code, out, err = _run([str(images / "box.png"), "--tiny", "--prompt", "a box",
                           "--image-resolution", "64", "--ddim-steps", "2", "--num-samples", "2",
                           "--seed", "5", "--outdir", str(outdir)], capsys)
    assert code == 0, err
    names = sorted(os.listdir(outdir))
    assert names == ["box_0_seed5_random-weights.png", "box_1_seed5_random-weights.png",
                     "box_edges.png"]
    last = out.strip().splitlines()[-1]
    assert str(outdir) in last and "3 PNGs" in last and "RANDOM WEIGHTS" in last
    sample = Image.open(outdir / names[0])
    assert sample.size == (64, 64) and sample.mode == "RGB"     # 70x90 at 64 -> 64 x 82 -> 64
    assert "random" in sample.text["weights"] and sample.text["seed"] == "5"
    assert sample.text["prompt"] == "a box"
    edges = np.asarray(Image.open(outdir / "box_edges.png"))
    assert set(np.unique(edges)) <= {0, 255}
    assert "Traceback" not in err


def test_folder_input_and_sixteen_bit(images, tmp_path, capsys):
    outdir = tmp_path / "out"
    code, out, err = _run([str(images), "--tiny", "--image-resolution", "64", "--ddim-steps", "1",
                           "--quiet", "--outdir", str(outdir)], capsys)
    assert code == 0, err
    assert sorted(os.listdir(outdir)) == [
        "box_0_seed12345_random-weights.png", "box_edges.png",
        "deep_0_seed12345_random-weights.png", "deep_edges.png", "manifest.json"]
    assert "4 PNGs" in out.strip().splitlines()[-1]
    # the 16-bit gray input was reduced by >> 8: same edges as the 8-bit red channel
    expected = 255 - cv2.Canny(cv2.resize(
        np.dstack([np.asarray(Image.open(images / "box.png"))[:, :, 0]] * 3), (64, 64),
        interpolation=cv2.INTER_AREA), 100, 200)
    np.testing.assert_array_equal(np.asarray(Image.open(outdir / "deep_edges.png"))[:, :, 0],
                                  expected)


@pytest.mark.parametrize("argv, message", [
    (["{missing}", "--tiny"], "no such file or folder"),
    (["{bad}", "--tiny"], "not an image that can be read"),
    (["{empty}", "--tiny"], "no images in this folder"),
    (["--tiny", "--ddim-steps", "0"], r"ddim_steps must be in 1\.\.1000"),
    (["--tiny", "--seed", "-5"], "seed must be in -1"),
    (["--tiny", "--eta", "nan"], "eta must be a finite number"),
    (["--ckpt", "{missing}"], "Checkpoint not found"),
    (["--tiny", "--device", "bogus"], "--device bogus"),
])
def test_errors_are_one_clean_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not a png")
    (tmp_path / "empty").mkdir()
    paths = {"missing": str(tmp_path / "missing.png"), "bad": str(tmp_path / "bad.png"),
             "empty": str(tmp_path / "empty")}
    argv = [a.format(**paths) for a in argv] + ["--outdir", str(tmp_path / "out")]
    code, out, err = _run(argv, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canny2image: error: "), err
    assert __import__("re").search(message, lines[0])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_no_traceback_from_the_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", str(tmp_path / "nope.png"), "--tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"canny2image: error: {tmp_path / 'nope.png'}: no such file or folder"
    assert "Traceback" not in result.stderr + result.stdout


def test_cpu_run_without_flags_uses_smaller_defaults_and_the_sample(tmp_path, capsys):
    outdir = tmp_path / "out"
    code, out, err = _run(["--tiny", "--device", "cpu", "--ddim-steps", "1", "--quiet",
                           "--outdir", str(outdir)], capsys)
    assert code == 0, err
    assert "--image-resolution 256 (upstream: 512)" in err
    assert "--ddim-steps" not in err.split("shorter CPU run")[1].splitlines()[0]   # given
    sample = Image.open(outdir / "sample_house_0_seed12345_random-weights.png")
    assert sample.size == (320, 256)                       # 640x480 sample at 256
    assert sample.text["prompt"] == "a house, best quality"


def test_low_vram_flag_sets_save_memory_before_the_build_and_changes_no_pixel(images, tmp_path,
                                                                             capsys, monkeypatch):
    import config
    import runtime.weights
    from cldm.hack import disable_sliced_attention, sliced_attention_enabled

    seen = []
    real_build = runtime.weights.build_model

    def build_model(*args, **kwargs):
        seen.append((config.save_memory, sliced_attention_enabled()))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(runtime.weights, "build_model", build_model)
    argv = [str(images / "box.png"), "--tiny", "--image-resolution", "64", "--ddim-steps", "2",
            "--seed", "3"]
    outputs = {}
    try:
        for flags in ([], ["--low-vram"]):
            outdir = tmp_path / ("low" if flags else "plain")
            code, _, err = _run(argv + flags + ["--outdir", str(outdir)], capsys)
            assert code == 0, err
            outputs[bool(flags)] = {n: np.asarray(Image.open(outdir / n))
                                    for n in os.listdir(outdir)}
    finally:
        config.save_memory = False
        disable_sliced_attention()
    assert seen == [(False, False), (True, True)]
    assert outputs[True].keys() == outputs[False].keys() and len(outputs[True]) == 2
    for name, pixels in outputs[False].items():
        np.testing.assert_array_equal(outputs[True][name], pixels)


def test_low_vram_on_a_gpu_defaults_to_fast_mode(images, capsys, monkeypatch):
    """The mode decision with the device stubbed to a GPU: --low-vram no longer means reference
    (fast mode keeps its fp16 diffusion networks resident under it); on the CPU: reference."""
    import torch

    from runtime import app, folder_job
    chosen = []

    def build_pipeline(device, mode, low_vram, **flags):
        chosen.append((str(device), mode, low_vram))
        raise app.AppError("stop before the build")
    monkeypatch.setattr(app, "build_pipeline", build_pipeline)
    monkeypatch.setattr(folder_job, "rank_device", lambda device, ranks: device)
    monkeypatch.setattr(app, "pick_device", lambda spec: torch.device(
        "cuda:0" if spec == "auto" else spec))
    box = str(images / "box.png")
    for argv in ([box, "--tiny", "--low-vram"], [box, "--tiny"],
                 [box, "--tiny", "--low-vram", "--device", "cpu"],
                 [box, "--tiny", "--low-vram", "--mode", "reference"]):
        code, _, err = _run(argv, capsys)
        assert code == 1 and "stop before the build" in err, err
    assert chosen == [("cuda:0", "fast", True), ("cuda:0", "fast", False),
                      ("cpu", "reference", True), ("cuda:0", "reference", True)]
