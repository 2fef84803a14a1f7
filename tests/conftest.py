import json
import os
import socket

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set before any kernel
# module is imported. Without a GPU every kernel test runs in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "models", "cldm_tiny.yaml")
FULL_CONFIG = os.path.join(REPO, "models", "cldm_v15.yaml")
# The project's reference data (the exact upstream state dict, every hot shape), kept in the repo
# so the suite runs from any checkout (tests/test_self_contained.py checks nothing reads outside).
REFERENCE_DATA = os.path.join(REPO, "tests", "data")


# Model vs independent reference (diffusers, transformers), fp32 on CPU:
# max |ours - reference| <= REFERENCE_REL_TOL * max |reference|.
REFERENCE_REL_TOL = 1e-4


def assert_matches_reference(ours, ref, what, rel_tol=REFERENCE_REL_TOL):
    """Checks `ours` against an independent reference; returns the relative max difference."""
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert torch.isfinite(ours).all(), what
    assert scale > 1e-3, f"{what}: reference output is ~0, the comparison would prove nothing"
    assert diff <= rel_tol * scale, f"{what}: max abs diff {diff:.3g} > {rel_tol} x {scale:.3g}"
    return diff / scale


def big_file_folder(tmp_path, nbytes):
    """A folder with room for a file of `nbytes` (1 GiB to spare): /dev/shm where the memory
    allows the file and a model of its size besides, else `tmp_path`. CI machines have had less
    than 300 MB of free disk, and their disk is shared: where neither has room the test is
    skipped, naming the room it needed."""
    import shutil
    need = nbytes + 2**30
    available = 0
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields.get("MemAvailable", "0 kB").split()[0]) * 1024
    if (os.path.isdir("/dev/shm") and available >= 2 * nbytes + 2 * 2**30
            and shutil.disk_usage("/dev/shm").free >= need):
        return "/dev/shm"
    if shutil.disk_usage(tmp_path).free >= need:
        return str(tmp_path)
    pytest.skip(f"needs {need / 2**30:.1f} GiB free in /dev/shm (and twice that in memory) or "
                f"in {tmp_path} for a full-size checkpoint; neither has it")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a GPU: run `python -m pytest -m gpu` on a GPU machine (README, Tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def gradio_result(url, event_id, timeout):
    """(event, data) of a Gradio API call from its event stream: "complete" or "error"."""
    import httpx
    event = None
    with httpx.stream("GET", url + f"gradio_api/call/process/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("error", "complete"):
                return event, json.loads(line[len("data: "):])
    raise AssertionError("the event stream ended without a result")


def free_port():
    """A TCP port of 127.0.0.1 that is free now (another process may take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_demo(demo):
    """gradio_canny2image.launch(demo) on a free 127.0.0.1 port, in the background: its URL. A
    port that another process took between the probe and the bind is replaced by another."""
    import gradio_canny2image as app
    for attempt in range(5):
        try:
            return app.launch(demo, server_port=free_port(), prevent_thread_lock=True,
                              quiet=True)[1]
        except OSError:
            if attempt == 4:
                raise


@pytest.fixture
def no_decoding(monkeypatch):
    """PIL refuses to decode pixel data (runtime.inputs.read_image decodes with PIL): a check
    that must happen on the header alone."""
    import PIL.ImageFile

    def refuse(*args, **kwargs):
        raise AssertionError("the image was decoded")
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", refuse)
