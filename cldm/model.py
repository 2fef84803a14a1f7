"""Building the model from its config and loading checkpoints (spec §3), safely.

`create_model`, `get_state_dict` and `load_state_dict` behave like upstream's, with two differences
a user can see: pickles are only ever read with `torch.load(weights_only=True)` (a checkpoint that
needs more is refused, never executed), and every failure raises `CheckpointError` with a message
that says which file, what is wrong and what to do. `load_checkpoint` adds a strict load that
reports all mismatches at once and accepts the CLIP key layouts different transformers versions
wrote.
"""
import json
import logging
import os
import pickle
import pickletools
import warnings
import zipfile

import safetensors
import safetensors.torch
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError, host_memory_available, instantiate_from_config, special_file

logger = logging.getLogger(__name__)

CHECKPOINT_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"
DEFAULT_CHECKPOINT = os.path.join(".", "models", "control_sd15_canny.pth")

# CLIP text-model keys: transformers 4.x (the layout of every 2023 checkpoint) nests them under
# `text_model.`; transformers 5.x registers the same tensors one level up.
CLIP_2023_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_TF5_PREFIX = "cond_stage_model.transformer."
POSITION_IDS = CLIP_2023_PREFIX + "embeddings.position_ids"

_CONVERT_SNIPPET = """\
    import torch, safetensors.torch
    sd = torch.load("{path}", map_location="cpu", weights_only=False)  # runs the pickle's code
    sd = sd.get("state_dict", sd)
    sd = {{k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}}
    safetensors.torch.save_file(sd, "{stem}.safetensors")"""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, unsafe to unpickle, or does not fit the model."""


def missing_checkpoint_message(path):
    return (f"Checkpoint not found: {path}. Download control_sd15_canny.pth (5.7 GB) from "
            f"lllyasviel's ControlNet models page on Hugging Face, {CHECKPOINT_URL}, and put it "
            f"in ./models/ (as {DEFAULT_CHECKPOINT}), or pass the path of your copy.")


def get_state_dict(d):
    return d.get("state_dict", d)


def _unsafe_pickle_message(path, references):
    stem = os.path.splitext(path)[0]
    return (
        f"Refusing to load {path}: its pickle references Python objects ({', '.join(references)}) "
        "and unpickling those can execute arbitrary code. Checkpoints are only read with "
        "torch.load(weights_only=True). If you trust where the file comes from, convert it once "
        "to safetensors, then pass the .safetensors file instead:\n"
        + _CONVERT_SNIPPET.format(path=path, stem=stem))


def _torch_load(path, location):
    """torch.load(weights_only=True), every failure a CheckpointError: a pickle that wants to run
    code (or build other objects) is named as such, anything else is a damaged or foreign file."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            # e.g. "Detected pickle protocol 4": noise for a user, kept for the debug log
            warnings.simplefilter("always")
            state = torch.load(path, map_location=torch.device(location), weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:    # a junk file gets IndexError, KeyError, ... from the unpickler
        references = _unsafe_globals(path)
        if references or (isinstance(e, pickle.UnpicklingError) and "global" in str(e).lower()):
            raise CheckpointError(_unsafe_pickle_message(path, references or ["unknown"])) from e
        raise CheckpointError(_damaged_message(path, e)) from e
    for w in caught:
        logger.debug("torch.load(%s): %s", path, w.message)
    return state


def _unsafe_globals(path):
    """The Python objects (module.name) a checkpoint's pickles reference beyond what
    weights_only allows; the pickles are only read, never run. torch answers for its zip format;
    plain pickles and torch's legacy format (a few pickles in a row) are scanned here."""
    try:
        if zipfile.is_zipfile(path):
            return torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = _weights_only_allowed()
        with open(path, "rb") as f:
            return [g for g in dict.fromkeys(_pickle_globals(f)) if g not in allowed]
    except Exception:
        return []


def _weights_only_allowed():
    """module.name of what torch.load(weights_only=True) accepts (torch's list + user additions)."""
    from torch import _weights_only_unpickler
    names = set(_weights_only_unpickler._get_allowed_globals())
    for g in torch.serialization.get_safe_globals():
        g = g[0] if isinstance(g, tuple) else g
        names.add(f"{g.__module__}.{g.__qualname__}")
    return names


def _pickle_globals(f, max_pickles=8):
    """module.name of every GLOBAL / STACK_GLOBAL / INST in the pickles at the start of file f
    (pickletools only decodes opcodes). STACK_GLOBAL takes its two names from the stack: the last
    two strings pushed, directly or from the memo."""
    for _ in range(max_pickles):
        strings, memo = [], {}
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    yield arg.replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    yield f"{strings[-2]}.{strings[-1]}"
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[arg] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                    strings.append(memo[arg])
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(arg)
        except Exception:     # past the last pickle (tensor data) or not a pickle at all
            return


def _damaged_message(path, error):
    if isinstance(error, (RuntimeError, EOFError, OSError, ValueError)) and str(error):
        detail = str(error).split(". ")[0].strip()
    elif isinstance(error, EOFError):
        detail = "the file ends too early" if os.path.getsize(path) else "the file is empty"
    else:                     # IndexError 'pop from empty list' and the like say nothing useful
        detail = "not a PyTorch checkpoint"
    return (f"Could not read checkpoint {path}: it is not a checkpoint, or it is truncated or "
            f"corrupted ({detail}). Download it again (compare its size with {CHECKPOINT_URL}).")


def _unwrap(d, path):
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds a {type(d).__name__}, not a state dict.")
    return get_state_dict(d)


def _not_a_file(path):
    """None when `path` is a regular file this process may read, else what it is instead (one
    phrase). Never opens it: a FIFO would block."""
    try:
        kind = special_file(path)
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        return "permission denied (a folder on its path may not be entered by this user)"
    except OSError as e:
        return f"cannot be reached ({e.strerror or e})"
    if kind is not None:
        return f"{kind}, not a file"
    if not os.access(path, os.R_OK):
        return "permission denied: this user may not read it (check its owner and mode)"
    return None


def check_checkpoint_path(path):
    """CheckpointError in one line unless `path` is a regular, readable file: a missing file gets
    the download instructions, anything else is named for what it is (directory, FIFO, device,
    symbolic link loop, permission denied)."""
    problem = _not_a_file(path)
    if problem == "not found":
        raise CheckpointError(missing_checkpoint_message(path))
    if problem:
        raise CheckpointError(f"Checkpoint {path}: {problem}.")


def _check_location(path, location):
    """The torch.device to load onto, or CheckpointError when it cannot exist here."""
    try:
        device = torch.device(location)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"Cannot load {path} onto {location!r}: not a device ({e}).") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"Cannot load {path} onto {location!r}: no GPU here (CUDA is not "
                              f"available to torch); load it with location='cpu'.")
    return device


def _safetensors_bytes(path):
    """Bytes of tensor data a .safetensors file's header declares (None if the header cannot be
    read: safetensors then says what is wrong)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:
                return None
            header = json.loads(f.read(size))
        return max((int(v["data_offsets"][1]) for k, v in header.items()
                    if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _check_fits(path, device, need):
    """CheckpointError if loading `need` bytes onto `device` cannot fit in its free memory."""
    if device.type == "cpu":
        available = host_memory_available()
    elif device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        return
    if need is not None and available is not None and need > available:
        raise CheckpointError(
            f"Checkpoint {path} holds {need / 1e9:.1f} GB of tensors, more than the "
            f"{available / 1e9:.1f} GB of {device.type.upper()} memory available: it is not a "
            f"canny ControlNet checkpoint (control_sd15_canny.pth holds 5.7 GB), or memory must "
            f"be freed first.")


def check_checkpoint_file(path, location="cpu"):
    """What can be known before reading a checkpoint, as CheckpointError in one line: the path
    is a readable regular file (check_checkpoint_path), `location` is a device that exists here,
    and the tensors (a .safetensors header's total, else the file's size) fit in its free
    memory. Returns the torch.device."""
    check_checkpoint_path(path)
    device = _check_location(path, location)
    if os.path.splitext(path)[1].lower() == ".safetensors":
        _check_fits(path, device, _safetensors_bytes(path))
    else:
        _check_fits(path, device, os.path.getsize(path))
    return device


def load_state_dict(ckpt_path, location="cpu"):
    """The tensors of a `.safetensors`, `.pth` or `.ckpt` file, one level of 'state_dict' unwrapped
    (a torch file's twice, as upstream), on `location`. Before anything is read: the path must be
    a readable regular file, the device must exist, and the tensors must fit in its memory."""
    check_checkpoint_file(ckpt_path, location)
    if os.path.splitext(ckpt_path)[1].lower() == ".safetensors":
        try:
            state_dict = safetensors.torch.load_file(ckpt_path, device=str(location))
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(_damaged_message(ckpt_path, e)) from e
    else:
        state_dict = _unwrap(_torch_load(ckpt_path, location), ckpt_path)
    state_dict = _unwrap(state_dict, ckpt_path)
    logger.info("Loaded state_dict from [%s]", ckpt_path)
    return state_dict


# A model config is a few kB (models/cldm_v15.yaml: 2.4 kB) of a few hundred YAML nodes.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _read_config(config_path):
    """The config as an OmegaConf object, or ConfigError in one line: not a regular file, too
    large, not YAML, or YAML whose aliases expand to more than MAX_CONFIG_NODES nodes (a "billion
    laughs" file: a few hundred bytes that would expand to 10**9 nodes)."""
    problem = _not_a_file(config_path)
    if problem:
        raise ConfigError(f"config {config_path}: {problem}")
    try:
        with open(config_path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config {config_path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {config_path}: over {MAX_CONFIG_BYTES >> 20} MiB, not a model "
                          f"config")
    try:
        text = data.decode("utf-8")
        nodes = _expanded_nodes(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(
                f"config {config_path}: its YAML aliases expand to {nodes:,} nodes (more than "
                f"{MAX_CONFIG_NODES:,}): an alias expansion bomb, not a model config")
        return OmegaConf.create(text)
    except ConfigError:
        raise
    except (UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config {config_path}: not a YAML model config ({detail})") from None


def _expanded_nodes(node, sizes=None, active=None):
    """How many nodes `node` (yaml.compose's graph, aliases shared) has once aliases are expanded,
    computed on the shared graph without expanding it; a recursive alias counts as infinite."""
    sizes = {} if sizes is None else sizes
    active = set() if active is None else active
    if node is None or isinstance(node, yaml.ScalarNode):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        return float("inf")
    active.add(id(node))
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair])
    total = 1 + sum(_expanded_nodes(child, sizes, active) for child in children)
    active.discard(id(node))
    sizes[id(node)] = total
    return total


def create_model(config_path, allow_any_target=False):
    """Instantiate `config.model` from a yaml config, on the CPU (a model whose parameters were
    built on the meta device stays there). A config is data: see ldm.util for the targets it may
    name (`allow_any_target=True` lifts that) and _read_config for the files it may be."""
    config = _read_config(config_path)
    if not isinstance(config, DictConfig) or "model" not in config:
        raise ConfigError(f"config {config_path}: no `model` section")
    model = instantiate_from_config(config.model, allow_any_target=allow_any_target)
    if not any(p.is_meta for p in model.parameters()):
        model = model.cpu()
    logger.info("Loaded model config from [%s]: %s with %.1f M parameters", config_path,
                type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _match_clip_layout(state_dict, expected):
    """Rename CLIP keys between the transformers-4 (`text_model.`) and -5 layouts to the model's."""
    model_nested = any(k.startswith(CLIP_2023_PREFIX) for k in expected)
    ckpt_nested = any(k.startswith(CLIP_2023_PREFIX) for k in state_dict)
    ckpt_has_clip = any(k.startswith(CLIP_TF5_PREFIX) for k in state_dict)
    if not ckpt_has_clip or model_nested == ckpt_nested:
        return state_dict
    old, new = ((CLIP_TF5_PREFIX, CLIP_2023_PREFIX) if model_nested
                else (CLIP_2023_PREFIX, CLIP_TF5_PREFIX))
    logger.info("Mapping the checkpoint's CLIP keys %s* to %s*", old, new)
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in state_dict.items()}


def _shape(value):
    return list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def check_state_dict(model, state_dict, source="checkpoint", config="models/cldm_v15.yaml"):
    """Raise CheckpointError listing missing and unexpected keys and shape mismatches, if any;
    `config` is the model's config, named in the message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: {_shape(state_dict[k])} in the file, {_shape(v)} in the model"
                  for k, v in expected.items() if k in state_dict
                  and _shape(state_dict[k]) != _shape(v)]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
        if items:
            problems.append(f"{len(items)} {name} (e.g. {'; '.join(items[:5])})")
    raise CheckpointError(
        f"{source} does not fit the model ({len(expected)} tensors expected, {len(state_dict)} "
        f"found): " + ", ".join(problems) + ". Check that the checkpoint is an SD1.5 ControlNet "
        f"(control_sd15_*.pth) and that the config matches it ({config}).")


def load_checkpoint(model, path, location="cpu", config="models/cldm_v15.yaml"):
    """Strictly load a checkpoint file into `model` and return the model.

    The CLIP text-model keys may come in either transformers layout; a checkpoint without the
    legacy `position_ids` key gets the model's own (0..76); `config` (the model's) is named if
    the checkpoint does not fit. Parameters still on the meta device
    are replaced by the loaded tensors (cast to the model's dtype) instead of copied into.
    """
    state_dict = load_state_dict(path, location=location)
    expected = model.state_dict()
    state_dict = _match_clip_layout(state_dict, expected)
    if POSITION_IDS in expected and POSITION_IDS not in state_dict:
        state_dict[POSITION_IDS] = expected[POSITION_IDS].clone()
    check_state_dict(model, state_dict, source=f"Checkpoint {path}", config=config)
    assign = any(p.is_meta for p in model.parameters())
    if assign:
        state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model
