"""Folder runs (runtime/folder_job.py): every readable file processed and each bad one named,
torchrun shares equal to the single-process run byte for byte, the manifest, --batch-size.

The torchrun runs are real (`torchrun --standalone`, gloo, CPU ranks) on the tiny model at 64 px
and 2 DDIM steps. Every run here has OMP_NUM_THREADS=1: torchrun sets it for each of several
processes, and torch's CPU results depend on the thread count (measured: 4 of 5 PNGs differ
between 1 and 2 threads), so the baseline has to use the same count."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from runtime import folder_job
from runtime.errors import InputError
from runtime.cli import main
from tests.conftest import REPO

FLAGS = ["--tiny", "--device", "cpu", "--image-resolution", "64", "--ddim-steps", "2", "--quiet"]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _write_images(folder, count=5):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(count):
        h = 48 + 16 * (i % 2)                      # two sizes
        image = np.full((h, 64, 3), 20, np.uint8)
        image[8:40, 10:54] = rng.integers(100, 256, (32, 44, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i}.png"), image)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = _write_images(tmp_path_factory.mktemp("job") / "in")
    (folder / "img2_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)   # truncated
    return folder


def _cli(prefix, folder, outdir, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*prefix, str(folder), *FLAGS, "--outdir", str(outdir), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _pngs(outdir):
    return {f: (outdir / f).read_bytes() for f in sorted(os.listdir(outdir)) if f.endswith(".png")}


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("single")
    result = _cli([sys.executable, "-m", "runtime.cli"], folder, outdir)
    return result, outdir


def _manifest(outdir):
    return json.loads((outdir / folder_job.MANIFEST).read_text())


def test_single_process_processes_the_others_and_names_the_bad_file(single, folder):
    result, outdir = single
    assert result.returncode == 1, result.stderr
    err = result.stderr.strip().splitlines()
    bad = str(folder / "img2_corrupt.png")
    failed = [line for line in err if "FAILED" in line]
    assert failed == [f"canny2image: FAILED {bad}: not an image that can be read (use PNG or JPEG)"]
    assert err[-1].startswith("canny2image: error: 1 of 6 files failed")
    assert "img2_corrupt.png" in err[-1]
    assert "Traceback" not in result.stderr
    assert sorted(_pngs(outdir)) == sorted(
        [f"img{i}_edges.png" for i in range(5)]
        + [f"img{i}_0_seed12345_random-weights.png" for i in range(5)])
    m = _manifest(outdir)
    assert m["inputs"] == 6 and m["failed"] == 1 and m["world_size"] == 1
    assert [os.path.basename(r["input"]) for r in m["files"]] == sorted(os.listdir(folder))
    for r in m["files"]:
        assert r["seed"] == 12345 and r["rank"] == 0 and r["seconds"] >= 0
        assert (r["error"] is None) == (r["input"] != bad)
        assert all((outdir / f).is_file() for f in r["outputs"])


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside python")
def test_torchrun_two_processes_equal_the_single_process_run(single, folder, tmp_path):
    base_result, base = single
    outdir = tmp_path / "out"
    result = _cli([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "runtime.cli"],
                  folder, outdir)
    assert result.returncode != 0                         # one corrupt file
    assert f"FAILED {folder / 'img2_corrupt.png'} (rank 1): not an image" in result.stderr
    assert "1 of 6 files failed" in result.stderr
    ours, theirs = _pngs(outdir), _pngs(base)
    assert len(ours) == 10 and ours.keys() == theirs.keys()
    assert [f for f in ours if ours[f] != theirs[f]] == []            # byte for byte
    m, mb = _manifest(outdir), _manifest(base)
    assert m["world_size"] == 2 and m["inputs"] == 6 and m["failed"] == 1
    assert [r["rank"] for r in m["files"]] == [0, 1, 0, 1, 0, 1]      # file i on rank i % 2
    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("rank", "seconds")} for r in records]
    assert strip(m["files"]) == strip(mb["files"])
    assert not [f for f in os.listdir(outdir) if f.startswith(folder_job.PARTS_PREFIX)]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun is not installed beside python")
def test_torchrun_one_process_equals_the_plain_command(single, folder, tmp_path):
    _, base = single
    outdir = tmp_path / "out"
    result = _cli([TORCHRUN, "--standalone", "--nproc-per-node", "1", "-m", "runtime.cli"],
                  folder, outdir)
    assert result.returncode != 0 and "1 of 6 files failed" in result.stderr
    assert _pngs(outdir) == _pngs(base)
    assert _manifest(outdir)["world_size"] == 1


def test_every_bad_file_is_named_once_and_the_rest_is_written(tmp_path, capsys):
    folder = _write_images(tmp_path / "in", 2)
    (folder / "a_text.png").write_text("not a png")
    (folder / "z_empty.jpg").write_bytes(b"")
    cv2.imwrite(str(folder / "m_panorama.png"), np.zeros((2, 600), np.uint8))  # 64 x 19200 px
    outdir = tmp_path / "out"
    code = main([str(folder), *FLAGS, "--outdir", str(outdir)])
    out, err = capsys.readouterr()
    assert code == 1
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 3
    assert "a_text.png: not an image that can be read" in failed[0]
    assert "m_panorama.png: the image would be resized to" in failed[1]
    assert "z_empty.jpg: not an image that can be read" in failed[2]
    last = err.strip().splitlines()[-1]
    assert last.startswith("canny2image: error: 3 of 5 files failed")
    assert all(n in last for n in ("a_text.png", "m_panorama.png", "z_empty.jpg"))
    assert "wrote 4 PNGs" in out
    assert len([f for f in os.listdir(outdir) if f.endswith(".png")]) == 4


def test_random_seeds_are_per_file_and_recorded_with_batches(tmp_path, capsys):
    folder = _write_images(tmp_path / "in", 3)                 # sizes 64, 80, 64 px high
    outdir = tmp_path / "out"
    assert main([str(folder), *FLAGS, "--seed", "-1", "--batch-size", "3",
                 "--outdir", str(outdir)]) == 0
    m = _manifest(outdir)
    assert m["batch_size"] == 3 and m["failed"] == 0 and len(m["files"]) == 3
    for r in m["files"]:
        assert 0 <= r["seed"] <= 65535
        sample = Image.open(outdir / r["outputs"][1])
        assert f"_seed{r['seed']}_" in r["outputs"][1] and sample.text["seed"] == str(r["seed"])


@pytest.fixture(scope="module")
def tiny_model():
    from runtime.weights import build_model
    from tests.conftest import TINY_CONFIG
    return build_model(TINY_CONFIG, random_weights=True, seed=0)


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_process_batch_keeps_each_images_noise(tiny_model, mode):
    from runtime.canny2image import Canny2Image
    from runtime.sample import sample_image
    pipe = Canny2Image(tiny_model, mode=mode)
    rng = np.random.default_rng(1)
    images = [sample_image(96, 128), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)]
    params = dict(prompt="a", a_prompt="b", n_prompt="c", num_samples=1, image_resolution=64,
                  ddim_steps=2, guess_mode=False, strength=1.0, scale=9.0, eta=0.0,
                  low_threshold=100, high_threshold=200)
    seeds = [5, 5]   # the second image must be seeded again, not continue the first's draws
    one = [pipe.process(image, seed=s, **params) for image, s in zip(images, seeds)]
    batched = pipe.process_batch(images, seeds, **params)
    other_seed = pipe.process(images[0], seed=6, **params)
    assert len(batched) == 2
    for a, b in zip(one, batched):
        assert len(a) == len(b) == 2
        np.testing.assert_array_equal(a[0], b[0])                   # the edge map
        for x, y in zip(a[1:], b[1:]):
            # the same noise: equal up to the last bit of a few pixels (batch-size-dependent
            # summation order); another seed's noise differs nearly everywhere
            d = np.abs(x.astype(int) - y.astype(int))
            assert d.max() <= 1 and (d > 0).mean() < 0.01
    assert (np.abs(other_seed[1].astype(int) - one[0][1].astype(int)) > 1).mean() > 0.5
    with pytest.raises(InputError, match="eta == 0"):
        pipe.process_batch(images, seeds, **{**params, "eta": 0.5})
    with pytest.raises(InputError, match="one size"):
        pipe.process_batch([images[0], images[0][:, :64]], [1, 2], **params)


def test_batches_do_not_depend_on_the_number_of_processes():
    tasks = folder_job.plan([(f"f{i}", f"f{i}.png") for i in range(11)], 7)
    for size in (1, 2, 3, 4):
        expected = folder_job.windows(tasks, size)
        for world in (1, 2, 3, 5):
            shares = [folder_job.share(tasks, size, folder_job.Ranks(r, world, r))
                      for r in range(world)]
            got = sorted((w for s in shares for w in s), key=lambda w: w[0].index)
            assert got == expected                               # each window once, unchanged
            assert all(w[0].index // size % world == r for r, s in enumerate(shares) for w in s)


@pytest.mark.parametrize("env, expected", [
    ({}, folder_job.Ranks(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, folder_job.Ranks(3, 4, 1)),
])
def test_ranks_from_torchrun_environment(env, expected):
    assert folder_job.Ranks.from_env(env) == expected


@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"},
                                 {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}])
def test_bad_torchrun_environment_is_one_line(env):
    with pytest.raises(folder_job.JobError):
        folder_job.Ranks.from_env(env)


class _StubPipeline:
    """Stands in for Canny2Image in the coordination test below (no model needed there)."""

    def check(self, image, **kwargs):
        return None

    def process(self, image, seed, progress=None, **kwargs):
        return [image, image]


def test_rank0_does_not_hang_on_a_silent_rank_and_records_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_job, "POLL_S", 0.01)
    parts = tmp_path / "parts"
    parts.mkdir()
    tasks = folder_job.plan([(f"f{i}", f"f{i}.png") for i in range(4)], 1)
    settings = folder_job.Settings(outdir=str(tmp_path), params={"image_resolution": 64, "eta": 0},
                                   text=lambda source, seed: {}, quiet=True, wait_timeout=0.2)
    written = []
    records = folder_job.run(folder_job.Plan(tasks, total=4), str(parts), _StubPipeline(),
                             settings, folder_job.Ranks(0, 2, 0),
                             read=lambda path: np.zeros((64, 64, 3), np.uint8),
                             write=lambda items: written.extend(p for p, _, _ in items),
                             expected=(), say=lambda msg: None)
    assert [r["error"] is None for r in records] == [True, False, True, False]
    assert all("no result from rank(s) [1]" in r["error"] for r in records[1::2])
    assert len(written) == 4 and _manifest(tmp_path)["failed"] == 2


class _OomBatches(_StubPipeline):
    def process_batch(self, images, seeds, progress=None, **kwargs):
        raise MemoryError

    def process(self, image, seed, progress=None, **kwargs):
        if seed == 13:
            raise MemoryError
        return [image, image]


def test_a_failed_batch_runs_its_files_one_at_a_time(tmp_path):
    tasks = folder_job.plan([(f"f{i}", f"f{i}.png") for i in range(3)], 1)
    tasks[1].seed = 13                           # this one fails alone too
    settings = folder_job.Settings(outdir=str(tmp_path), params={"image_resolution": 64, "eta": 0},
                                   batch_size=3, text=lambda source, seed: {}, quiet=True)
    written = []
    records = folder_job.run(folder_job.Plan(tasks, total=3), None, _OomBatches(), settings,
                             folder_job.Ranks(), read=lambda path: np.zeros((64, 64, 3), np.uint8),
                             write=lambda items: written.extend(p for p, _, _ in items),
                             expected=(), say=lambda msg: None)
    assert [r["error"] for r in records] == [None, records[1]["error"], None]
    assert records[1]["error"].startswith("out of memory")
    assert len(written) == 4


def test_a_failed_record_keeps_the_reason_only_also_for_an_escaped_file_name(tmp_path):
    """The record names the file already: its error is the reason without the path, also where
    the message shows the path escaped (a control character in the name)."""
    from runtime import app
    bad = tmp_path / "a\x1b.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(app.AppError) as raised:
        app.read_image(str(bad))
    assert "\x1b" not in str(raised.value)          # the message escapes the name
    assert folder_job._reason(raised.value, (app.AppError,), str(bad)) == \
        "not an image that can be read (use PNG or JPEG)"
