"""Compile every Triton launch the model makes for GPUs we do not have, and inspect the code.

    python -m kernels.compile_report --targets gfx1100 gfx942 sm90 --out benchmarks/results

How: the full-size model (models/cldm_v15.yaml) is built on the meta device in fp16 and patched
with kernels.patch; inside `platform.as_target(t)` the UNet + ControlNet (CFG batch 1 and 2,
512² → 64² latents, context [B, 77, 768]), the VAE decoder and the CLIP text encoder run on meta
tensors while `JITFunction.run` is replaced by a recorder. So the launches are the ones the real
launchers make, with the configurations the runtime would pick from platform's tables, and
Triton's own binder specialises them for the target's backend (ints equal to 1 become
constexprs, 16-divisibility, AMD's buffer-range attribute). Convolutions on meta tensors return
NCHW whatever their inputs; `_gpu_conv_layout` gives them the layout cuDNN / MIOpen give (so the
kernels after a convolution, e.g. the channels_last GroupNorms with the fused conv bias, are the
variants a GPU launches). Each launch also gets a `launch_key` (computed the same way from a real
GPU run: tests/kernels/test_compile_gate.py checks a fast generation against this list). Each distinct launch is then built
with triton.compile(ASTSource(...), target=GPUTarget(...)) and its code inspected: registers,
spills, scratch, LDS / shared memory, matrix instructions, occupancy (kernels/occupancy.py).
Writes compile_report.json and compile_report.md. tests/kernels/test_compile_gate.py is the CI
gate built on it. A warm TRITON_CACHE_DIR makes a rerun take seconds.

Triton internals used (JITFunction.run / params / signature / _pack_args and
runtime.jit.create_function_from_signature): checked on Triton 3.8 (the release torch 2.14 pins)
and 3.6 (the GPU machine's: same signatures, read in its jit.py), see TRITON_VERIFIED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from . import occupancy, platform
from .attention import uses_sdpa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FULL = os.path.join(REPO, "models", "cldm_v15.yaml")
HOTSPOTS = os.path.join(REPO, "tests", "data", "hotspots_512.json")
# Releases whose internals (above) this module was checked against; others: refuse clearly.
TRITON_VERIFIED = ((3, 6), (3, 8))


def triton_version_ok() -> tuple[bool, str]:
    import triton
    parts = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])
    ok = parts in TRITON_VERIFIED
    return ok, (f"triton {triton.__version__}" + ("" if ok else
                f": compile_report is verified on {TRITON_VERIFIED} only (uses Triton internals)"))


@dataclass
class Launch:
    """One distinct compilation: a kernel with its specialisation and launch options."""
    kernel: str
    fn: object = field(repr=False)
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    uses: list = field(default_factory=list)  # [{"site", "grid", "args"}]
    keys: set = field(default_factory=set)  # launch_key()s of its uses

    @property
    def key(self):
        return (self.kernel, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(self.options.items())))

    def brief(self):
        """The kernel's own constexprs (upper-case names), e.g. 'HEAD_DIM=40, BLOCK_M=64'."""
        names = self.fn.arg_names
        items = ((names[k[0]] if isinstance(k, tuple) else k, v) for k, v in self.constexprs.items())
        return ", ".join(f"{n}={v}" for n, v in items if n.isupper())


# Constexprs that are launch configuration (tile sizes and what follows from them), not code
# features: they differ between targets' tables, so launch_key's "feature" part leaves them out.
_CONFIG_CONSTEXPRS = re.compile(r"^(BLOCK\w*|ROWS|S_P2|DP|EVEN_N)$")


def launch_key(fn, args, kwargs) -> tuple[str, str]:
    """(feature, exact) signature of one launch `fn[grid](*args, **kwargs)`, from the arguments
    the launcher passes (no Triton internals beyond JITFunction.params, stable since 3.0), so a
    real GPU run and this recorder compute it the same way: the kernel, every tensor's dtype,
    the integer arguments equal to 1 (Triton specialises them: a stride of 1 is the memory
    format) and the code-feature constexprs (SILU, HAS_ADD_C, CHANNELS_LAST, ...); `exact` adds
    the launch-config constexprs and num_warps / num_stages (only comparable on one target)."""
    bound = {p.name: p.default for p in fn.params}
    bound.update(zip((p.name for p in fn.params), args))
    bound.update((k, v) for k, v in kwargs.items() if k in bound)
    feature, config = [fn.__name__], []
    for p in fn.params:
        v = bound[p.name]
        if isinstance(v, torch.Tensor):
            feature.append(f"{p.name}:{str(v.dtype).replace('torch.', '')}")
        elif p.is_constexpr:
            (config if _CONFIG_CONSTEXPRS.match(p.name) else feature).append(f"{p.name}={v}")
        elif isinstance(v, int) and not isinstance(v, bool) and v == 1:
            feature.append(f"{p.name}=1")
    config += [f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs]
    return " ".join(feature), " ".join(feature + config)


def _gpu_target(t: platform.Target):
    from triton.backends.compiler import GPUTarget
    return GPUTarget(t.backend, t.triton_arch, t.warp_size)


@contextlib.contextmanager
def _recording(target: platform.Target, sink: list, site: list, on_new=None):
    """Replace JITFunction.run: bind with `target`'s backend, record, launch nothing;
    on_new(launch) for each distinct launch as soon as it is seen."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    backend = make_backend(_gpu_target(target))
    binders, announced = {}, set()
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = launch_key(self, args, kwargs)
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if id(self) not in binders:
            binders[id(self)] = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binders[id(self)](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, opts)
        grid = grid(bound) if callable(grid) else grid
        summary = {k: (list(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in bound.items()
                   if isinstance(v, (torch.Tensor, int, float, bool))}
        launch = Launch(self.__name__, self, signature, constexprs, attrs, dict(options.__dict__))
        if on_new is not None and launch.key not in announced:
            announced.add(launch.key)
            on_new(launch)
        sink.append((launch, {"site": site[0], "grid": list(grid), "args": summary, "key": key}))
        return None

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = orig


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _gpu_conv_layout():
    """F.conv2d on meta tensors returns NCHW whatever its inputs; cuDNN and MIOpen return
    channels_last when the input or the weight is channels_last (torch's
    cudnn_conv_suggest_memory_format). Every convolution (nn.Conv2d's and the fusions' direct
    F.conv2d calls) goes through torch.nn.functional.conv2d, so that is where the layout is set:
    the kernels that read a convolution's output see the strides a GPU gives them."""
    orig = torch.nn.functional.conv2d

    def conv2d(x, weight, *args, **kwargs):
        y = orig(x, weight, *args, **kwargs)
        if y.device.type == "meta" and (_channels_last(x) or _channels_last(weight)):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    torch.nn.functional.conv2d = conv2d
    try:
        yield
    finally:
        torch.nn.functional.conv2d = orig


def build_model(channels_last=True, config=CONFIG_FULL):
    """The ControlLDM of `config` (default: full size) on the meta device as fast mode prepares it
    (runtime/fast/nets.py): fp16 with GroupNorm32's affine parameters in fp32, UNet + ControlNet
    channels_last (fast mode's default), the VAE too where FastOptions().vae_channels_last, eval.
    Shapes and strides only, no memory.
    Built as runtime.weights builds every model (parameters on meta, no init), then the few
    buffers moved there too (computing the noise schedule on meta tensors would import
    torch._dynamo: a second of start-up for kernels.precompile)."""
    from cldm.model import create_model
    from runtime.weights import parameters_on_meta
    with parameters_on_meta():
        model = create_model(config)
    model = model.to("meta").half().eval().requires_grad_(False)
    for net in (model.model.diffusion_model, model.control_model):
        net.dtype = torch.float16  # what upstream's use_fp16 sets: blocks run in fp16
        for m in net.modules():
            if type(m).__name__ == "GroupNorm32":
                m.float()
        if channels_last:
            net.to(memory_format=torch.channels_last)
    if channels_last and _vae_channels_last():
        model.first_stage_model.to(memory_format=torch.channels_last)
    return model


def _vae_channels_last():
    from runtime.fast.options import FastOptions
    return FastOptions().vae_channels_last


def record(target, model=None, batches=(1, 2), size=512, channels_last=True,
           decode_batch=1, on_new=None, opt_in=False) -> list[Launch]:
    """Every distinct launch of one denoising step (each model batch in `batches`), a CLIP forward
    (same batches) and a VAE decode (`decode_batch`), as the launchers would make them on
    `target` (a TARGETS name or a platform.Target) for images of `size` (a side, or (H, W));
    with `opt_in` also the step's launches with every fusion on, the opt-in ones
    (patch.OPT_IN_FUSIONS) too: the compile gate's, not the precompile's (fast mode's defaults).
    on_new(launch): called with each distinct launch as soon as it is recorded."""
    import kernels
    model = build_model(channels_last) if model is None else model
    sink, site = [], ["?"]
    height, width = (size, size) if isinstance(size, int) else size
    lat_h, lat_w = height // 8, width // 8
    hooks = []
    # The decoder's skip concatenations: fast mode's decoder (not the model's forward) calls the
    # "skip_cat" fusion, so its launches are made here, at the shapes the UNet forward shows.
    unet = model.model.diffusion_model
    skips, cats = [], []
    hooks += [b.register_forward_hook(lambda m, i, o: skips.append(o)) for b in unet.input_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, i: cats.append(i[0])) for b in unet.output_blocks]
    fmt = dict(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def step_inputs(B):
        x = torch.empty(B, 4, lat_h, lat_w, dtype=torch.float16, device="meta", **fmt)
        hint = torch.empty(B, 3, height, width, dtype=torch.float16, device="meta", **fmt)
        ctx = torch.empty(B, 77, 768, dtype=torch.float16, device="meta")
        return x, {"c_concat": [hint], "c_crossattn": [ctx]}

    with platform.as_target(target) as t, _recording(t, sink, site, on_new), _gpu_conv_layout(), \
            torch.no_grad():
        handle = kernels.patch(model, strict=True)  # a fallback would hide a launch: raise
        try:
            for B in batches:
                meta = dict(device="meta")
                x, cond = step_inputs(B)
                site[0] = f"unet+control B{B}"
                skips.clear()
                cats.clear()
                model.apply_model(x, torch.zeros(B, dtype=torch.long, **meta), cond)
                if "skip_cat" in handle.fusions:
                    from .residual import skip_cat
                    site[0] = f"decoder skip_cat B{B}"
                    # the scale of skip i is cscales[i:i + 1], one fp16 element of the 13 control
                    # scales (runtime/fast/split.py): its address alignment is specialised on
                    scales = torch.empty(len(unet.output_blocks) + 1, dtype=torch.float16, **meta)
                    for j, cat in enumerate(cats[:len(unet.output_blocks)]):
                        skip = skips[-1 - j]
                        i = len(unet.output_blocks) - 1 - j
                        n, c, hh, ww = cat.shape
                        h = torch.empty(n, c - skip.shape[1], hh, ww, dtype=cat.dtype, **meta, **fmt)
                        skip_cat(h, skip, torch.empty_like(skip), scales[i:i + 1])
                if "ddim_update" in handle.fusions:
                    from .ddim import ddim_update
                    site[0] = f"step ddim_update B{B}"
                    # fast mode's step: fp32 latents (NCHW), the model's eps in its layout:
                    # guided (the halves of one CFG call of 2B rows) and at guidance scale 1
                    lat = torch.empty(B, 4, lat_h, lat_w, **meta)
                    eps = torch.empty(2 * B, 4, lat_h, lat_w, dtype=torch.float16, **meta, **fmt)
                    e_u, e_c = eps.chunk(2)
                    bad = torch.empty((), dtype=torch.bool, **meta)
                    for u, g in ((e_u, torch.empty((), **meta)), (None, None)):
                        ddim_update(lat, e_c, torch.empty(4, **meta), torch.empty_like(lat),
                                    torch.empty_like(lat), u, g, bad)
                site[0] = f"clip B{B}"
                model.cond_stage_model.transformer(input_ids=torch.zeros(B, 77, dtype=torch.long, **meta))
            site[0] = f"vae decode B{decode_batch}"
            vae_fmt = torch.channels_last if channels_last and _vae_channels_last() \
                else torch.contiguous_format
            model.decode_first_stage(torch.empty(decode_batch, 4, lat_h, lat_w, dtype=torch.float16,
                                                 device="meta", memory_format=vae_fmt))
            if opt_in:   # the opt-in fusions act in the UNet and ControlNet only
                handle.undo()
                handle = kernels.patch(model, strict=True, fusions=kernels.FUSIONS)
                # geglu_gemm on every projection, whatever the target's MAX_K (0 on AMD, where
                # it is not measured): every launch a user can switch on gets compiled
                with platform.overriding("geglu_gemm", MAX_K=1 << 30):
                    for B in batches:
                        site[0] = f"unet+control, every fusion, B{B}"
                        x, cond = step_inputs(B)
                        model.apply_model(x, torch.zeros(B, dtype=torch.long, device="meta"), cond)
        finally:
            handle.undo()
            for h in hooks:
                h.remove()
    distinct = {}
    for launch, use in sink:
        lch = distinct.setdefault(launch.key, launch)
        lch.keys.add(use.pop("key"))
        lch.uses.append(use)
    return list(distinct.values())


# -- inspecting compiled code -----------------------------------------------------------------------
def _amdgcn_stats(asm: str) -> dict:
    def num(pattern, default=0):
        m = re.search(pattern, asm)
        return int(m.group(1)) if m else default
    return {
        "vgpr": num(r"\.vgpr_count:\s+(\d+)"), "agpr": num(r"\.agpr_count:\s+(\d+)"),
        "sgpr": num(r"\.sgpr_count:\s+(\d+)"),
        "vgpr_spill": num(r"\.vgpr_spill_count:\s+(\d+)"),
        "sgpr_spill": num(r"\.sgpr_spill_count:\s+(\d+)"),
        "scratch": num(r"\.private_segment_fixed_size:\s+(\d+)"),
        "llvm_occupancy": num(r";\s*Occupancy:\s+(\d+)", None),
        "wmma": len(re.findall(r"^\s*v_wmma_", asm, re.M)),
        "mfma": len(re.findall(r"^\s*v_mfma_", asm, re.M)),
    }


def _cuda_stats(compiled) -> dict:
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    def num(pattern):
        m = re.search(pattern, res)
        return int(m.group(1)) if m else 0
    return {"regs": num(r"REG:(\d+)"), "stack": num(r"STACK:(\d+)"), "local": num(r"LOCAL:(\d+)"),
            "mma": len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass))}


def compile_launch(launch: Launch, target_name: str) -> dict:
    import triton
    from triton.compiler import ASTSource
    t = platform.TARGETS[target_name]
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    row = {"target": target_name, "kernel": launch.kernel, "config": launch.brief(),
           "num_warps": launch.options.get("num_warps"), "num_stages": launch.options.get("num_stages"),
           "waves_per_eu": launch.options.get("waves_per_eu"),
           "has_dot": "tl.dot(" in launch.fn.src,
           "pointer_types": sorted({v for v in launch.signature.values()
                                    if isinstance(v, str) and v.startswith("*")}), "sites": sorted({u["site"] for u in launch.uses}),
           "calls": len(launch.uses),
           "signatures": sorted({f for f, _ in launch.keys}),
           "launch_keys": sorted({e for _, e in launch.keys})}
    try:
        compiled = triton.compile(src, target=_gpu_target(t), options=launch.options)
    except Exception as e:  # recorded, not raised: the report shows every failure
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return row
    row["lds"] = int(compiled.metadata.shared)
    row.update(_amdgcn_stats(compiled.asm["amdgcn"]) if t.backend == "hip" else _cuda_stats(compiled))
    row.update(occupancy.estimate(target_name, row))
    return row


def uncovered_hotspots(launches: list[Launch]) -> list[str]:
    """Hot shapes of tests/data/hotspots_512.json that no recorded launch covers."""
    with open(HOTSPOTS) as f:
        hot = json.load(f)
    args = [(lch.kernel, u["args"], lch) for lch in launches for u in lch.uses]
    missing = []
    for e in hot:
        if e["kind"] == "attn" and uses_sdpa(e["head_dim"], torch.float16):
            continue  # d 512 (VAE): SDPA by design, no Triton launch
        if e["kind"] == "attn":
            want = dict(H=e["heads"], Lq=e["q_len"], Lk=e["kv_len"])
            ok = any(k == "_attn_fwd_kernel" and all(a.get(n) == v for n, v in want.items())
                     and a["Q"][-1] == e["heads"] * e["head_dim"] for k, a, _ in args)
        else:  # a group-norm shape: any launch (GN or a fused kernel) over such a tensor
            ok = any(any(isinstance(v, list) and v[1:] == e["shape"][1:] for v in a.values())
                     for _, a, _ in args)
        if not ok:
            missing.append(f"{e['kind']} {e['name']}")
    return missing


def report(targets) -> dict:
    ok, version = triton_version_ok()
    if not ok:
        raise RuntimeError(version)
    t0 = time.time()
    model = build_model()
    rows, missing = [], {}
    for name in targets:
        launches = record(name, model, opt_in=True)
        missing[name] = uncovered_hotspots(launches)
        rows += [compile_launch(lch, name) for lch in launches]
    return {"triton": version, "torch": torch.__version__, "targets": list(targets),
            "seconds": round(time.time() - t0, 1), "uncovered_hotspots": missing, "rows": rows}


def markdown(rep: dict) -> str:
    out = [f"# Compile report ({', '.join(rep['targets'])})", "",
           f"{rep['triton']}, torch {rep['torch']}; `python -m kernels.compile_report` "
           f"({rep['seconds']} s). Compiled and inspected only: none of it ran on these GPUs.  ",
           "Occupancy: waves per SIMD (AMD) / warps per SM (NVIDIA) from the limits in "
           "kernels/occupancy.py; LLVM's own estimate in brackets.", ""]
    for t in rep["targets"]:
        rows = [r for r in rep["rows"] if r["target"] == t]
        hip = platform.TARGETS[t].backend == "hip"
        out += [f"## {t}", ""]
        if rep["uncovered_hotspots"][t]:
            out.append(f"**Hot shapes not covered:** {rep['uncovered_hotspots'][t]}")
        head = ("| kernel | config | warps | VGPR | SGPR | spills | scratch | LDS | WMMA/MFMA | occupancy |"
                if hip else "| kernel | config | warps | regs | stack/local | smem | MMA | occupancy |")
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['kernel']} | {r['config']} | {r['num_warps']} | ERROR {r['error'][:120]} |")
            elif hip:
                mm = r["wmma"] or r["mfma"]
                out.append(f"| {r['kernel']} | {r['config']} | {r['num_warps']} | {r['vgpr']}"
                           f"{' (' + str(r['agpr']) + ' AGPR)' if r['agpr'] else ''} | {r['sgpr']} | "
                           f"{r['vgpr_spill'] + r['sgpr_spill']} | {r['scratch']} | {r['lds']} | "
                           f"{mm if r['has_dot'] else '–'} | {r['occupancy']} ({r['llvm_occupancy']}) |")
            else:
                out.append(f"| {r['kernel']} | {r['config']} | {r['num_warps']} | {r['regs']} | "
                           f"{r['stack']}/{r['local']} | {r['lds']} | {r['mma'] if r['has_dot'] else '–'} "
                           f"| {r['occupancy']} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["gfx1100", "gfx942", "sm90"],
                   choices=sorted(platform.TARGETS))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--name", default="compile_report")
    args = p.parse_args(argv)
    if platform.is_interpreter():
        sys.exit("compile_report: unset TRITON_INTERPRET (the interpreter builds no GPU code)")
    rep = report(args.targets)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    md = markdown(rep)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
