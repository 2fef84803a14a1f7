"""Checkpoint loading (cldm/model.py, runtime.weights.build_model): round trips in every format
upstream reads, and a clear CheckpointError for every way a file can be wrong. No pickle code runs."""
import gc
import hashlib
import os

import pytest
import safetensors.torch
import torch

from cldm.model import (
    CLIP_2023_PREFIX,
    CLIP_TF5_PREFIX,
    POSITION_IDS,
    CheckpointError,
    create_model,
    get_state_dict,
    load_checkpoint,
    load_state_dict,
)
from conftest import FULL_CONFIG, TINY_CONFIG, big_file_folder
from runtime.weights import build_model


class RunsShellCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def tiny_state_dict():
    model = build_model(TINY_CONFIG, random_weights=True, seed=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def tiny_model():
    return create_model(TINY_CONFIG)


def assert_same_tensors(model, state_dict):
    loaded = model.state_dict()
    assert list(loaded) == list(state_dict)
    for k, v in state_dict.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_get_state_dict_unwraps_one_level():
    inner = {"a": torch.ones(1)}
    assert get_state_dict({"state_dict": inner}) is inner
    assert get_state_dict(inner) is inner


@pytest.mark.parametrize("name, wrap", [
    ("ckpt.safetensors", False),
    ("CKPT.SafeTensors", False),
    ("ckpt.pth", False),
    ("ckpt.ckpt", True),                 # Lightning-style {'state_dict': ...}
])
def test_tiny_round_trip(tmp_path, tiny_state_dict, tiny_model, name, wrap):
    path = str(tmp_path / name)
    if name.lower().endswith(".safetensors"):
        safetensors.torch.save_file(tiny_state_dict, path)
    else:
        torch.save({"state_dict": tiny_state_dict, "epoch": 3} if wrap else tiny_state_dict, path)
    assert_same_tensors(load_checkpoint(tiny_model, path), tiny_state_dict)


def test_torch_file_is_unwrapped_twice(tmp_path, tiny_state_dict):
    path = str(tmp_path / "nested.pth")
    torch.save({"state_dict": {"state_dict": tiny_state_dict}}, path)
    assert list(load_state_dict(path)) == list(tiny_state_dict)


def test_build_model_from_checkpoint_on_meta_parameters(tmp_path, tiny_state_dict):
    path = str(tmp_path / "tiny.safetensors")
    safetensors.torch.save_file(tiny_state_dict, path)
    model = build_model(TINY_CONFIG, ckpt=path)
    assert model.random_weights is False and not model.training
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert_same_tensors(model, tiny_state_dict)
    with pytest.raises(ValueError):
        build_model(TINY_CONFIG, ckpt=path, random_weights=True)


def test_transformers5_clip_layout_and_missing_position_ids(tmp_path, tiny_state_dict, tiny_model):
    """transformers 5 drops `text_model.` and position_ids from CLIP's keys: mapped and filled."""
    renamed = {(CLIP_TF5_PREFIX + k[len(CLIP_2023_PREFIX):] if k.startswith(CLIP_2023_PREFIX)
                else k): v for k, v in tiny_state_dict.items() if k != POSITION_IDS}
    assert not any(k.startswith(CLIP_2023_PREFIX) for k in renamed)
    path = str(tmp_path / "tf5.safetensors")
    safetensors.torch.save_file(renamed, path)
    load_checkpoint(tiny_model, path)
    assert_same_tensors(tiny_model, tiny_state_dict)
    assert torch.equal(tiny_model.state_dict()[POSITION_IDS], torch.arange(77)[None])


def test_missing_file_says_what_to_download_and_where(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"control_sd15_canny\.pth.*\./models/") as info:
        load_state_dict(str(tmp_path / "control_sd15_canny.pth"))
    assert "huggingface.co/lllyasviel/ControlNet" in str(info.value)
    monkeypatch.chdir(tmp_path)  # no ./models/control_sd15_canny.pth here
    with pytest.raises(CheckpointError, match=r"control_sd15_canny\.pth[\s\S]*--random-weights"):
        build_model(TINY_CONFIG)


def test_default_checkpoint_found_by_the_command_line_rule(tmp_path, tiny_state_dict,
                                                          monkeypatch):
    """build_model() with neither a checkpoint nor random weights loads the default checkpoint
    that runtime.app.find_checkpoint finds: the .safetensors one too."""
    (tmp_path / "models").mkdir()
    safetensors.torch.save_file(tiny_state_dict,
                                str(tmp_path / "models" / "control_sd15_canny.safetensors"))
    monkeypatch.chdir(tmp_path)
    model = build_model(TINY_CONFIG)
    assert model.random_weights is False
    assert_same_tensors(model, tiny_state_dict)


@pytest.mark.parametrize("name", ["ckpt.pth", "ckpt.safetensors"])
def test_truncated_file(tmp_path, tiny_state_dict, name):
    path = str(tmp_path / name)
    if name.endswith(".safetensors"):
        safetensors.torch.save_file(tiny_state_dict, path)
    else:
        torch.save(tiny_state_dict, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"truncated or corrupted") as info:
        load_state_dict(path)
    assert path in str(info.value)


@pytest.mark.parametrize("name", ["ckpt.pth", "ckpt.ckpt", "ckpt.safetensors"])
@pytest.mark.parametrize("damage", ["random bytes", "empty", "scrambled header"])
def test_corrupted_file(tmp_path, tiny_state_dict, name, damage):
    path = str(tmp_path / name)
    if damage == "random bytes":
        data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        open(path, "wb").write(bytes(data.to(torch.uint8).tolist()))
    elif damage == "empty":
        open(path, "wb").close()
    else:
        if name.endswith(".safetensors"):
            safetensors.torch.save_file(tiny_state_dict, path)
        else:
            torch.save(tiny_state_dict, path)
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"truncated or corrupted") as info:
        load_state_dict(path)
    assert path in str(info.value)


def test_file_without_a_state_dict(tmp_path):
    path = str(tmp_path / "tensor.pth")
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match=r"tensor\.pth holds a Tensor, not a state dict"):
        load_state_dict(path)


def test_pickle_with_code_is_refused_never_run(tmp_path, tiny_state_dict):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": tiny_state_dict, "hook": RunsShellCommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert not marker.exists()
    message = str(info.value)
    for expected in ("evil.ckpt", "system", "arbitrary code", "weights_only=True",
                     "safetensors.torch.save_file", "evil.safetensors"):
        assert expected in message, expected
    # the payload is live: an unsafe load would have run it (proves the check above means something)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _assert_refused(model, path, state_dict, *patterns):
    safetensors.torch.save_file(state_dict, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert_same_tensors(model, before)  # nothing was half-loaded


def test_wrong_shape(tmp_path, tiny_state_dict, tiny_model):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd = dict(tiny_state_dict)
    sd[key] = torch.zeros(7, 4, 3, 3)
    _assert_refused(tiny_model, str(tmp_path / "shape.safetensors"), sd,
                    "1 shape mismatches", key, "[7, 4, 3, 3] in the file", "shape.safetensors")


def test_missing_key(tmp_path, tiny_state_dict, tiny_model):
    key = "control_model.zero_convs.0.0.bias"
    sd = {k: v for k, v in tiny_state_dict.items() if k != key}
    _assert_refused(tiny_model, str(tmp_path / "missing.safetensors"), sd, "1 missing keys", key)


def test_unexpected_key(tmp_path, tiny_state_dict, tiny_model):
    sd = dict(tiny_state_dict, **{"model_ema.decay": torch.tensor(0.999)})
    _assert_refused(tiny_model, str(tmp_path / "extra.safetensors"), sd,
                    "1 unexpected keys", "model_ema.decay")


def _digests(model):
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy()).hexdigest()
            for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_full_size_round_trips(tmp_path):
    """Random full-size weights saved as .safetensors and as a nested .pth load back strictly and
    bit-identically. At most one full-size model and one file's tensors in memory at a time, and
    one 5.7 GB file on disk or in /dev/shm (removed however the test ends)."""
    model = build_model(FULL_CONFIG, random_weights=True, seed=0)
    reference = _digests(model)
    assert len(reference) == 1484
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    folder = big_file_folder(tmp_path, nbytes)
    for name in ("full.safetensors", "full.pth"):
        path = os.path.join(folder, f"test_full_size_round_trips_{os.getpid()}_{name}")
        try:
            if name.endswith(".safetensors"):
                safetensors.torch.save_file(model.state_dict(), path)
            else:
                torch.save({"state_dict": model.state_dict()}, path)
            del model
            gc.collect()
            model = build_model(FULL_CONFIG, ckpt=path)
        finally:
            if os.path.exists(path):
                os.remove(path)
        assert model.random_weights is False and _digests(model) == reference


@pytest.mark.parametrize("name, content", [
    ("text.pth", b"this is a text file\nwith lines\n"),     # gave IndexError: pop from empty list
    ("hello.pth", b"hello world"),                             # gave KeyError 101
    ("hello.ckpt", b"hello world"),
    ("hello.safetensors", b"hello world"),
    ("zeros.pth", b"\0" * 1000),
    ("png.pth", b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
])
def test_junk_files_end_in_checkpoint_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"Could not read checkpoint .*(not a checkpoint|"
                                              r"truncated or corrupted)") as info:
        load_state_dict(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_plain_pickle_of_data_is_not_a_checkpoint(tmp_path):
    import pickle
    path = tmp_path / "plain.pth"
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)
    with pytest.raises(CheckpointError, match="it is not a checkpoint"):
        load_state_dict(str(path))


@pytest.mark.parametrize("how", ["pickle protocol 0", "pickle protocol 2", "pickle protocol 4",
                                 "pickle protocol 5", "torch legacy format", "torch zip format"])
def test_every_pickle_that_wants_to_run_code_is_named(tmp_path, how):
    """Not only torch's zip format: plain pickles (any protocol) and torch's legacy format name
    the object they would call (a plain pickle of a tensor also names torch's
    _load_from_bytes, which unpickles without weights_only), and nothing runs."""
    import pickle
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    obj = {"state_dict": {"w": torch.ones(2)}, "hook": RunsShellCommand(f"touch {marker}")}
    if how.startswith("pickle"):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(how.split()[-1]))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how.endswith("zip format"))
    with pytest.raises(CheckpointError, match=r"Refusing to load .*evil\.pth: its pickle "
                                              r"references Python objects \(.*(posix|nt)\.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_legacy_torch_file_of_tensors_still_loads(tmp_path, tiny_state_dict):
    path = str(tmp_path / "legacy.pth")
    torch.save({"state_dict": tiny_state_dict}, path, _use_new_zipfile_serialization=False)
    loaded = load_state_dict(path)
    assert list(loaded) == list(tiny_state_dict)


def test_no_torch_warning_leaks(tmp_path, recwarn):
    import pickle
    path = tmp_path / "p4.pth"
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=4)       # torch warns "Detected pickle protocol 4"
    with pytest.raises(CheckpointError):
        load_state_dict(str(path))
    assert not [w for w in recwarn if "pickle" in str(w.message).lower()]


def test_mismatch_names_the_config_in_use(tmp_path, tiny_state_dict):
    path = str(tmp_path / "wrong.safetensors")
    sd = {k: v for k, v in tiny_state_dict.items() if "zero_convs.0" not in k}
    safetensors.torch.save_file(sd, path)
    with pytest.raises(CheckpointError, match=r"config matches it \(models/cldm_tiny\.yaml\)"):
        build_model(TINY_CONFIG, ckpt=path)
