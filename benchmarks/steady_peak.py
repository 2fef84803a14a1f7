"""Which allocations are live at the steady GPU-memory peak of a fast 512² request.

One fast pipeline (random weights) serves two requests, then a third under torch's memory
history; the history is replayed to find the moment of the most memory allocated, and what was
live then is grouped by its first stack frames outside torch. With --from-start the history is
recorded from before the build, so what the pipeline holds between requests (weights, graph
pools, buffers) is grouped too. Needs a GPU.

    python benchmarks/steady_peak.py [--clip-dtype fp16] [--low-vram] [--no-decode-graph] [--from-start]
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime import app, lowvram  # noqa: E402
from runtime.fast import FastOptions  # noqa: E402
from runtime.sample import sample_image  # noqa: E402

def where(ev):
    frames = [f for f in ev.get("frames", []) if f["filename"].endswith(".py")
              and "/torch/" not in f["filename"]]
    return "; ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in frames[:3])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip-dtype", default=None, help="FastOptions.clip_dtype (default: its default)")
    ap.add_argument("--low-vram", action="store_true", help="low-VRAM mode (--low-vram)")
    ap.add_argument("--no-decode-graph", action="store_true",
                    help="FastOptions.decode_graph off (the decode eager)")
    ap.add_argument("--from-start", action="store_true",
                    help="record the history from before the build: group the held memory too")
    args = ap.parse_args()
    device = torch.device("cuda")
    lowvram.configure(args.low_vram)
    if args.from_start:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    options = FastOptions(decode_graph=not args.no_decode_graph,
                          **({} if args.clip_dtype is None else dict(clip_dtype=args.clip_dtype)))
    pipe = app.build_pipeline(device, mode="fast", random_weights=True, options=options)
    kw = dict(prompt="a house", a_prompt="best quality", n_prompt="lowres", num_samples=1,
              image_resolution=512, ddim_steps=20, guess_mode=False, strength=1.0, scale=9.0, seed=1,
              eta=0.0, low_threshold=100, high_threshold=200)
    img = sample_image(512, 512)
    for _ in range(2):
        pipe.process(img, **kw)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if args.from_start:   # events before this index happened before the measured request
        start = len(torch.cuda.memory._snapshot()["device_traces"][0])
    else:
        start = 0
        torch.cuda.memory._record_memory_history(max_entries=200000)
    pipe.process(img, **kw)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()
    print(f"held before {held/2**30:.3f} GiB, steady peak {peak/2**30:.3f} GiB"
          f"{' (low-VRAM mode)' if args.low_vram else ''}")
    # replay: live allocations over time (without --from-start: on top of the held baseline,
    # which predates the recording); the peak is looked for in the measured request only
    live, total, best, best_live = {}, 0, -1, None
    for i, ev in enumerate(snap["device_traces"][0]):
        a = ev["action"]
        if a == "alloc":
            live[ev["addr"]] = ev; total += ev["size"]
        elif a == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
        if i >= start and total > best:
            best, best_live = total, dict(live)
    print(f"recorded allocations live at the peak: {best/2**30:.3f} GiB"
          f"{'' if args.from_start else ' (on top of what was held)'}")

    groups = collections.Counter()
    for ev in best_live.values():
        groups[where(ev)] += ev["size"]
    for w, size in groups.most_common(25 if args.from_start else 15):
        print(f"{size/2**20:9.1f} MiB  {w}")
    print(torch.cuda.memory_summary(abbreviated=True).splitlines()[0])
    print("segments:", sum(s["total_size"] for s in snap["segments"]) / 2**30, "GiB reserved")


if __name__ == "__main__":
    main()
