"""FLOPs of canny2image counted from the model (torch.utils.flop_counter.FlopCounterMode), and the
time floor they imply against a dense fp16 matmul ceiling measured in the same run.

Counted: one DDIM step's model calls at batch 2B (UNet + ControlNet, as fast mode runs them), the
VAE decode, CLIP (2 prompts); per image = steps x step + decode + CLIP, divided by B.
The ceiling: median of torch.mm on fp16 [N,N] x [N,N] (default N=8192), CUDA-event timed.

  python benchmarks/flops.py --sizes 256 512 768 --batch 1
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.bench_pipeline import environment  # noqa: E402
from runtime.fast import FastOptions, FastRunner, control_forward, unet_decoder, unet_encoder  # noqa: E402
from runtime.app import make_model  # noqa: E402


def count(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def matmul_ceiling(n, dtype=torch.float16, reps=20):
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    model = make_model(dev, random_weights=True)
    runner = FastRunner(model, FastOptions(dtype=dtype, kernels=False, cuda_graph=False, two_streams=False,
                                           channels_last=False, precompute=False))
    ceiling = matmul_ceiling(args.matmul_n) if dev == "cuda" else None
    res = {"env": environment(args), "matmul_ceiling_tflops": ceiling and ceiling / 1e12, "sizes": []}
    clip = count(lambda: model.get_learned_conditioning(["a house", "lowres"]))
    for size in args.sizes:
        h = w = size // 8
        B2 = 2 * args.batch
        x = torch.randn(B2, 4, h, w, device=dev, dtype=dtype)
        emb = torch.randn(B2, runner.unet.time_embed[-1].out_features, device=dev, dtype=dtype)
        ctx = torch.randn(B2, 77, 768, device=dev, dtype=dtype)
        g = torch.randn(B2, runner.unet.time_embed[0].in_features, h, w, device=dev, dtype=dtype)

        def control():
            return control_forward(runner.control, x, emb, ctx, g)

        ctrl = control()

        def unet():
            hm, hs = unet_encoder(runner.unet, x, emb, ctx)
            return unet_decoder(runner.unet, hm, hs, emb, ctx, ctrl)

        f_cn, f_un = count(control), count(unet)
        f_hint = count(lambda: runner.control.input_hint_block(
            torch.rand(1, 3, size, size, device=dev, dtype=dtype), None, None))
        f_vae = count(lambda: runner.vae.decode(torch.randn(args.batch, 4, h, w, device=dev, dtype=dtype)))
        step = f_cn + f_un
        total = args.steps * step + f_vae + clip + f_hint
        r = {"size": size, "batch": args.batch, "step_tflop": step / 1e12, "unet_tflop": f_un / 1e12,
             "controlnet_tflop": f_cn / 1e12, "vae_decode_tflop": f_vae / 1e12, "clip_tflop": clip / 1e12,
             "hint_block_tflop": f_hint / 1e12, "total_tflop": total / 1e12,
             "per_image_tflop": total / args.batch / 1e12}
        if ceiling:
            r["floor_ms"] = 1e3 * total / ceiling
            r["step_floor_ms"] = 1e3 * step / ceiling
        res["sizes"].append(r)
        print(json.dumps(r))
    os.makedirs(args.out, exist_ok=True)
    tag = res["env"]["device"].replace(" ", "_") + time.strftime("_%Y%m%d_%H%M%S")
    with open(os.path.join(args.out, f"flops_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    lines = [f"# FLOPs — {res['env']['device']}, fp16 matmul ceiling "
             f"{res['matmul_ceiling_tflops'] and round(res['matmul_ceiling_tflops'], 1)} TFLOP/s", "",
             f"`{res['env']['command']}` (commit {res['env']['commit']})", "",
             "| size | batch | step (2B) TFLOP | UNet | ControlNet | VAE decode | total TFLOP | floor ms | step floor ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["sizes"]:
        lines.append(f"| {r['size']}² | {r['batch']} | {r['step_tflop']:.3f} | {r['unet_tflop']:.3f} | "
                     f"{r['controlnet_tflop']:.3f} | {r['vae_decode_tflop']:.3f} | {r['total_tflop']:.2f} | "
                     f"{r.get('floor_ms', float('nan')):.1f} | {r.get('step_floor_ms', float('nan')):.2f} |")
    with open(os.path.join(args.out, f"flops_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
