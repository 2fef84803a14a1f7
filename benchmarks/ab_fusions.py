"""A/B of kernels.patch's fusions in fast mode: per fusion set (none, default, each alone) the
eager step's kernels and GPU ms (benchmarks/profile_step.py), the CUDA-graph 20-step loop (median
of runs 2-4) and the first step's guided eps against the fp32 model; one model, same inputs.
Writes $OUT/fusions_ab.json (OUT defaults to /tmp) and prints a markdown table.
Results: benchmarks/results/fusions_h200.md.

  python benchmarks/ab_fusions.py            # GPU, full model at seeded random weights
  SMOKE=1 TRITON_INTERPRET=1 python benchmarks/ab_fusions.py   # CPU smoke on the tiny model
"""
import json, os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from benchmarks.profile_step import profile_step, family_cell, _inputs, table
from runtime.fast import FastOptions, FastRunner, ddim_schedule
from runtime.app import make_model
import kernels


def main():
    OUT = os.environ.get("OUT", "/tmp")
    t0 = time.time()
    SMOKE = bool(os.environ.get("SMOKE"))
    DEV = "cpu" if SMOKE else "cuda"
    model = make_model(DEV, tiny=SMOKE, random_weights=True)
    print("model", round(time.time() - t0, 1), flush=True)
    SIZE, B = (64, 1) if SMOKE else (512, 1)
    def opts(fu):
        if SMOKE:
            return FastOptions(dtype=torch.float32, channels_last=True, cuda_graph=False, two_streams=False, fusions=fu)
        return FastOptions(fusions=fu)
    def sync():
        if not SMOKE: torch.cuda.synchronize()
    from types import SimpleNamespace
    hint, ctx_c, ctx_u, x_T = _inputs(SimpleNamespace(device=torch.device(DEV), unet=model.model.diffusion_model), SIZE, B)
    # fp32 reference guided eps of step 0 (upstream path: two calls, control on both)
    t = ddim_schedule(model, 20, 0.0, DEV).timesteps[0]
    tt = torch.full((B,), t, device=DEV, dtype=torch.long)
    model.control_scales = [1.0] * 13
    with torch.no_grad():
        e_c = model.apply_model(x_T, tt, {"c_concat": [hint.expand(B, -1, -1, -1)], "c_crossattn": [ctx_c]})
        e_u = model.apply_model(x_T, tt, {"c_concat": [hint.expand(B, -1, -1, -1)], "c_crossattn": [ctx_u]})
    ref = e_u + 9.0 * (e_c - e_u)
    rows = []
    sets = [("none", ()), ("default", None)] + [(f, (f,)) for f in kernels.FUSIONS]
    for name, fu in sets:
        r = {"fusions": name}
        try:
            runner = FastRunner(model, opts(fu))
            prof = profile_step(runner, SIZE, B, record_shapes=(name == "default"), ops=40 if name == "default" else 0)
            r["profile"] = prof
            times = []
            for i in range(2 if SMOKE else 4):
                sync(); t1 = time.perf_counter()
                z, info = runner.sample(hint, ctx_c, ctx_u, x_T, 2 if SMOKE else 20, scale=9.0)
                sync(); times.append(time.perf_counter() - t1)
            r["graph"] = info["graph"]; r["capture_error"] = info["capture_error"]
            r["loop_ms"] = 1e3 * statistics.median(times[1:])
            fe = info["first_eps"].float()
            r["eps_rel_err"] = float((fe - ref).norm() / ref.norm())
            r["counts"] = {k: {kk: vv for kk, vv in v.items() if kk != "reasons"} for k, v in runner.kernel_handle.counts.items()}
            r["reasons"] = {k: v["reasons"] for k, v in runner.kernel_handle.counts.items() if v["reasons"]}
            if name == "none":
                base_eps = fe
            r["eps_vs_unfused"] = float((fe - base_eps).norm() / base_eps.norm())
            runner.clear_graphs(); del runner
            if not SMOKE: torch.cuda.empty_cache()
        except Exception as e:
            import traceback; traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:300]
        print(name, {k: v for k, v in r.items() if k not in ("profile", "counts")}, flush=True)
        if "profile" in r:
            print("   ", family_cell(r["profile"]), flush=True)
        rows.append(r)
    env = {"device": "cpu" if SMOKE else torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "commit": os.environ.get("GIT_COMMIT")}
    import triton; env["triton"] = triton.__version__
    json.dump({"env": env, "size": SIZE, "batch": B, "rows": rows}, open(f"{OUT}/fusions_ab.json", "w"), indent=1, default=str)
    print(env)
    print("| fusions | kernels/step | eager GPU ms/step | graph loop ms (20 steps) | ms/step | eps rel err vs fp32 | vs unfused |")
    for r in rows:
        if "error" in r: print(f"| {r['fusions']} | error {r['error'][:80]} |"); continue
        p = r["profile"]
        print(f"| {r['fusions']} | {p['kernels']} | {p['gpu_ms']:.2f} | {r['loop_ms']:.1f}{'' if r['graph'] else ' (no graph)'} | {r['loop_ms']/20:.2f} | {r['eps_rel_err']:.2e} | {r['eps_vs_unfused']:.1e} |")
    d = [r for r in rows if r["fusions"] == "default" and "profile" in r]
    if d:
        print(table(d[0]["profile"]))
        for o in d[0]["profile"].get("by_op", []):
            print(f"{o['ms']:8.3f} ms {o['calls']:5d}x {o['op']} {o['shapes']}")


if __name__ == "__main__":
    main()
