"""Every vendor / runtime difference the kernels care about, in one place, cached.

What lives here and nowhere else:
* what we run on: NVIDIA (CUDA), AMD (HIP: RDNA wave32 or CDNA wave64), or the Triton CPU
  interpreter (TRITON_INTERPRET=1, used by CPU CI);
* the launch configurations (block sizes, num_warps, num_stages, AMD's waves_per_eu) per kernel
  family, as two separate, honest tables: CUDA values are chosen for H100 (sm_90); HIP values are
  chosen for gfx1100 (RDNA3, wave32, 96 CUs, WMMA) by construction and are unmeasured.

Rules followed: no string compares of version numbers, no Triton internals. `waves_per_eu` is a
launch option of Triton's AMD backend (every release 3.0-3.9 has it); Triton's CUDA backend rejects
unknown launch options (KeyError), so it is only ever passed when `is_hip()`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = [
    "triton_available", "is_interpreter", "is_hip", "gpu_available", "arch", "warp_size",
    "max_num_warps", "num_sms", "kernels_usable", "launch_options", "config",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def is_interpreter() -> bool:
    # Triton reads the variable when @triton.jit decorates; caching it keeps launchers consistent
    # with how the kernels were built.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def arch() -> str:
    """'sm_90', 'gfx1100', ... ; 'interpreter' in the CPU interpreter; 'cpu' with nothing."""
    if is_interpreter():
        return "interpreter"
    if not gpu_available():
        return "cpu"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if is_hip():
        return getattr(props, "gcnArchName", "gfx").split(":")[0]
    return f"sm_{props.major}{props.minor}"


@functools.lru_cache(maxsize=None)
def warp_size() -> int:
    """32 on NVIDIA and RDNA (gfx10/11/12), 64 on CDNA (gfx9xx)."""
    if is_interpreter() or not gpu_available():
        return 32
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    ws = getattr(props, "warp_size", None)  # torch >= 2.3 reports it on both vendors
    if ws:
        return int(ws)
    return 64 if (is_hip() and arch().startswith("gfx9")) else 32


@functools.lru_cache(maxsize=None)
def max_num_warps() -> int:
    # A workgroup holds at most 1024 threads on both vendors: 32 warps of 32, 16 wavefronts of 64.
    return 1024 // warp_size()


@functools.lru_cache(maxsize=None)
def num_sms() -> int:
    if is_interpreter() or not gpu_available():
        return 4  # only used to size grids; keeps interpreted grids small
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@functools.lru_cache(maxsize=None)
def kernels_usable() -> tuple[bool, str]:
    """(usable, reason). Kernels run on GPU tensors, or on CPU tensors in the interpreter."""
    if not triton_available():
        return False, "triton is not installed"
    if is_interpreter():
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors"
    if not gpu_available():
        return False, "no GPU and not in the Triton interpreter (set TRITON_INTERPRET=1 for CPU)"
    return True, f"GPU {arch()}"


def kernel_device_ok(t: torch.Tensor) -> bool:
    """Is this tensor on a device our kernels can run on right now?"""
    return (t.device.type == "cpu") if is_interpreter() else (t.device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# Launch configurations. Keys are kernel families; values are plain dicts. Block sizes that are
# shape-dependent are chosen in the kernel's launcher from these knobs.
# CUDA: tuned for H100 (sm_90, 132 SMs, 228 KB smem/SM). num_stages > 1 lets Triton pipeline the
# K/V loads of the attention loop with cp.async / TMA-less loads.
_CUDA = {
    # head-dim split slices (kernels/attention.py): off, miscompiled on H100 + Triton 3.6 in fp16
    "attention_split_head_dim": False,
    # attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head-dim bucket.
    "attention": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        256: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    },
    # cross-attention over <= 128 keys: one or two K/V tiles, nothing to pipeline.
    "attention_short_kv": {
        64: dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1),
    },
    # group norm: groups up to ONE_PASS_MAX elements are held in registers by one program
    # (one read, one write, one launch); larger groups use the split two-kernel path with
    # ~PROGRAMS_PER_SM programs per SM per kernel so 132 SMs fill even at 64 groups.
    "group_norm": dict(ONE_PASS_MAX=16384, BLOCK=2048, PROGRAMS_PER_SM=8, MAX_SPLITS=64,
                       num_warps=8, one_pass_warps=16),
    "layer_norm": dict(ELEMS_PER_PROGRAM=8192, num_warps=8),
    "elementwise": dict(BLOCK=2048, num_warps=8),
}

# HIP: chosen for gfx1100 (RDNA3, wave32, 96 CUs, 64 KB LDS per WGP); unmeasured. RDNA has no
# async-copy pipelining worth >2 stages; 64 KB LDS rules out 3-stage K/V buffers at d 128+;
# waves_per_eu=2 trades occupancy for registers in the attention loop (flash-attn ROCm practice).
_HIP = {
    "attention_split_head_dim": False,  # unvalidated there: the padded layout is the safe one
    "attention": {
        64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, waves_per_eu=2),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, waves_per_eu=2),
        256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, waves_per_eu=1),
    },
    "attention_short_kv": {
        64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, waves_per_eu=2),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1, waves_per_eu=2),
        256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, waves_per_eu=1),
    },
    "group_norm": dict(ONE_PASS_MAX=8192, BLOCK=2048, PROGRAMS_PER_SM=8, MAX_SPLITS=64,
                       num_warps=8, one_pass_warps=16),
    "layer_norm": dict(ELEMS_PER_PROGRAM=4096, num_warps=8),
    "elementwise": dict(BLOCK=2048, num_warps=8),
}

# Interpreter: every program runs serially in numpy, so fewer, smaller programs are faster;
# num_warps/num_stages are ignored there but kept valid.
_INTERP = {
    "attention_split_head_dim": True,
    "attention": {b: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1) for b in (64, 128, 256)},
    "attention_short_kv": {b: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
                           for b in (64, 128, 256)},
    "group_norm": dict(ONE_PASS_MAX=4096, BLOCK=2048, PROGRAMS_PER_SM=2, MAX_SPLITS=64,
                       num_warps=4, one_pass_warps=4),
    "layer_norm": dict(ELEMS_PER_PROGRAM=4096, num_warps=4),
    "elementwise": dict(BLOCK=4096, num_warps=4),
}


def _table() -> dict:
    if is_interpreter():
        return _INTERP
    return _HIP if is_hip() else _CUDA


def config(family: str, key=None):
    """A copy of the configuration dict for a kernel family (and key, e.g. a head-dim bucket)."""
    entry = _table()[family]
    if key is not None:
        entry = entry[key]
    return dict(entry) if isinstance(entry, dict) else entry


def launch_options(cfg: dict) -> dict:
    """The subset of a config dict that goes to `kernel[grid](..., **options)`.

    num_warps is capped by the workgroup limit of the device; waves_per_eu only on HIP.
    """
    opts = {"num_warps": min(int(cfg.get("num_warps", 4)), max_num_warps())}
    if "num_stages" in cfg:
        opts["num_stages"] = int(cfg["num_stages"])
    if is_hip() and not is_interpreter() and "waves_per_eu" in cfg:
        opts["waves_per_eu"] = int(cfg["waves_per_eu"])
    return opts


# ---------------------------------------------------------------------------------------------
# Device guard. Triton launches on the *current* CUDA/HIP device, not on the device of the
# tensors it is given, so a model on cuda:1 with the current device left at 0 would launch its
# kernels on the wrong GPU (an illegal address, or the launcher's device check falling back).


def _cuda_index_of(args, kwargs):
    """The CUDA device index of the first tensor argument, or None (not a CUDA tensor, or none)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.get_device() if a.is_cuda else None
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return a.get_device() if a.is_cuda else None
    return None


def on_input_device(fn):
    """`fn` wrapped to run under the CUDA device of its first tensor argument, when that is not
    the current device. The common case (already current, or a CPU tensor in the interpreter)
    costs a scan for the first tensor and, on CUDA, one current_device() call: about 1 us a call
    on this project's CPU machine, nothing inside a replayed CUDA graph."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        index = _cuda_index_of(args, kwargs)
        if index is None or index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return call
