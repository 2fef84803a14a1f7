"""Sweep the attention kernel's launch configurations at the pipeline's real shapes (CUDA).

    python benchmarks/sweep_attention.py --out DIR [--jobs 12]

For each distinct attention shape of tests/data/hotspots_512.json (batch 2, fp16; the VAE's d=512
goes to SDPA and is skipped) and the CLIP text shape (12 heads x 64, causal, 77 tokens), every
candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) is compiled in parallel worker processes (they
fill the Triton cache), then timed one after another as CUDA-graph replays next to SDPA. Writes
sweep_attention.json (every row) and prints the best configuration per shape: what
platform._CUDA's attention tables are chosen from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def shapes():
    with open(os.path.join(REPO, "tests", "data", "hotspots_512.json")) as f:
        hot = json.load(f)
    out = []
    for e in hot:
        s = (e["heads"], e["head_dim"], e["q_len"], e["kv_len"], False) if e["kind"] == "attn" else None
        if s and s[1] <= 256 and s not in out:
            out.append(s)
    return out + [(12, 64, 77, 77, True)]


def candidates(d, Lk):
    dp = max(64, 1 << (d - 1).bit_length())
    ms, ns = (64, 128), (32, 64, 128)
    stages = (1,) if Lk <= 128 else (2, 3)
    for m, n, w, s in itertools.product(ms, ns, (4, 8), stages):
        if Lk <= 128 and n > max(16, 1 << (Lk - 1).bit_length()):
            continue
        if dp == 256 and (m * dp + 2 * s * n * dp) * 2 > 200 * 1024:  # smem of Q + K/V stages
            continue
        yield dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


def _tensors(H, d, Lq, Lk, dtype):
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(2, L, H * d, device="cuda", dtype=dtype, generator=g) for L in (Lq, Lk, Lk)]


def _warm(job):
    """Worker: compile one (shape, config[, dtype]) by running it once (fills the Triton disk
    cache). config None: the platform's own choice."""
    import torch
    from kernels.attention import attention
    (H, d, Lq, Lk, causal), cfg, *dt = job
    try:
        q, k, v = _tensors(H, d, Lq, Lk, getattr(torch, dt[0]) if dt else torch.float16)
        attention(q, k, v, H, causal=causal, config=cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:200]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--phase", choices=["all", "warm", "time", "warm-defaults"], default="all",
                   help="warm: only compile (fill TRITON_CACHE_DIR); time: only time (cache warm); "
                        "warm-defaults: compile the platform's own configs in fp16 and bf16")
    args = p.parse_args()
    if args.phase == "warm-defaults":
        jobs = [(s, None, dt) for s in shapes() for dt in ("float16", "bfloat16")]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            errors = [e for e in pool.map(_warm, jobs, chunksize=1) if e]
        print(f"compiled {len(jobs)} default launches; errors: {errors}")
        return
    jobs = [(s, c) for s in shapes() for c in candidates(s[1], s[3])]
    if args.phase == "time":
        errors = [None] * len(jobs)  # a failing config fails again when timed
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            errors = pool.map(_warm, jobs, chunksize=1)
        if args.phase == "warm":
            print(f"compiled {len(jobs)} configurations, {sum(e is not None for e in errors)} failed")
            return

    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph
    from kernels.attention import attention, pick_config
    rows = []
    for shape in shapes():
        H, d, Lq, Lk, causal = shape
        q, k, v = _tensors(H, d, Lq, Lk, torch.float16)
        qh, kh, vh = (t.unflatten(-1, (H, d)).transpose(1, 2) for t in (q, k, v))
        sdpa = do_bench_cudagraph(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal), rep=20)
        cur = pick_config(d, Lk)
        for (s, cfg), err in zip(jobs, errors):
            if s != shape:
                continue
            row = dict(shape=list(shape), config=cfg, sdpa_ms=sdpa, current=(cfg == cur))
            if err:
                row["error"] = err
            else:
                try:
                    row["ms"] = do_bench_cudagraph(lambda: attention(q, k, v, H, causal=causal, config=cfg), rep=20)
                    row["vs_sdpa"] = sdpa / row["ms"]
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
        ok = [r for r in rows if r["shape"] == list(shape) and "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        now = next((r for r in ok if r["current"]), None)
        print(f"H{H} d{d} {Lq}x{Lk}{' causal' if causal else ''}: sdpa {sdpa:.4f} ms; "
              f"current {now['ms'] if now else float('nan'):.4f}; best {best['ms']:.4f} "
              f"({best['vs_sdpa']:.2f}x sdpa) {best['config']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_attention.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=__import__("triton").__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
