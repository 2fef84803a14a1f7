"""Every vendor / runtime difference the kernels care about, in one place, cached.

What lives here and nowhere else:
* what we run on: NVIDIA (CUDA), AMD (HIP: RDNA wave32 or CDNA wave64), or the Triton CPU
  interpreter (TRITON_INTERPRET=1, used by CPU CI);
* the launch configurations (block sizes, num_warps, num_stages, AMD's waves_per_eu) per kernel
  family, as three separate tables: CUDA (measured on H100/H200), RDNA3 (gfx11, wave32) and CDNA
  (gfx9, wave64); the AMD ones are chosen from `python -m kernels.compile_report` (registers,
  spills, LDS, occupancy of every real launch), not run on AMD hardware;
* which attention backend fast mode should use (`attention_backend`).

`as_target("gfx1100")` makes every query here answer as for another GPU (meta tensors count as on
the device): kernels.compile_report drives the real launchers with it, so the report and the CI
gate see the configurations the runtime would pick, from the same tables.

Rules followed: no string compares of version numbers, no Triton internals. `waves_per_eu` is a
launch option of Triton's AMD backend (every release 3.0-3.9 has it); Triton's CUDA backend rejects
unknown launch options (KeyError), so it is only ever passed when `is_hip()`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "triton_available", "is_interpreter", "is_hip", "gpu_available", "arch", "warp_size",
    "max_num_warps", "num_sms", "kernels_usable", "launch_options", "config", "Target", "TARGETS",
    "as_target", "device_target", "fp32_dot_ok", "attention_backend",
]


@dataclass(frozen=True)
class Target:
    """A GPU as the launchers see it. `triton_arch` is what triton's GPUTarget takes."""
    name: str
    backend: str  # "hip" or "cuda"
    arch: str  # what arch() returns on that GPU
    triton_arch: object  # "gfx1100" / 90
    warp_size: int
    num_sms: int  # CUs (AMD) / SMs (NVIDIA), as torch's multi_processor_count reports them


# CU/SM counts: Radeon Pro W7900 96 CUs, Instinct MI300X 304 CUs, H100/H200 SXM 132 SMs
# (vendors' product pages). They only size grids (group norm's split count).
TARGETS = {
    "gfx1100": Target("gfx1100", "hip", "gfx1100", "gfx1100", 32, 96),
    "gfx942": Target("gfx942", "hip", "gfx942", "gfx942", 64, 304),
    "sm90": Target("sm90", "cuda", "sm_90", 90, 32, 132),
}

_STANDIN: Target | None = None  # set by as_target()


@contextlib.contextmanager
def as_target(target: str | Target):
    """Inside the block every query answers as for `target` (a TARGETS name or a Target, e.g.
    device_target()), and meta tensors are 'on the device'. For recording launches
    (kernels.compile_report, kernels.precompile); not thread-safe, not for runtime."""
    global _STANDIN
    prev, _STANDIN = _STANDIN, TARGETS[target] if isinstance(target, str) else target
    try:
        yield _STANDIN
    finally:
        _STANDIN = prev


def device_target(index: int | None = None) -> Target:
    """The Target of a real GPU (default: the current one), as its properties describe it; its
    name is its arch ('sm_89', 'gfx1100'). What kernels.precompile records and compiles for."""
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    if _torch_is_hip():
        arch_name = getattr(props, "gcnArchName", "gfx").split(":")[0]
        ws = int(getattr(props, "warp_size", 0) or (64 if arch_name.startswith("gfx9") else 32))
        return Target(arch_name, "hip", arch_name, arch_name, ws, props.multi_processor_count)
    cc = props.major * 10 + props.minor
    return Target(f"sm_{cc}", "cuda", f"sm_{cc}", cc, int(getattr(props, "warp_size", 0) or 32),
                  props.multi_processor_count)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _env_interpreter() -> bool:
    # Triton reads the variable when @triton.jit decorates; caching it keeps launchers consistent
    # with how the kernels were built.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_interpreter() -> bool:
    return _STANDIN is None and _env_interpreter()


@functools.lru_cache(maxsize=None)
def _torch_is_hip() -> bool:
    return getattr(torch.version, "hip", None) is not None


def is_hip() -> bool:
    return _STANDIN.backend == "hip" if _STANDIN else _torch_is_hip()


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def gpu_available() -> bool:
    return True if _STANDIN else _cuda_available()


@functools.lru_cache(maxsize=None)
def _device_arch() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if _torch_is_hip():
        return getattr(props, "gcnArchName", "gfx").split(":")[0]
    return f"sm_{props.major}{props.minor}"


def arch() -> str:
    """'sm_90', 'gfx1100', ... ; 'interpreter' in the CPU interpreter; 'cpu' with nothing."""
    if _STANDIN:
        return _STANDIN.arch
    if is_interpreter():
        return "interpreter"
    if not gpu_available():
        return "cpu"
    return _device_arch()


@functools.lru_cache(maxsize=None)
def _device_warp_size() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    ws = getattr(props, "warp_size", None)  # torch >= 2.3 reports it on both vendors
    if ws:
        return int(ws)
    return 64 if (_torch_is_hip() and _device_arch().startswith("gfx9")) else 32


def warp_size() -> int:
    """32 on NVIDIA and RDNA (gfx10/11/12), 64 on CDNA (gfx9xx)."""
    if _STANDIN:
        return _STANDIN.warp_size
    if is_interpreter() or not gpu_available():
        return 32
    return _device_warp_size()


def max_num_warps() -> int:
    # A workgroup holds at most 1024 threads on both vendors: 32 warps of 32, 16 wavefronts of 64.
    return 1024 // warp_size()


@functools.lru_cache(maxsize=None)
def _device_num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def num_sms() -> int:
    if _STANDIN:
        return _STANDIN.num_sms
    if is_interpreter() or not gpu_available():
        return 4  # only used to size grids; keeps interpreted grids small
    return _device_num_sms()


def kernels_usable() -> tuple[bool, str]:
    """(usable, reason). Kernels run on GPU tensors, or on CPU tensors in the interpreter."""
    if not triton_available():
        return False, "triton is not installed"
    if _STANDIN:
        return True, f"stand-in target {_STANDIN.name} (meta tensors, launches recorded)"
    if is_interpreter():
        return True, "Triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors"
    if not gpu_available():
        return False, "no GPU and not in the Triton interpreter (set TRITON_INTERPRET=1 for CPU)"
    return True, f"GPU {arch()}"


def kernel_device_ok(t: torch.Tensor) -> bool:
    """Is this tensor on a device our kernels can run on right now?"""
    if _STANDIN:
        return t.device.type == "meta"
    return (t.device.type == "cpu") if is_interpreter() else (t.device.type == "cuda")


def fp32_dot_ok() -> bool:
    """May a kernel use tl.dot on fp32 inputs? Not on AMD: RDNA3 has no fp32 WMMA (a fp32 dot
    became scalar FMAs with 922 VGPRs and spills on gfx1100, compile report of 2026-12) and
    Triton accepts no TF32 there; such calls go to PyTorch (rocBLAS / MIOpen) instead."""
    return not is_hip()


# ---------------------------------------------------------------------------------------------
# Launch configurations. Keys are kernel families; values are plain dicts. Block sizes that are
# shape-dependent are chosen in the kernel's launcher from these knobs.
# CUDA: tuned for H100 (sm_90, 132 SMs, 228 KB smem/SM). num_stages > 1 lets Triton pipeline the
# K/V loads of the attention loop with cp.async / TMA-less loads.
_CUDA = {
    # attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head-dim bucket. Chosen by
    # benchmarks/sweep_attention.py on an H200 (torch 2.11, Triton 3.6, fp16, CFG batch 2, graph
    # replay), best of 24-36 candidates per shape: d40 4096² 128x64/4/3 0.177 ms (SDPA 0.152);
    # d80 1024² 128x128/8/3 0.0207 ms (SDPA 0.0182); d160 256² 64x64/4/2 0.0083 ms (SDPA 0.0104).
    "attention": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        256: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    },
    # cross-attention over <= 128 keys (and CLIP's 77 causal): one or two K/V tiles, nothing to
    # pipeline. Same sweep: d40 x77 64x64 0.0108 ms (SDPA 0.0137), CLIP 64x64 0.0039 (0.0065),
    # d80 x77 64x64 0.0056 (0.0082), d160 x77 64x32 0.0062 (0.0086), d160 64x64 64x32 0.0048 (0.0083).
    "attention_short_kv": {
        64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
    },
    # which of the Triton kernel and SDPA is faster, by (self-attention, padded head-dim bucket),
    # from the same H200 sweep: SDPA wins self-attention at d40 (0.86x) and d80 (0.88x); the
    # kernel wins d160 self-attention (1.25x at 256², 1.7x at 64²) and every cross-attention.
    "attention_faster": {(True, 64): "sdpa", (True, 128): "sdpa", (True, 256): "triton",
                         (False, 64): "triton", (False, 128): "triton", (False, 256): "triton"},
    # group norm: groups up to ONE_PASS_MAX elements are held in registers by one program
    # (one read, one write, one launch); larger groups use the split two-kernel path with
    # ~PROGRAMS_PER_SM programs per SM per kernel so 132 SMs fill even at 64 groups.
    "group_norm": dict(ONE_PASS_MAX=16384, BLOCK=2048, PROGRAMS_PER_SM=8, MAX_SPLITS=64,
                       num_warps=8, one_pass_warps=16),
    "layer_norm": dict(ELEMS_PER_PROGRAM=8192, num_warps=8),
    "elementwise": dict(BLOCK=2048, num_warps=8),
    # bias + residual epilogue (kernels/residual.py): [BLOCK_P, <=64 channels] tiles of
    # ~BLOCK elements; chosen like "elementwise", not tuned separately
    "residual": dict(BLOCK=2048, num_warps=4),
    # fusion conv_gemm (kernels/conv.py): 3x3 convolutions with channels_last output maps of at
    # most MAX_HW pixels as im2col + cuBLAS GEMM instead of cuDNN. H200 (cuDNN 9.19, CUDA graph,
    # benchmarks/results/small_convs_h200.md), CFG batch 2: 4x4 outputs win ([2,1280,4,4] 16.7 vs
    # 25.2 µs, 2560 in 31.0 vs 37.9, stride 2 from 8x8 17.3 vs 20.3); from 8x8 up cuDNN wins
    # (8x8 1280: 29.7 vs 26.1 µs; 16x16: 56 vs 37). In fast mode at 256² (profile of one eager
    # step, bench_h200_20261203.md) the 19 [2,1280,4,4] convolutions took 0.20 ms instead of
    # 0.43, the step 4.27 ms of GPU time instead of 4.38, but 871 kernels instead of 782 (pad +
    # im2col copies): not in kernels.DEFAULT_FUSIONS.
    "conv_gemm": dict(MAX_HW=16),
    # fusion geglu_gemm (kernels/geglu.py): the feed-forward projection with GEGLU in its
    # epilogue; two fp32 accumulators (value, gate) per [BLOCK_M, BLOCK_N] output tile. H100
    # (72a5f6c, benchmarks/results/kernels_h100_20261207_geglu_gemm.md, 8-tile sweep, this tile
    # best at 3 of 4 shapes) against cuBLAS + the GEGLU kernel: [8192,320]x[2560,320] 0.048 vs
    # 0.061 ms (1.27x); [2048,640] 0.99x, [512,1280] 0.77x, [128,1280] 0.93x (cuBLAS's GEMM
    # outruns this one where the projection is wide): only projections of MAX_K input features or
    # fewer take it (the 320-channel level), the others the GEMM + GEGLU kernel.
    "geglu_gemm": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                       MAX_K=320),
}

# RDNA3 (gfx11: W7900 = gfx1100, wave32, 96 CUs / 48 WGPs, 64 KB LDS per workgroup, 1536 VGPRs
# per SIMD, WMMA 16x16x16 fp16/bf16). Not run on such a GPU: chosen from the compile report
# (benchmarks/results/compile_report.md) so that every launch has no spills and no scratch.
_HIP = {
    # attention, compile report (Triton 3.8): d40 64x64 201 VGPRs (occupancy 7), d80 64x32 225
    # (6), no spills. d160 (padded 256): 32x32 at 4 waves spilled 156 VGPRs (628 B scratch), 64x32
    # at 8 waves spilled 148; 32x32 at 8 waves has 244 VGPRs, no spills. waves_per_eu is left to
    # the compiler: waves_per_eu=2 pushed d40 from 183 to 256 VGPRs with spills (issue 8).
    "attention": {
        64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    },
    "attention_short_kv": {
        64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1),
    },
    "group_norm": dict(ONE_PASS_MAX=8192, BLOCK=2048, PROGRAMS_PER_SM=8, MAX_SPLITS=64,
                       num_warps=8, one_pass_warps=16),
    "layer_norm": dict(ELEMS_PER_PROGRAM=4096, num_warps=8),
    "elementwise": dict(BLOCK=2048, num_warps=8),
    "residual": dict(BLOCK=2048, num_warps=4),  # 4 waves of 32 lanes: 16 elements a lane
    # MIOpen vs rocBLAS at small maps is not measured: no map takes the GEMM path on AMD
    "conv_gemm": dict(MAX_HW=0),
    # two 64x64 fp32 accumulators over 4 waves of 32 lanes: 64 VGPRs of accumulators a lane.
    # Against rocBLAS + the GEGLU kernel not measured: MAX_K=0, no projection takes it on AMD
    # (it is a default fusion; the compile gate's opt-in pass still compiles it, at every K)
    "geglu_gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1,
                       MAX_K=0),
}

# CDNA (gfx9: MI300X = gfx942, wave64, 304 CUs, 64 KB LDS, 512 unified VGPR/AGPRs per lane, MFMA).
# Families not listed here take the RDNA3 entry (memory-bound kernels: the same element counts per
# program work for both; num_warps counts 64-wide waves here and is capped at 16).
_CDNA = {
    **_HIP,
    # attention, compile report (Triton 3.8): self-attention 128x64 at 4 waves (d40 146 VGPRs,
    # d80 228, no spills; d160 64x32: 252). Over <= 128 keys the masked tail costs registers:
    # 128x64 reached 288 VGPRs (occupancy 1) at d80 and the causal CLIP launch spilled, so short-KV
    # launches use 64x32 (98-144 VGPRs) and 32x32 at d160 (210; 64x32 had 259, occupancy 1).
    "attention": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
    },
    "attention_short_kv": {
        64: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
        256: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
    },
}

# Interpreter: every program runs serially in numpy, so fewer, smaller programs are faster;
# num_warps/num_stages are ignored there but kept valid.
_INTERP = {
    "attention": {b: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1) for b in (64, 128, 256)},
    "attention_short_kv": {b: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
                           for b in (64, 128, 256)},
    "group_norm": dict(ONE_PASS_MAX=4096, BLOCK=2048, PROGRAMS_PER_SM=2, MAX_SPLITS=64,
                       num_warps=4, one_pass_warps=4),
    "layer_norm": dict(ELEMS_PER_PROGRAM=4096, num_warps=4),
    "elementwise": dict(BLOCK=4096, num_warps=4),
    "residual": dict(BLOCK=4096, num_warps=4),
    "conv_gemm": dict(MAX_HW=16),  # the CUDA rule, so CPU tests take the GEMM path
    "geglu_gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1,
                       MAX_K=320),
}


def _table() -> dict:
    if is_interpreter():
        return _INTERP
    if is_hip():
        return _CDNA if warp_size() == 64 else _HIP
    return _CUDA


def config(family: str, key=None):
    """A copy of the configuration dict for a kernel family (and key, e.g. a head-dim bucket)."""
    entry = _table()[family]
    if key is not None:
        entry = entry[key]
    return dict(entry) if isinstance(entry, dict) else entry


@contextlib.contextmanager
def overriding(family: str, **values):
    """Inside the block, config(family) answers with `values` over the active table's entry
    (e.g. a tile sweep's configuration, or geglu_gemm's MAX_K lifted so that every projection
    takes the kernel); the entry is restored after. For benchmarks and the compile report, not
    for runtime: not thread-safe."""
    table = _table()
    saved = table[family]
    table[family] = dict(saved, **values)
    try:
        yield table[family]
    finally:
        table[family] = saved


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
# Attention backend for fast mode: the Triton kernel or PyTorch's SDPA.
_LOGGED: set = set()


def sdpa_fused_backends(device) -> list[str]:
    """torch's fused SDPA kernels ("flash", "mem_efficient") that accept fp16 [2, 8, 256, d] for
    d = 40, 80, 160 on `device`, as torch itself reports them (torch.backends.cuda.can_use_*).
    On ROCm this is where torch says e.g. that its flash kernels do not cover that GPU."""
    cb = torch.backends.cuda
    found = []
    try:
        for name, check in (("flash", cb.can_use_flash_attention),
                            ("mem_efficient", cb.can_use_efficient_attention)):
            ok = True
            for d in (40, 80, 160):
                q = torch.empty(2, 8, 256, d, device=device, dtype=torch.float16)
                try:
                    params = cb.SDPAParams(q, q, q, None, 0.0, False, False)
                except TypeError:  # torch < 2.5: no enable_gqa argument
                    params = cb.SDPAParams(q, q, q, None, 0.0, False)
                ok = ok and bool(check(params, False))
            if ok:
                found.append(name)
    except (AttributeError, RuntimeError) as e:  # an old torch without the queries
        logger.info("attention_backend: could not query SDPA backends (%s)", e)
    return found


def attention_backend(device, *, self_attention: bool = True, head_dim: int = 40) -> tuple[str, str]:
    """("triton" | "sdpa", reason) for fast mode's attention on `device`. Logged once per answer.

    ROCm: the Triton kernel wherever torch reports no fused SDPA kernel for the GPU (SDPA would
    fall back to its math path, which materialises the N×N logits: 2·8·4096² fp16 = 512 MB per
    call at 512²); where torch has one, SDPA. CUDA: the faster of the two by measurement
    (_CUDA["attention_faster"]). The VAE's d=512 head always uses SDPA (kernels/attention.py)."""
    device = torch.device(device)
    if device.type != "cuda":
        name, reason = "sdpa", f"device {device.type}: the Triton kernels run on GPUs"
    elif not triton_available():
        name, reason = "sdpa", "triton is not installed"
    elif is_hip():
        fused = sdpa_fused_backends(device)
        if fused:
            name, reason = "sdpa", (f"torch {torch.__version__} has fused SDPA ({', '.join(fused)}) "
                                    f"for {arch()}")
        else:
            name, reason = "triton", (f"torch {torch.__version__} reports no fused SDPA kernel "
                                      f"(flash / memory-efficient) for {arch()}: SDPA would use "
                                      f"its math path")
    else:
        bucket = max(64, 1 << (max(1, head_dim) - 1).bit_length())
        kind = "self" if self_attention else "cross"
        name = _CUDA["attention_faster"].get((bool(self_attention), bucket), "sdpa")
        reason = f"faster for {kind}-attention at head dim {head_dim} (H200 measurement in platform.py)"
    if (name, reason) not in _LOGGED:
        _LOGGED.add((name, reason))
        logger.info("attention backend: %s (%s)", name, reason)
    return name, reason


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
