"""The model with real weights from a checkpoint, or with seeded random weights when there is none.

Random weights let everything run (and be timed) at full size without the 5.7 GB download. They are
drawn per tensor on the CPU from a generator seeded with (seed, parameter name), so they are the
same on every machine and whatever device the model lives on, and they do not depend on the order
in which tensors are visited.

Scheme (chosen so 20 DDIM steps with guidance 9 stay finite at full size):
* Conv/Linear weights N(0, gain²/fan_in), gain 1: variance preserving before the nonlinearity.
* The last layer of every residual branch (and every layer upstream zero-initialises: zero_convs,
  middle_block_out, the hint block's last conv, ResBlock out convs, proj_out, the UNet's out conv)
  gets gain BRANCH_GAIN < 1, so residual streams grow slowly from block to block.
* Norm weights 1 + N(0, 0.1²); all biases and norm shifts N(0, 0.02²); embeddings N(0, 0.02²).
The 13 schedule buffers and CLIP's position_ids are buffers, so they are never touched.
Measured at full size on CPU (latent 16×16, t=951): ControlNet residuals std ≈ 0.3, eps std ≈ 0.17,
20 DDIM steps with guidance 9 end at latents of std ≈ 11 and decode to images in ±3.3. Drawing all
1.43 B values takes ≈ 20 s on 2 busy CPU cores.
"""
import contextlib
import hashlib
import logging
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

import safetensors
import safetensors.torch

from cldm.model import (
    DEFAULT_CHECKPOINT,
    POSITION_IDS,
    CheckpointError,
    _match_clip_layout,
    check_checkpoint_file,
    check_state_dict,
    create_model,
    load_state_dict,
    missing_checkpoint_message,
)
from runtime import lowvram
from runtime.inputs import CONFIG_FULL, REPO

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIG_FULL

RANDOM_WEIGHT_THREADS = min(16, os.cpu_count() or 1)
BRANCH_GAIN = 0.3
NORM_WEIGHT_STD = 0.1
BIAS_STD = 0.02
EMBEDDING_STD = 0.02
_BRANCH_END = re.compile(
    r"(out_layers\.3|proj_out|to_out\.0|ff\.net\.2|\.conv2|\.fc2|out_proj|zero_convs\.\d+\.0"
    r"|middle_block_out\.0|input_hint_block\.14|diffusion_model\.out\.2)$")


def _generator(seed, name):
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _is_norm(module):
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or "norm" in type(module).__name__.lower()


def _mean_std(module_name, module, param_name, shape):
    if _is_norm(module):
        return (1.0, NORM_WEIGHT_STD) if param_name == "weight" else (0.0, BIAS_STD)
    if isinstance(module, nn.Embedding):
        return 0.0, EMBEDDING_STD
    if len(shape) < 2:
        return 0.0, BIAS_STD
    fan_in = shape.numel() // shape[0]
    gain = BRANCH_GAIN if _BRANCH_END.search(module_name) else 1.0
    return 0.0, gain / fan_in ** 0.5


@torch.no_grad()
def random_weights_(model, seed=0, device=None, dtype=None):
    """Give every parameter of `model` seeded random values, in place; buffers stay as they are.

    Parameters still on the meta device are created on `device` (default: CPU; or a function of
    the parameter's name giving its device) in `dtype` (default: theirs); the others keep their
    device and dtype. Values are drawn in float32 whatever the dtype, so a float16 model holds
    the float32 model's values rounded. Sets `model.random_weights = True`, returns the model.
    """
    start = time.perf_counter()
    device_of = device if callable(device) else (lambda name: device or "cpu")

    @torch.no_grad()          # grad mode is per thread: the decorator above covers only this one
    def draw(job):
        module_name, module, param_name, param = job
        name = f"{module_name}.{param_name}" if module_name else param_name
        mean, std = _mean_std(module_name, module, param_name, param.shape)
        on_cpu = param.device.type == "cpu" and param.dtype == torch.float32
        # drawn in float32 on the CPU (straight into the parameter when it lives there)
        values = param if on_cpu else torch.empty(param.shape)
        values.normal_(mean, std, generator=_generator(seed, name))
        if param.is_meta:
            module._parameters[param_name] = nn.Parameter(
                values.to(device=device_of(name), dtype=dtype or param.dtype),
                requires_grad=param.requires_grad)
        elif not on_cpu:
            param.copy_(values)

    jobs = [(module_name, module, param_name, param)
            for module_name, module in model.named_modules()
            for param_name, param in module.named_parameters(recurse=False)]
    # Each tensor has its own generator, so drawing them in parallel gives the same values as in
    # order; normal_ runs on one core per tensor and releases the GIL. At full size that is most
    # of build_model's time (1.43 B values: ~15 s on one core).
    with ThreadPoolExecutor(max_workers=min(RANDOM_WEIGHT_THREADS, len(jobs) or 1)) as pool:
        for _ in pool.map(draw, jobs):
            pass
    model.random_weights = True
    logger.info("Random weights (seed %d) in %.1f s", seed, time.perf_counter() - start)
    return model


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init cost),
    while buffers (the noise schedule, position_ids) are computed for real. The torch.nn.init
    functions skip meta tensors (there are no values to set; normal_ on a meta tensor alone would
    import torch's Python decompositions: seconds at start-up). Not thread-safe: it swaps
    nn.Module.register_parameter and the nn.init functions for the duration."""
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def skipping_meta(init):
        def wrapper(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else init(tensor, *args, **kwargs)
        return wrapper

    inits = {name: getattr(nn.init, name) for name in dir(nn.init)
             if name.endswith("_") and not name.startswith("_")
             and callable(getattr(nn.init, name))}
    nn.Module.register_parameter = register_on_meta
    for name, init in inits.items():
        setattr(nn.init, name, skipping_meta(init))
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        for name, init in inits.items():
            setattr(nn.init, name, init)


def _shown_path(path):
    """`path` relative to the repository when it is inside it (as a user would type it)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if os.path.commonpath([path, REPO]) == REPO else path


def _checkpoint_reader(path):
    """(shapes, get) for a checkpoint file: {key: shape or non-tensor value} and get(key) -> the
    tensor in host memory. A .safetensors file is read one tensor at a time from its memory map
    (never the whole state dict in host memory); so is a zip-format torch file (torch.load with
    mmap=True). Other files, and every file that fails to load, go through cldm.model's
    load_state_dict: whole, with its checks and error messages."""
    check_checkpoint_file(path)     # not a file, unreadable, or more tensors than memory
    if os.path.splitext(path)[1].lower() == ".safetensors" and os.path.isfile(path):
        try:
            handle = safetensors.safe_open(path, framework="pt", device="cpu")
            shapes = {k: torch.Size(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except (safetensors.SafetensorError, OSError):
            load_state_dict(path)        # raises cldm.model's CheckpointError for this file
            raise
        return shapes, handle.get_tensor
    try:
        with warnings.catch_warnings():  # torch's pickle warnings: not for the one-line errors
            warnings.simplefilter("ignore")
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state_dict = state_dict.get("state_dict", state_dict)
        state_dict = state_dict.get("state_dict", state_dict)     # twice, as upstream
    except Exception:
        state_dict = load_state_dict(path, location="cpu")
    if not isinstance(state_dict, dict):
        state_dict = load_state_dict(path, location="cpu")       # raises its CheckpointError
    shapes = {k: v.shape if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    return shapes, state_dict.pop         # pop: host memory is freed as tensors are placed


@torch.no_grad()
def _load_checkpoint(model, path, device_of, dtype, config):
    """Strict load of `path` into a model whose parameters are on the meta device: each tensor
    is read, cast (parameters to `dtype`, buffers keep theirs) and moved to device_of(key) on its
    own, so neither a float32 copy on the device nor (for safetensors) a second copy of the state
    dict in host memory is ever made. Mismatches raise CheckpointError as cldm.model's loader."""
    expected = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    shapes, get = _checkpoint_reader(path)
    file_key = _match_clip_layout({k: k for k in shapes}, expected)     # model key -> file key
    stand_ins = {k: torch.empty(shapes[f], device="meta") if isinstance(shapes[f], torch.Size)
                 else shapes[f] for k, f in file_key.items()}
    if POSITION_IDS in expected and POSITION_IDS not in stand_ins:
        stand_ins[POSITION_IDS] = expected[POSITION_IDS]
    check_state_dict(model, stand_ins, source=f"Checkpoint {path}", config=config)
    loaded = {}
    for key, ref in expected.items():
        value = get(file_key[key]) if key in file_key else ref.clone()
        cast = dtype if key in params and dtype is not None else ref.dtype
        loaded[key] = value.to(device=device_of(key), dtype=cast)
    model.load_state_dict(loaded, strict=True, assign=True)
    logger.info("Loaded state_dict from [%s]", path)
    return model


def build_model(config_path=DEFAULT_CONFIG, ckpt=None, random_weights=False, device="cpu", seed=0,
                dtype=None, host_children=(), on_phase=None):
    """ControlLDM in eval mode on `device`, with the weights of `ckpt` or seeded random weights.

    Neither given: the default checkpoint runtime.app.find_checkpoint finds (models/
    control_sd15_canny.pth or .safetensors, in the working folder or the checkout), else
    CheckpointError.
    `model.random_weights` says which kind of weights the model has.

    The parameters are built on the meta device and each one is created straight on its device
    in `dtype` (default float32): a float16 model never passes through float32 on the GPU.
    Buffers (the noise schedule, CLIP's position_ids) keep their float32/int64. Under low-VRAM
    mode (runtime.lowvram) the UNet and the ControlNet are created in host memory, the way
    low_vram_shift(False) places them, so the whole model is never on the device at once.
    The ControlLDM children named in `host_children` are created in host memory too (fast mode:
    runtime.fast.nets.HOST_BUILT, converted to the device one tensor at a time by the fast runner).
    `on_phase(name)`, if given, is called as each phase ends: "construct" (the modules, parameters
    on the meta device), then "weights" (random or from the checkpoint); benchmarks time them.
    """
    if ckpt is not None and random_weights:
        raise ValueError("pass either a checkpoint or random_weights=True, not both")
    if ckpt is None and not random_weights:
        from runtime.app import find_checkpoint      # the one default-checkpoint rule
        ckpt = find_checkpoint()
        if ckpt is None:
            raise CheckpointError(missing_checkpoint_message(DEFAULT_CHECKPOINT)
                                  + " To try the pipeline without it, pass --random-weights.")
    phase = on_phase or (lambda name: None)
    with parameters_on_meta():
        model = create_model(config_path)
    phase("construct")

    def device_of(name):
        child = name.split(".")[0]
        offloaded = child in host_children or (lowvram.enabled()
                                               and child in lowvram.DIFFUSION_NETWORKS)
        return lowvram.HOST if offloaded else torch.device(device)

    if random_weights:
        random_weights_(model, seed=seed, device=device_of, dtype=dtype)
    else:
        _load_checkpoint(model, ckpt, device_of, dtype, _shown_path(config_path))
        model.random_weights = False
    model = lowvram.place(model, device, host=host_children).eval()
    phase("weights")
    return model
