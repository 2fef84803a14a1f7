"""Building the model from its config and loading checkpoints (spec §3), safely.

`create_model`, `get_state_dict` and `load_state_dict` behave like upstream's, with two differences
a user can see: pickles are only ever read with `torch.load(weights_only=True)` (a checkpoint that
needs more is refused, never executed), and every failure raises `CheckpointError` with a message
that says which file, what is wrong and what to do. `load_checkpoint` adds a strict load that
reports all mismatches at once and accepts the CLIP key layouts different transformers versions
wrote.
"""
import logging
import os
import pickle

import safetensors
import safetensors.torch
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

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
    try:
        return torch.load(path, map_location=torch.device(location), weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only turns every pickle problem into an UnpicklingError: tell a pickle that
        # carries code (or other objects) apart from a damaged file.
        try:
            references = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            references = []
        if references or "global" in str(e).lower():
            raise CheckpointError(_unsafe_pickle_message(path, references or ["unknown"])) from e
        raise CheckpointError(_damaged_message(path, "not a valid pickle")) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(_damaged_message(path, e)) from e


def _damaged_message(path, error):
    detail = str(error).split(". ")[0].strip() if str(error) else type(error).__name__
    return (f"Could not read checkpoint {path}: the file is truncated or corrupted ({detail}). "
            f"Download it again (compare its size with {CHECKPOINT_URL}).")


def _unwrap(d, path):
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds a {type(d).__name__}, not a state dict.")
    return get_state_dict(d)


def load_state_dict(ckpt_path, location="cpu"):
    """The tensors of a `.safetensors`, `.pth` or `.ckpt` file, one level of 'state_dict' unwrapped
    (a torch file's twice, as upstream), on `location`."""
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(missing_checkpoint_message(ckpt_path))
    extension = os.path.splitext(ckpt_path)[1].lower()
    if extension == ".safetensors":
        try:
            state_dict = safetensors.torch.load_file(ckpt_path, device=str(location))
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(_damaged_message(ckpt_path, e)) from e
    else:
        state_dict = _unwrap(_torch_load(ckpt_path, location), ckpt_path)
    state_dict = _unwrap(state_dict, ckpt_path)
    logger.info("Loaded state_dict from [%s]", ckpt_path)
    return state_dict


def create_model(config_path):
    """Instantiate `config.model` from a yaml config, on the CPU (a model whose parameters were
    built on the meta device stays there)."""
    config = OmegaConf.load(config_path)
    model = instantiate_from_config(config.model)
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


def check_state_dict(model, state_dict, source="checkpoint"):
    """Raise CheckpointError listing missing and unexpected keys and shape mismatches, if any."""
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
        "(control_sd15_*.pth) and that the config matches it (models/cldm_v15.yaml).")


def load_checkpoint(model, path, location="cpu"):
    """Strictly load a checkpoint file into `model` and return the model.

    The CLIP text-model keys may come in either transformers layout; a checkpoint without the
    legacy `position_ids` key gets the model's own (0..76). Parameters still on the meta device
    are replaced by the loaded tensors (cast to the model's dtype) instead of copied into.
    """
    state_dict = load_state_dict(path, location=location)
    expected = model.state_dict()
    state_dict = _match_clip_layout(state_dict, expected)
    if POSITION_IDS in expected and POSITION_IDS not in state_dict:
        state_dict[POSITION_IDS] = expected[POSITION_IDS].clone()
    check_state_dict(model, state_dict, source=f"Checkpoint {path}")
    assign = any(p.is_meta for p in model.parameters())
    if assign:
        state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model
