"""Benchmark every Triton kernel at the pipeline's real shapes against PyTorch.

    python benchmarks/bench_kernels.py --out benchmarks/results [--compile] [--quick] [--only attention]

Shapes: tests/data/hotspots_512.json (the project's reference shapes) (UNet/ControlNet at batch 2 = cond+uncond, VAE at
batch 1), fp16. Timing: triton.testing.do_bench (median, 20/80 % quantiles, L2 flushed between
runs). Ceilings measured in the same run: a 1 GiB device copy (TB/s, read+write) and an 8192³
fp16 matmul (TFLOP/s). Each row is independent: an error is recorded in the row, the run goes on.
Writes kernels_<gpu>.json and kernels_<gpu>.md (table) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as pyplatform
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
HOTSPOTS = os.environ.get("CONTROLNET_HOTSPOTS") or os.path.join(REPO, "tests", "data", "hotspots_512.json")

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from kernels import platform  # noqa: E402
from kernels.activations import activation  # noqa: E402
from kernels.attention import attention  # noqa: E402
from kernels.geglu import geglu, geglu_linear  # noqa: E402
from kernels.group_norm import group_norm  # noqa: E402
from kernels.layer_norm import layer_norm  # noqa: E402

DT = torch.float16


MODE = {"graph": True}


def bench(fn):
    """Median ms. Replayed as a CUDA graph by default (as runtime/fast/graphs.py runs the model), so
    host launch overhead (~20-50 us per Triton launch from Python) is not what gets measured;
    --no-graph times eager launches with do_bench instead."""
    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()
    if MODE["graph"]:
        try:
            med, lo, hi = do_bench_cudagraph(fn, rep=20, quantiles=[0.5, 0.2, 0.8])
            return med, lo, hi
        except Exception:
            torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10, rep=40)
    return med, lo, hi


def ceilings():
    n = 1 << 29  # 1 GiB of fp16
    x = torch.empty(n, dtype=DT, device="cuda").normal_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))[0]
    copy_tbs = 2 * x.numel() * 2 / t / 1e9
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    tm = bench(lambda: a @ b)[0]
    del x, y
    return {"copy_TBps": copy_tbs, "matmul_fp16_TFLOPs": 2 * 8192 ** 3 / tm / 1e9}


def _hot():
    with open(HOTSPOTS) as f:
        return json.load(f)


def _eager_attention(q, k, v, H, scale):
    # upstream CrossAttention (ATTN_PRECISION fp32): fp32 logits, scale after the product
    B, L, C = q.shape
    d = C // H
    qh, kh, vh = (t.unflatten(-1, (H, d)).transpose(1, 2).reshape(B * H, -1, d) for t in (q, k, v))
    s = torch.einsum("bid,bjd->bij", qh.float(), kh.float()) * scale
    o = torch.einsum("bij,bjd->bid", s.softmax(-1).to(v.dtype), vh)
    return o.reshape(B, H, L, d).transpose(1, 2).reshape(B, L, C)


def _sdpa(q, k, v, H, scale):
    B, L, C = q.shape
    d = C // H
    o = F.scaled_dot_product_attention(*(t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v)),
                                       scale=scale)
    return o.transpose(1, 2).reshape(B, L, C)


def attention_rows(ceil, quick):
    seen, rows = set(), []
    for e in _hot():
        if e["kind"] != "attn":
            continue
        key = (e["heads"], e["head_dim"], e["q_len"], e["kv_len"])
        if key in seen:
            continue
        seen.add(key)
        H, d, Lq, Lk = key
        B = 1 if d == 512 else 2
        row = dict(kernel="attention", shape=f"B{B} H{H} d{d} {Lq}x{Lk}", kind=e["self_or_cross"])
        try:
            q = torch.randn(B, Lq, H * d, dtype=DT, device="cuda")
            k = torch.randn(B, Lk, H * d, dtype=DT, device="cuda")
            v = torch.randn(B, Lk, H * d, dtype=DT, device="cuda")
            scale = d ** -0.5
            flops = 4 * B * H * Lq * Lk * d
            row["triton_ms"] = bench(lambda: attention(q, k, v, H, scale=scale))[0]
            row["sdpa_ms"] = bench(lambda: _sdpa(q, k, v, H, scale))[0]
            if not quick:
                row["eager_ms"] = bench(lambda: _eager_attention(q, k, v, H, scale))[0]
            row["triton_TFLOPs"] = flops / row["triton_ms"] / 1e9
            row["frac_of_matmul"] = row["triton_TFLOPs"] / ceil["matmul_fp16_TFLOPs"]
            row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["triton_ms"]
            row["path"] = "sdpa (d>256 by design)" if d > 256 else "triton"
            row["fast_mode_backend"] = "sdpa" if d > 256 else platform.attention_backend(
                "cuda", self_attention=e["self_or_cross"] == "self", head_dim=d)[0]
        except Exception as ex:  # record and go on
            row["error"] = f"{type(ex).__name__}: {ex}"[:300]
        rows.append(row)
    return rows


def _eager_gn_silu(x, w, b, eps, fp32_cast, add=None):
    if add is not None:
        x = x + add[:, :, None, None]
    h = F.group_norm(x.float(), 32, w.float(), b.float(), eps).to(x.dtype) if fp32_cast \
        else F.group_norm(x, 32, w, b, eps)
    return F.silu(h)


def group_norm_rows(ceil, use_compile, quick):
    seen, rows = set(), []
    compiled = None
    if use_compile:
        try:
            compiled = torch.compile(_eager_gn_silu, dynamic=False)
        except Exception:
            compiled = None
    for e in _hot():
        if e["kind"] != "groupnorm":
            continue
        vae = e["name"].startswith("vae")
        key = (tuple(e["shape"]), e["eps"], vae)
        if key in seen:
            continue
        seen.add(key)
        _, C, H, W = e["shape"]
        B = 1 if vae else 2
        layouts = ["nchw"] if vae or quick else ["nchw", "nhwc"]
        for layout in layouts:
            fused_add = e["fp32_cast"]  # ResBlock shapes: also time the fused emb add
            row = dict(kernel="group_norm+silu" + ("+add" if fused_add else ""),
                       shape=f"[{B},{C},{H},{W}] {layout} eps{e['eps']:g}")
            try:
                x = torch.randn(B, C, H, W, dtype=DT, device="cuda")
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                w = torch.rand(C, dtype=DT, device="cuda") + 0.5
                b = torch.randn(C, dtype=DT, device="cuda")
                add = torch.randn(B, C, dtype=DT, device="cuda") if fused_add else None
                nbytes = 2 * x.numel() * x.element_size()
                row["triton_ms"] = bench(lambda: group_norm(x, 32, w, b, e["eps"], silu=True, add=add))[0]
                row["eager_ms"] = bench(lambda: _eager_gn_silu(x, w, b, e["eps"], e["fp32_cast"], add))[0]
                if compiled is not None:
                    try:
                        row["compiled_ms"] = bench(lambda: compiled(x, w, b, e["eps"], e["fp32_cast"], add))[0]
                    except Exception as ex:
                        row["compiled_error"] = f"{type(ex).__name__}"[:100]
                row["triton_TBps"] = nbytes / row["triton_ms"] / 1e9
                row["frac_of_copy"] = row["triton_TBps"] / ceil["copy_TBps"]
                row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
            except Exception as ex:
                row["error"] = f"{type(ex).__name__}: {ex}"[:300]
            rows.append(row)
    return rows


def _memory_row(kernel, shape, fn_triton, fn_eager, nbytes, ceil):
    row = dict(kernel=kernel, shape=shape)
    try:
        row["triton_ms"] = bench(fn_triton)[0]
        row["eager_ms"] = bench(fn_eager)[0]
        row["triton_TBps"] = nbytes / row["triton_ms"] / 1e9
        row["frac_of_copy"] = row["triton_TBps"] / ceil["copy_TBps"]
        row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
    except Exception as ex:
        row["error"] = f"{type(ex).__name__}: {ex}"[:300]
    return row


def elementwise_rows(ceil):
    rows = []
    for M, N in [(2 * 4096, 320), (2 * 1024, 640), (2 * 256, 1280), (2 * 64, 1280), (2 * 77, 768)]:
        x = torch.randn(M, N, dtype=DT, device="cuda")
        w, b = torch.randn(N, dtype=DT, device="cuda"), torch.randn(N, dtype=DT, device="cuda")
        rows.append(_memory_row("layer_norm", f"[{M},{N}]", lambda: layer_norm(x, w, b, 1e-5),
                                lambda: F.layer_norm(x, (N,), w, b, 1e-5), 2 * x.numel() * 2, ceil))
    for M, F2 in [(2 * 4096, 2560), (2 * 1024, 5120), (2 * 256, 10240), (2 * 64, 10240)]:
        x = torch.randn(M, F2, dtype=DT, device="cuda")

        def eager(x=x):
            v, g = x.chunk(2, -1)
            return v * F.gelu(g)
        rows.append(_memory_row("geglu", f"[{M},{F2}]", lambda x=x: geglu(x), eager,
                                x.numel() * 2 * 3 // 2, ceil))
    for mode, shape in [("silu", (2, 16, 512, 512)), ("swish", (1, 128, 512, 512)),
                        ("quick_gelu", (2, 77, 3072))]:
        x = torch.randn(shape, dtype=DT, device="cuda")
        a = 1.702 if mode == "quick_gelu" else 1.0
        eager = (lambda x=x: F.silu(x)) if mode == "silu" else (lambda x=x, a=a: x * torch.sigmoid(a * x))
        rows.append(_memory_row(mode, str(list(shape)), lambda x=x, m=mode: activation(x, m), eager,
                                2 * x.numel() * 2, ceil))
    return rows


# the feed-forward projections of the 512² UNet levels at CFG batch 2: (M tokens, K, F)
GEGLU_GEMMS = [(2 * 4096, 320, 1280), (2 * 1024, 640, 2560), (2 * 256, 1280, 5120),
               (2 * 64, 1280, 5120)]
# launch configurations tried by --only geglu_gemm (the first is platform's current one)
GEGLU_GEMM_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
                    for bm, bn, bk, w, st in [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                                              (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                                              (128, 64, 32, 8, 4), (64, 128, 64, 8, 3),
                                              (128, 128, 32, 8, 4), (64, 64, 32, 4, 5)]]


def geglu_gemm_rows(ceil):
    """Fusion geglu_gemm: one Triton GEMM with GEGLU in its epilogue vs fast mode's unfused path
    (cuBLAS F.linear with bias, then the GEGLU kernel), and cuBLAS's GEMM alone; each launch
    configuration of GEGLU_GEMM_SWEEP, and its max abs difference from the unfused result."""
    rows = []
    for M, K, Fo in GEGLU_GEMMS:
        g = torch.Generator(device="cuda").manual_seed(M + K)
        x = torch.randn(M, K, dtype=DT, device="cuda", generator=g)
        w = torch.randn(2 * Fo, K, dtype=DT, device="cuda", generator=g) * K ** -0.5
        b = torch.randn(2 * Fo, dtype=DT, device="cuda", generator=g) * 0.1
        shape = f"[{M},{K}]x[{2 * Fo},{K}]"
        flop = 2 * M * K * 2 * Fo
        row = dict(kernel="geglu_gemm", shape=shape)
        try:
            row["unfused_ms"] = bench(lambda: geglu(F.linear(x, w, b)))[0]
            row["cublas_gemm_ms"] = bench(lambda: F.linear(x, w, b))[0]
            want = geglu(F.linear(x, w, b)).float()
            for i, cfg in enumerate(GEGLU_GEMM_SWEEP):
                key = "cfg{}_{BLOCK_M}x{BLOCK_N}x{BLOCK_K}_w{num_warps}_s{num_stages}".format(i, **cfg)
                try:
                    with platform.overriding("geglu_gemm", **cfg):
                        ms = bench(lambda: geglu_linear(x, w, b))[0]
                        diff = (geglu_linear(x, w, b).float() - want).abs().max().item()
                    row[key] = dict(ms=ms, TFLOPs=flop / ms / 1e9, max_abs_diff=diff)
                except Exception as ex:
                    row[key] = dict(error=f"{type(ex).__name__}: {ex}"[:200])
            timed = {k: v["ms"] for k, v in row.items() if isinstance(v, dict) and "ms" in v}
            best = min(timed, key=timed.get)
            row["triton_ms"], row["best_config"] = timed[best], best
            row["speedup_vs_eager"] = row["unfused_ms"] / row["triton_ms"]
            row["cublas_TFLOPs"] = flop / row["cublas_gemm_ms"] / 1e9
        except Exception as ex:
            row["error"] = f"{type(ex).__name__}: {ex}"[:300]
        rows.append(row)
        print(row, flush=True)
    return rows


def _meta(args):
    commit, dirty = args.commit or "unknown", None
    try:
        top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=REPO, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        if not args.commit and os.path.realpath(top) == os.path.realpath(REPO):  # not a copy
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
            dirty = bool(subprocess.check_output(["git", "status", "--porcelain", "--", "kernels"],
                                                 cwd=REPO, text=True).strip())
    except Exception:
        pass
    return dict(timing="cuda graph replay" if MODE["graph"] else "eager launches",
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                hip=torch.version.hip, cuda=torch.version.cuda, commit=commit, kernels_dirty=dirty,
                sdpa_enabled={b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")() for b in
                              ("flash", "mem_efficient", "cudnn", "math")
                              if hasattr(torch.backends.cuda, f"{b}_sdp_enabled")},
                python=pyplatform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]))


def _markdown(meta, ceil, rows):
    out = [f"# Kernel benchmark: {meta['gpu']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, commit `{meta['commit'][:12]}`"
           f"{' (kernels/ dirty)' if meta['kernels_dirty'] else ''}, {meta['date']}  ",
           f"command: `python {meta['command']}`; timing: {meta['timing']}  ",
           f"ceilings (same run): copy {ceil['copy_TBps']:.2f} TB/s, fp16 matmul "
           f"{ceil['matmul_fp16_TFLOPs']:.0f} TFLOP/s", "",
           "| kernel | shape | triton ms | baseline ms | speedup | rate | of ceiling | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['shape']} | – | – | – | – | – | ERROR {r['error'][:80]} |")
            continue
        if r["kernel"] == "attention":
            base, sp = r["sdpa_ms"], r["speedup_vs_sdpa"]
            rate, frac = f"{r['triton_TFLOPs']:.0f} TFLOP/s", r["frac_of_matmul"]
            note = f"vs SDPA; {r['kind']}; {r['path']}; fast mode: {r.get('fast_mode_backend')}" + (f"; eager {r['eager_ms']:.3f}" if "eager_ms" in r else "")
        elif r["kernel"] == "geglu_gemm":
            base, sp = r["unfused_ms"], r["speedup_vs_eager"]
            tflops = r[r["best_config"]]["TFLOPs"]
            rate, frac = f"{tflops:.0f} TFLOP/s", tflops / ceil["matmul_fp16_TFLOPs"]
            note = (f"vs cuBLAS F.linear + the GEGLU kernel; cuBLAS GEMM alone "
                    f"{r['cublas_gemm_ms']:.4f} ms; best of the sweep: {r['best_config']}, max abs "
                    f"diff {r[r['best_config']]['max_abs_diff']:.2g}")
        else:
            base, sp = r["eager_ms"], r["speedup_vs_eager"]
            rate, frac = f"{r['triton_TBps']:.2f} TB/s", r["frac_of_copy"]
            note = "vs eager" + (f"; compiled {r['compiled_ms']:.4f}" if "compiled_ms" in r else "")
        out.append(f"| {r['kernel']} | {r['shape']} | {r['triton_ms']:.4f} | {base:.4f} | {sp:.2f}x "
                   f"| {rate} | {100 * frac:.0f} % | {note} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--compile", action="store_true", help="also time torch.compile of eager GN+SiLU")
    p.add_argument("--quick", action="store_true", help="skip eager attention and NHWC rows")
    p.add_argument("--no-graph", action="store_true", help="time eager launches (host overhead in)")
    p.add_argument("--commit", help="the code's commit, when run from a copy without .git")
    p.add_argument("--only", choices=["attention", "geglu_gemm"],
                   help="only the attention rows (Triton vs SDPA), or only fusion geglu_gemm's")
    args = p.parse_args()
    MODE["graph"] = not args.no_graph
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a GPU")
    t0 = time.time()
    meta = _meta(args)  # after MODE is set
    ceil = ceilings()
    rows = geglu_gemm_rows(ceil) if args.only == "geglu_gemm" else attention_rows(ceil, args.quick)
    if not args.only:
        rows += group_norm_rows(ceil, args.compile, args.quick)
        rows += elementwise_rows(ceil)
    meta["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", meta["gpu"]).strip("_").lower() + (f"_{args.only}" if args.only else "")
    with open(os.path.join(args.out, f"kernels_{tag}.json"), "w") as f:
        json.dump(dict(meta=meta, ceilings=ceil, rows=rows), f, indent=1)
    md = _markdown(meta, ceil, rows)
    with open(os.path.join(args.out, f"kernels_{tag}.md"), "w") as f:
        f.write(md)
    sys.stdout.write(md)


if __name__ == "__main__":
    main()
