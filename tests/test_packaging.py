"""The project as a user installs it: a wheel built from the source tree (not an editable install),
installed with `pip install --target` into a throwaway folder, and every entry point run from a
temporary folder outside the repository with only that folder on PYTHONPATH (the dependencies
come from the environment) — so nothing here can pass because the repository root happens to be
on sys.path, as it is for every other test.

Covered: `import config, share, runtime.cli, kernels, cldm.model` (upstream-style scripts'
`import config` / `from share import *`, and the runtime's config.save_memory); the model configs
found inside the installed package; the installed `canny2image` on an image and on a folder of two;
the installed demo (`canny2image-demo`) serving its page and answering one API request; and,
marked `gpu`, the installed `canny2image` in fast mode on the GPU.

PACKAGING_TEST_SOURCE=/path/to/another/checkout runs the same tests against that tree's packaging
(e.g. an older commit's, to see them fail).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from scripts.check_outputs import check as check_announced
from tests.conftest import REPO, free_port

SOURCE = os.path.abspath(os.environ.get("PACKAGING_TEST_SOURCE", REPO))
# What a source tree may hold that is no part of the package (and can be huge: a venv, weights).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                    "outputs", ".pytest_cache", ".whl", ".wheels", ".dev_*",
                                    "*.pth", "*.ckpt", "*.safetensors")
MODULES = ("config", "share", "runtime.cli", "kernels", "cldm.model", "ldm.util", "annotator.util",
           "gradio_canny2image")


def _outside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) != folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target folder, environment, working folder): the built wheel installed into `target`."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(SOURCE, source, ignore=NOT_SOURCE)   # the build writes into its tree
    wheels, target, work = root / "wheels", root / "site", root / "work"
    work.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout}\n{build.stderr}"
    (wheel,) = wheels.glob("*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
         str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    # Only the target, plus whatever the environment itself puts on PYTHONPATH (a GPU machine's
    # extra packages) that is not the repository or the source tree.
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and _outside(p, REPO) and _outside(p, SOURCE)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target)] + extra),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CANNY2IMAGE_DEBUG", None)
    return str(target), env, str(work)


def _run(installed, argv, timeout=600):
    target, env, work = installed
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _program(installed, name):
    path = os.path.join(installed[0], "bin", name)
    assert os.path.isfile(path), f"the wheel installs no `{name}` command"
    return path


def _python(installed, code):
    result = _run(installed, [sys.executable, "-c", code], timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _picture(path, seed=0, size=(96, 80)):
    rng = np.random.default_rng(seed)
    rgb = np.full((size[1], size[0], 3), 30, np.uint8)
    rgb[20:60, 16:80] = rng.integers(120, 256, size=(40, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


def test_modules_and_configs_come_from_the_installed_wheel(installed):
    target = installed[0]
    files = json.loads(_python(installed, (
        "import importlib, json, sys\n"
        f"names = {MODULES!r}\n"
        "files = {n: importlib.import_module(n).__file__ for n in names}\n"
        "from runtime.inputs import CONFIG_FULL, CONFIG_TINY\n"
        "files['CONFIG_FULL'], files['CONFIG_TINY'] = CONFIG_FULL, CONFIG_TINY\n"
        "files['sys.path'] = sys.path\n"
        "print(json.dumps(files))\n")))
    search_path = files.pop("sys.path")
    # The environment's own folders may sit inside the checkout (./.venv is the README's), and
    # the editable install's path-hook marker is no folder; no folder of the repository itself
    # may be on the path (the modules' files below must come from the wheel either way).
    inside = [p for p in search_path if os.path.isabs(p)
              and not _outside(p, REPO) and _outside(p, sys.prefix)]
    assert not inside, f"the repository is on sys.path: {inside}"
    for name, path in files.items():
        assert not _outside(path, target), f"{name} comes from {path}, not from the wheel"
    assert os.path.isfile(files["CONFIG_FULL"]) and os.path.isfile(files["CONFIG_TINY"])


def test_upstream_style_config_and_share(installed):
    """An upstream-style script: `import config`, `config.save_memory = True`, `from share import
    *` (sliced attention), then the model from the installed config: the runtime sees the switch."""
    out = _python(installed, (
        "import config\n"
        "config.save_memory = True\n"
        "from share import *\n"
        "from cldm.hack import sliced_attention_enabled\n"
        "from cldm.model import create_model\n"
        "from runtime import lowvram\n"
        "from runtime.inputs import CONFIG_TINY\n"
        "model = create_model(CONFIG_TINY)\n"
        "print(sliced_attention_enabled(), lowvram.enabled(), type(model).__name__)\n"))
    assert out.split() == ["True", "True", "ControlLDM"]


def test_installed_canny2image_on_an_image(installed, tmp_path):
    image = _picture(tmp_path / "box.png")
    outdir = tmp_path / "out"
    result = _run(installed, [_program(installed, "canny2image"), image, "--tiny",
                              "--random-weights", "--ddim-steps", "2", "--outdir", str(outdir)])
    assert result.returncode == 0, result.stderr
    written = check_announced(result.stdout)
    assert sorted(os.path.basename(p) for p in written) == [
        "box_0_seed12345_random-weights.png", "box_edges.png"]
    assert all(os.path.dirname(p) == str(outdir) for p in written)


def test_installed_folder_job_on_two_images(installed, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _picture(folder / "a.png", seed=1)
    _picture(folder / "b.png", seed=2)
    outdir = tmp_path / "out"
    result = _run(installed, [_program(installed, "canny2image"), str(folder), "--tiny",
                              "--ddim-steps", "2", "--image-resolution", "64", "--quiet",
                              "--outdir", str(outdir)])
    assert result.returncode == 0, result.stderr
    assert len(check_announced(result.stdout)) == 4
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert [os.path.basename(f["input"]) for f in manifest["files"]] == ["a.png", "b.png"]
    assert all(f["error"] is None and len(f["outputs"]) == 2 for f in manifest["files"])



def test_installed_demo_names_itself_in_its_errors(installed):
    """A bad flag: one error line that names the command the user typed."""
    result = _run(installed, [_program(installed, "canny2image-demo"), "--port", "0"])
    assert result.returncode == 2
    assert result.stderr.startswith("canny2image-demo: error: argument --port: invalid port '0'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_installed_demo_serves_and_answers(installed, tmp_path):
    import httpx
    from gradio_client import Client, handle_file

    target, env, work = installed
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(tmp_path / "demo.log", "w+")
    demo = subprocess.Popen([_program(installed, "canny2image-demo"), "--tiny", "--no-warmup",
                             "--port", str(port)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        page, deadline = None, time.monotonic() + 240
        while page is None and time.monotonic() < deadline and demo.poll() is None:
            try:
                response = httpx.get(url, timeout=5)
                if response.status_code == 200:
                    page = response.text
            except httpx.HTTPError:
                time.sleep(1)
        log.seek(0)
        assert page is not None, f"the demo did not serve {url} (exit {demo.poll()}):\n{log.read()}"
        assert "ControlNet canny2image" in page
        result = Client(url, verbose=False).predict(
            handle_file(_picture(tmp_path / "in.png")), "a box", "best quality", "lowres", 1, 256,
            1, False, 1.0, 9.0, 7, 0.0, 100, 200, api_name="/process")
        images = [Image.open(item["image"]) for item in result]
        assert len(images) == 2 and all(im.size == (320, 256) for im in images)
        for im in images:
            im.load()
    finally:
        demo.terminate()
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        log.close()


@pytest.mark.gpu
def test_installed_canny2image_fast_mode_on_the_gpu(installed, tmp_path):
    """The README's main job as installed, on the GPU: the full-size model (random weights) in
    fast mode at upstream's defaults (512 px, 20 steps), with an empty Triton cache: the command
    compiles its kernels in the child it spawned before its imports (runtime/early.py)."""
    outdir = tmp_path / "out"
    target, env, work = installed
    result = subprocess.run([_program(installed, "canny2image"), "--random-weights", "--mode",
                             "fast", "--outdir", str(outdir)], cwd=work, capture_output=True,
                            text=True, timeout=900,
                            env=dict(env, TRITON_CACHE_DIR=str(tmp_path / "triton")))
    assert result.returncode == 0, result.stderr
    assert "kernels compiled" in result.stderr + result.stdout
    assert "(spawned before the imports)" in result.stderr + result.stdout
    written = check_announced(result.stdout)
    assert len(written) == 2
    sample = Image.open(next(p for p in written if "_seed" in p))
    assert sample.text["mode"] == "fast" and sample.size == (704, 512)   # 640x480 at 512 px


def test_the_output_checker_fails_on_what_it_must_catch(tmp_path):
    """scripts/check_outputs.py (what .ci/run trusts): good files pass; a missing file, a
    truncated PNG, a count that does not match and a last line that is not the CLI's all fail."""
    from scripts.check_outputs import CheckError
    good = _picture(tmp_path / "a_edges.png")
    broken = tmp_path / "a_0_seed1.png"
    broken.write_bytes(open(good, "rb").read()[:-40])
    line = f"canny2image: wrote {{}} PNGs to {tmp_path}: {{}} (RANDOM WEIGHTS: the images are noise)"
    assert check_announced("progress\n" + line.format(1, "a_edges.png") + "\n") == [good]
    for text in (line.format(2, "a_edges.png, a_0_seed1.png"),      # truncated PNG
                 line.format(2, "a_edges.png, missing.png"),        # no such file
                 line.format(2, "a_edges.png"),                     # count does not match
                 line.format(0, ""),
                 line.format(1, "a_edges.png") + "\nTraceback (most recent call last):",
                 ""):
        with pytest.raises(CheckError):
            check_announced(text)
