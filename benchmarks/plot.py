"""PNG plots from a bench_pipeline.py result file (needs matplotlib; run it anywhere).

  python benchmarks/plot.py benchmarks/results/bench_<tag>.json
writes bench_<tag>_e2e.png (end-to-end median per row, one panel per batch size) and
bench_<tag>_ablation.png (the ablation at each size, batch 1: time and eps error).
"""
import json
import os
import sys


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "error" not in r and r.get("size")]
    # the ablation's order, whatever order the rows were run in
    order = ["reference", "fp16", "+kernels", "+batched_cfg", "+precompute", "+channels_last",
             "+cuda_graph", "+fusions", "+conv_gemm", "compile"]
    names = sorted(dict.fromkeys(r["row"] for r in rows),
                   key=lambda n: order.index(n) if n in order else len(order))
    sizes = sorted({r["size"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    base = os.path.splitext(path)[0]
    title = f"{data['env']['device']} · torch {data['env']['torch']} · {(data['env'].get('commit') or 'unknown commit')[:8]}"

    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            ys = [next((r["median_ms"] for r in rows if r["row"] == n and r["size"] == s and r["batch"] == b),
                       float("nan")) for s in sizes]
            ax.bar([k + i * width for k in range(len(sizes))], ys, width, label=n)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))], [f"{s}²" for s in sizes])
        ax.set_yscale("log")
        ax.set_ylabel("end to end, median ms (log)")
        ax.set_title(f"batch {b}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(base + "_e2e.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ab = [n for n in names if n != "reference"]
    for s in sizes:
        ys = [next((r["median_ms"] for r in rows if r["row"] == n and r["size"] == s and r["batch"] == 1),
                   float("nan")) for n in ab]
        ax.plot(ab, ys, marker="o", label=f"{s}², batch 1")
    ax.set_yscale("log")
    ax.set_ylabel("end to end, median ms (log)")
    ax.set_title("ablation: each optimisation switched on in turn", fontsize=9)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(base + "_ablation.png", dpi=120)
    plt.close(fig)
    return [base + "_e2e.png", base + "_ablation.png"]


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("\n".join(plot(p)))
