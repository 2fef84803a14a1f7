"""CLIP's cost in fast mode: one encoder call for a prompt the prompt cache has not seen (the
prompt and the negative prompt, as FastRunner.generate calls it), float32 against float16, with
the float16 context's error and the weights each holds on the GPU. Needs a GPU.

    python benchmarks/bench_clip.py [--repeats 20]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.app import make_model  # noqa: E402
from runtime.inputs import A_PROMPT, N_PROMPT  # noqa: E402

TEXTS = ["a house under the sun, " + A_PROMPT, N_PROMPT]


@torch.no_grad()
def timed(clip, repeats):
    out = clip(TEXTS)                                   # warm-up (cuBLAS handles, tokenizer)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = clip(TEXTS)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return out.float(), sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    clip = make_model(torch.device("cuda"), random_weights=True).cond_stage_model
    weights = lambda: sum(p.numel() * p.element_size() for p in clip.parameters()) / 2**30  # noqa: E731
    ref, ms32 = timed(clip, args.repeats)
    gib32 = weights()
    clip.half()
    out, ms16 = timed(clip, args.repeats)
    rel = ((out - ref).norm() / ref.norm()).item()
    worst = (out - ref).abs().max().item()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| CLIP | call ms (median) | weights GiB | rel. error vs fp32 | max abs error |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {ms32:.2f} | {gib32:.3f} | – | – |")
    print(f"| fp16 | {ms16:.2f} | {weights():.3f} | {rel:.2e} | {worst:.3e} |")


if __name__ == "__main__":
    main()
