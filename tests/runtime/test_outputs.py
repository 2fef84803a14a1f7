"""The user's files (issues 21 and 22, round 2): outputs planned before any work and never
clobbering, atomic writes (interrupts, a full disk, names too long), resume, folders with FIFOs
and devices, the torchrun rendezvous timeout, names in any encoding. Through the CLI entry point
(in this process, or as a subprocess where signals or raw bytes in argv matter), tiny model, CPU.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from runtime import folder_job, outputs
from runtime.cli import main
from tests.conftest import REPO, free_port

FLAGS = ["--tiny", "--device", "cpu", "--image-resolution", "64", "--ddim-steps", "1", "--quiet"]
SAMPLE = "_0_seed12345_random-weights.png"


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    rgb = np.full((64, 80, 3), 20, np.uint8)
    rgb[8:56, 10:70] = rng.integers(100, 256, (48, 60, 3), dtype=np.uint8)
    with open(path, "wb") as f:            # the name may hold any bytes
        Image.fromarray(rgb).save(f, format="PNG")


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _last_error(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("canny2image: error: "), err
    return lines[-1]


def _files(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def _cli(*argv, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", *argv], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _valid_pngs(folder):
    """Every file in `folder` is a complete PNG or the manifest; no temporaries."""
    for name in os.listdir(folder):
        assert not name.startswith("."), name                      # no temporary left
        if name.endswith(".png"):
            with Image.open(folder / name) as image:
                image.load()
        else:
            assert name == folder_job.MANIFEST, name
            json.loads((folder / name).read_text())


# --- outputs never clobber ---------------------------------------------------------------------

def test_outdir_same_as_input_folder_refuses_to_overwrite_a_users_file(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    _image(d / "a.png")
    _image(d / "a_edges.png", seed=1)            # the user's own picture, not an output
    before = _files(d)
    code, out, err = _run([d, *FLAGS, "--outdir", d], capsys)
    line = _last_error(err)
    assert code == 1 and "the outputs would overwrite input files: a_edges.png" in line, line
    assert _files(d) == before                    # nothing written, nothing replaced
    code, out, err = _run([d, *FLAGS, "--outdir", d, "--overwrite"], capsys)   # inputs: never
    assert code == 1 and "would overwrite input files" in _last_error(err)
    assert _files(d) == before


def test_outdir_same_as_input_folder_never_reads_outputs_as_inputs(tmp_path, capsys,
                                                                   monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    _image(d / "a.png")
    code, out, err = _run([d, *FLAGS, "--outdir", d], capsys)
    assert code == 0, err
    assert sorted(os.listdir(d)) == ["a.png", "a" + SAMPLE, "a_edges.png", "manifest.json"]
    first = _files(d)
    monkeypatch.chdir(d)                              # the same command, the folder spelt otherwise
    code, out, err = _run([".", *FLAGS, "--outdir", d], capsys)
    assert code == 0, err
    assert "resuming: 1 of 1 files already done" in err and "model ready" not in err
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["inputs"] == 1 and [r["input"] for r in manifest["files"]] == [str(d / "a.png")]
    assert manifest["folder"] == str(d.resolve())
    assert {f: b for f, b in _files(d).items() if f.endswith(".png")} == {
        f: b for f, b in first.items() if f.endswith(".png")}
    code, out, err = _run([d, *FLAGS, "--outdir", d, "--overwrite"], capsys)   # redone
    assert code == 0 and "resuming" not in err and "model ready" in err, err
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["resumed"] == [] and manifest["inputs"] == 1 and manifest["complete"]


def test_inputs_sharing_a_stem_keep_their_extension(tmp_path, capsys):
    d, out = tmp_path / "d", tmp_path / "out"
    d.mkdir()
    for i, name in enumerate(["a.png", "a.jpg", "a_png.gif", "b.png"]):
        _image(d / "x.png", seed=i)
        Image.open(d / "x.png").save(d / name)
    os.remove(d / "x.png")
    code, stdout, err = _run([d, *FLAGS, "--outdir", out], capsys)
    assert code == 0, err
    expected = {"a.jpg": "a.jpg", "a.png": "a.png", "a_png.gif": "a_png", "b.png": "b"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [os.path.basename(r["input"]) for r in manifest["files"]] == sorted(expected)
    for r in manifest["files"]:
        stem = expected[os.path.basename(r["input"])]
        assert r["outputs"] == [f"{stem}_edges.png", stem + SAMPLE], r
        assert Image.open(out / r["outputs"][1]).text["source"] == r["input"]
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 8
    # the rule itself: repeated until unique; bytes that are not UTF-8 and controls as %XX
    assert outputs.stems(["a.png", "a.jpg", "a.png.gif"]) == ["a.png", "a.jpg", "a.png.gif"]
    assert outputs.stems(["d/x.png", "e/y.png"]) == ["x", "y"]
    assert outputs.safe_name("caf\udce9\n\x1b") == "caf%E9%0A%1B"


def test_two_inputs_writing_one_file_refused(tmp_path):
    with pytest.raises(outputs.OutputError, match="two inputs would write the same output file: "
                                                  "x_edges.png; rename one of them"):
        outputs.check_plan({str(tmp_path / "x_edges.png"): "a", str(tmp_path / "X_edges.png"): "b",
                            os.path.join(str(tmp_path), ".", "x_edges.png"): "c"},
                           ["a", "b", "c"], str(tmp_path))


def test_second_run_with_other_settings_refuses_unless_overwrite(tmp_path, capsys):
    d, out = tmp_path / "d", tmp_path / "out"
    d.mkdir()
    _image(d / "a.png")
    _image(d / "b.png", seed=1)
    assert _run([d, *FLAGS, "--outdir", out, "--prompt", "one"], capsys)[0] == 0
    before = _files(out)
    code, _, err = _run([d, *FLAGS, "--outdir", out, "--prompt", "two"], capsys)
    line = _last_error(err)
    assert code == 1 and "5 file(s) exist and would be overwritten: a_edges.png, a" + SAMPLE \
        in line and "--overwrite" in line, line
    assert "model ready" not in err and _files(out) == before
    code, _, err = _run([d, *FLAGS, "--outdir", out, "--prompt", "two", "--overwrite"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["prompt"] == "two" and manifest["resumed"] == []
    assert Image.open(out / ("b" + SAMPLE)).text["prompt"] == "two"


def test_same_settings_over_another_folder_is_no_resume(tmp_path, capsys):
    out = tmp_path / "out"
    for i, name in enumerate(["d1", "d2"]):
        (tmp_path / name).mkdir()
        _image(tmp_path / name / "a.png", seed=i)
    assert _run([tmp_path / "d1", *FLAGS, "--outdir", out], capsys)[0] == 0
    before = _files(out)
    code, _, err = _run([tmp_path / "d2", *FLAGS, "--outdir", out], capsys)
    assert code == 1 and "3 file(s) exist and would be overwritten" in _last_error(err)
    assert _files(out) == before


def test_a_second_run_into_the_same_outdir_at_once_is_refused(many, tmp_path, capsys):
    out = tmp_path / "out"
    first = _cli(str(many), *FLAGS, "--ddim-steps", "12", "--outdir", str(out))
    try:
        deadline = time.monotonic() + 240
        while not _recorded(out):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        code, _, err = _run([many / "f0.png", *FLAGS, "--outdir", out, "--overwrite"], capsys)
        line = _last_error(err)
        assert code == 1 and f"another canny2image run (pid {first.pid} on " in line, line
    finally:
        first.kill()
        first.communicate()


def test_single_run_refuses_a_users_file_and_redoes_its_own(tmp_path, capsys):
    image, out = tmp_path / "p.png", tmp_path / "out"
    _image(image)
    out.mkdir()
    _image(out / "p_edges.png", seed=3)                        # someone else's file
    user = (out / "p_edges.png").read_bytes()
    code, _, err = _run([image, *FLAGS, "--outdir", out], capsys)
    line = _last_error(err)
    assert code == 1 and "1 file(s) exist and would be overwritten: p_edges.png" in line, line
    assert (out / "p_edges.png").read_bytes() == user and os.listdir(out) == ["p_edges.png"]
    os.remove(out / "p_edges.png")
    assert _run([image, *FLAGS, "--outdir", out], capsys)[0] == 0
    assert _run([image, *FLAGS, "--outdir", out], capsys)[0] == 0       # same settings: redone
    code, _, err = _run([image, *FLAGS, "--outdir", out, "--prompt", "x"], capsys)
    assert code == 1 and "p_edges.png" in _last_error(err)
    assert _run([image, *FLAGS, "--outdir", out, "--prompt", "x", "--overwrite"], capsys)[0] == 0
    assert Image.open(out / "p_edges.png").text["prompt"] == "x"


# --- atomic writes, interrupts, resume ---------------------------------------------------------

@pytest.fixture
def many(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(8):
        _image(d / f"f{i}.png", seed=i)
    return d


def _interrupt(many, out, sig, steps="12"):
    """Start a folder job, send `sig` once its manifest records a finished input: the exit
    status, stderr, argv."""
    argv = [str(many), *FLAGS, "--ddim-steps", steps, "--outdir", str(out)]
    proc = _cli(*argv)
    deadline = time.monotonic() + 240
    while not _recorded(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr.decode(), argv


def _recorded(out):
    try:
        return any(r["outputs"] for r in json.loads((out / "manifest.json").read_text())["files"])
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                       (signal.SIGKILL, -9)])
def test_interrupted_job_leaves_complete_files_and_resumes(many, tmp_path, sig, code):
    out = tmp_path / "out"
    got, err, argv = _interrupt(many, out, sig)
    assert got == code, err
    assert "Traceback" not in err
    for name in os.listdir(out):          # every PNG under its final name is complete
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                image.load()
    if sig != signal.SIGKILL:                # and no temporary is left (SIGKILL: the restart
        _valid_pngs(out)                     # removes them, checked below)
        assert "run the same command again to go on" in err.strip().splitlines()[-1]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] is False and manifest["inputs"] == 8
        done = [r for r in manifest["files"] if r["error"] is None]
        assert done and all((out / f).is_file() for r in done for f in r["outputs"])
    proc = _cli(*argv[:-4], "--ddim-steps", "1", "--outdir", str(out))   # other steps: no resume
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1 and b"would be overwritten" in stderr
    proc = _cli(*argv)                                                    # the same command
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    if sig != signal.SIGKILL:
        assert b"resuming: " in stderr and b"files already done" in stderr, stderr
    _valid_pngs(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["failed"] == 0 and manifest["inputs"] == 8
    assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 16


def test_full_disk_names_the_file_and_leaves_nothing_partial(many, tmp_path, capsys, monkeypatch):
    real = outputs.png_writer
    calls = []

    def filling(image, text):
        write = real(image, text)

        def partial(f):
            calls.append(1)
            if len(calls) == 4:                        # the second input's sample
                f.write(b"\x89PNG\r\n")
                raise OSError(errno.ENOSPC, "No space left on device")
            write(f)
        return partial

    monkeypatch.setattr(outputs, "png_writer", filling)
    out = tmp_path / "out"
    code, _, err = _run([many, *FLAGS, "--outdir", out], capsys)
    line = _last_error(err)
    assert code == 1 and line == (f"canny2image: error: cannot write {out / ('f1' + SAMPLE)}: "
                                  f"No space left on device (the disk is full)"), line
    assert sorted(os.listdir(out)) == ["f0" + SAMPLE, "f0_edges.png", "manifest.json"]
    _valid_pngs(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["outputs"] for r in manifest["files"]] == [["f0_edges.png", "f0" + SAMPLE], []]
    assert "No space left on device" in manifest["files"][1]["error"]
    assert manifest["complete"] is False
    # single run: nothing at all
    calls.clear()
    calls.extend([1, 1])
    single = tmp_path / "single"
    code, _, err = _run([many / "f3.png", *FLAGS, "--outdir", single], capsys)
    assert code == 1 and "f3" + SAMPLE in _last_error(err) and os.listdir(single) == []


def test_name_too_long_refused_up_front_single_and_recorded_in_a_folder(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    long = "x" * 230 + ".png"                   # 230 + "_0_seed12345_random-weights.png" > 255
    _image(d / long)
    _image(d / "ok.png")
    code, _, err = _run([d / long, *FLAGS, "--outdir", tmp_path / "o1"], capsys)
    line = _last_error(err)
    assert code == 1 and "output name too long for the filesystem (261 bytes, at most 255)" \
        in line and "model ready" not in err, line
    assert os.listdir(tmp_path / "o1") == []
    code, _, err = _run([d, *FLAGS, "--outdir", tmp_path / "o2"], capsys)
    assert code == 1 and "1 of 2 files failed" in _last_error(err)
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert "output name too long" in manifest["files"][1]["error"]
    assert sorted(os.listdir(tmp_path / "o2")) == ["manifest.json", "ok" + SAMPLE, "ok_edges.png"]


# --- no hangs ----------------------------------------------------------------------------------

def test_folder_with_fifo_socket_device_folder_and_loop_skips_them_unopened(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    _image(d / "a.png")
    os.mkfifo(d / "b.png")
    (d / "c.png").mkdir()
    os.symlink("/dev/zero", d / "e.png")
    os.symlink(d / "f.png", d / "f.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(d / "g.png"))
        start = time.monotonic()
        code, out, err = _run([d, *FLAGS, "--outdir", tmp_path / "out"], capsys)
    assert time.monotonic() - start < 120 and code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {os.path.basename(s["input"]): s["reason"] for s in manifest["skipped"]}
    assert reasons == {"b.png": "a FIFO (named pipe), not an image file",
                       "c.png": "a directory, not an image file",
                       "e.png": "a character device, not an image file",
                       "f.png": "a symbolic link loop, not an image file",
                       "g.png": "a socket, not an image file"}
    assert f"canny2image: skipped {d / 'b.png'}: a FIFO (named pipe), not an image file" in err
    assert manifest["inputs"] == 1 and manifest["failed"] == 0



def test_rendezvous_timeout_names_the_ranks_that_never_came(many, tmp_path):
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    proc = _cli(str(many), *FLAGS, "--outdir", str(tmp_path / "out"), "--rendezvous-timeout",
                "3", env=env)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert time.monotonic() - start < 60 and proc.returncode == 1
    assert _last_error(err) == ("canny2image: error: rank(s) 1, 2 of 3 never came within "
                                "--rendezvous-timeout 3 s: start the same command on every "
                                "machine (torchrun --nnodes, --nproc-per-node)"), err
    proc = _cli(str(many), *FLAGS, "--outdir", str(tmp_path / "out"), "--rendezvous-timeout",
                "3", env={**env, "RANK": "1"})                         # rank 0 never comes
    _, err = proc.communicate(timeout=120)
    line = _last_error(err.decode())
    assert proc.returncode == 1 and "rank 1 on " in line and "--rendezvous-timeout 3 s" in line


# --- names in any encoding ---------------------------------------------------------------------

def test_non_utf8_and_control_character_names_and_prompt(tmp_path):
    d, out = tmp_path / "d", tmp_path / "out"
    d.mkdir()
    raw = os.fsencode(str(d)) + b"/caf\xe9.png"                # Latin-1 bytes: not UTF-8
    _image(raw)
    _image(d / "evil\x1b[31mred\nline.png", seed=1)
    prompt = os.fsdecode(b"a house \xff")
    for argv in ([str(d)], [os.fsdecode(raw)]):
        target = out / str(len(argv[0]))
        proc = _cli(*argv, *FLAGS, "--prompt", prompt, "--outdir", str(target),
                    env={"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""})
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        assert b"Traceback" not in stderr and b"\x1b" not in stdout + stderr
        assert b"caf\\xe9.png" in stderr
        names = sorted(os.listdir(target))
        assert "caf%E9_edges.png" in names and "caf%E9" + SAMPLE in names, names
        sample = Image.open(target / ("caf%E9" + SAMPLE))
        assert sample.text["prompt"] == "a house \\xff"
        assert sample.text["source"].endswith("caf\\xe9.png")
    assert "evil%1B[31mred%0Aline_edges.png" in names_of(out / str(len(str(d))))
    manifest = json.loads((out / str(len(str(d))) / "manifest.json").read_text())
    assert [os.path.basename(r["input"]) for r in manifest["files"]] == [
        "caf\\xe9.png", "evil\x1b[31mred\nline.png"]
    assert manifest["settings"]["prompt"] == "a house \\xff"


def names_of(folder):
    return sorted(os.listdir(folder))


def test_shown_escapes_what_a_terminal_would_act_on():
    assert outputs.shown("a\x1b[2Jb\nc\r\t\u202e\udce9") == "a\\x1b[2Jb\\nc\\r\\t\\u202e\\xe9"
    assert outputs.shown("plain café 东京") == "plain café 东京"
    assert outputs.storable("x\udcff\n") == "x\\xff\n"


# --- messages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, expected", [("device", "a character device, not an image file"),
                                            ("loop", "a symbolic link loop, not an image file")])
def test_input_that_is_not_a_file_is_named(kind, expected, tmp_path, capsys):
    path = tmp_path / "in.png"
    os.symlink("/dev/zero" if kind == "device" else path, path)
    code, _, err = _run([path, *FLAGS, "--outdir", tmp_path / "o"], capsys)
    line = _last_error(err)
    assert code == 1 and expected in line and "not found" not in line, line
