"""CLIP's cost in fast mode: one encoder call for a prompt the prompt cache has not seen (the
prompt and the negative prompt, as FastRunner.generate calls it), float32 against float16, with
the float16 context's error and the weights each holds; with --eps also what that error does to
the first DDIM step's guided eps at 512² (the fp32 UNet + ControlNet under either context, as
bench_pipeline's eps err measures it).

    python benchmarks/bench_clip.py [--repeats 20] [--eps] [--device cpu]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_pipeline import PROMPT, reference_first_eps  # noqa: E402
from runtime.app import make_model  # noqa: E402
from runtime.inputs import A_PROMPT, N_PROMPT  # noqa: E402

TEXTS = [PROMPT + ", " + A_PROMPT, N_PROMPT]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(clip, repeats):
    out = clip(TEXTS)                                   # warm-up (cuBLAS handles, tokenizer)
    times = []
    for _ in range(repeats):
        sync(clip.device)
        t = time.perf_counter()
        out = clip(TEXTS)
        sync(clip.device)
        times.append((time.perf_counter() - t) * 1e3)
    return out, sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--eps", action="store_true", help="also the first step's guided eps at 512²")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    model = make_model(device, random_weights=True)
    clip = model.cond_stage_model
    weights = lambda: sum(p.numel() * p.element_size() for p in clip.parameters()) / 2**30  # noqa: E731
    ref, ms32 = timed(clip, args.repeats)
    gib32 = weights()
    clip.half()
    out, ms16 = timed(clip, args.repeats)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    worst = (out.float() - ref).abs().max().item()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, random weights (seed 0)")
    print("| CLIP | call ms (median) | weights GiB | rel. error vs fp32 | max abs error |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {ms32:.2f} | {gib32:.3f} | – | – |")
    print(f"| fp16 | {ms16:.2f} | {weights():.3f} | {rel:.2e} | {worst:.3e} |")
    if args.eps:            # rows 0/1 of the call are the prompt and the negative prompt
        eps = [reference_first_eps(model, 512, 1, 20, 9.0, 12345, (c[0:1], c[1:2]))
               for c in (ref, out)]
        eps_rel = ((eps[1] - eps[0]).norm() / eps[0].norm()).item()
        print(f"first step's guided eps at 512², fp32 UNet + ControlNet: relative error of the "
              f"fp16 context's {eps_rel:.2e}")


if __name__ == "__main__":
    main()
