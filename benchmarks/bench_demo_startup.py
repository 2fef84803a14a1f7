"""The demo's start-up as a user meets it: `python gradio_canny2image.py` launched in a fresh
process, cold (an empty Triton cache folder) and then warm (a second launch on that folder).

Per launch, from the moment the process is spawned:
  * page: until GET / answers 200 (the page is served before the model is built);
  * model built: until the demo logs its queue workers (the model build is done);
  * first image: a request sent as soon as the page is up (gradio_client, one image, by default
    512² and 20 steps: the warm-up's shape), which waits for the warm-up and then runs;
  * steady: the median of --repeats more requests, as gradio_client sees them (it uploads the
    picture again for each, makes a new HTTP client per call and downloads the results), and
    as plain HTTP on one client with the picture uploaded once (bench_web_path.raw_request: a
    browser's Run click without the browser).
The demo's own log lines (the precompile's, the warm-up's) are kept in the results.

  python benchmarks/bench_demo_startup.py --out DIR                  # GPU: fast mode, random weights
  python benchmarks/bench_demo_startup.py --out DIR -- --tiny        # flags after -- go to the demo
  python benchmarks/bench_demo_startup.py --no-requests -- --device cpu --random-weights
                                                  # CPU: page and model build only (no request)

Needs the demo's packages (gradio, gradio_client, httpx). Results: demo_startup_<tag>.json and a
table on stdout, with device, versions and commit.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL_BUILT = "queue worker(s)"        # the demo's log line once its pipelines are built


def _watch(path, line, stop):
    """Seconds (perf_counter) when `line` first appears in the file at `path`, polled every 20 ms
    until `stop` is set; in a list, filled by a thread."""
    seen = []

    def poll():
        while not stop.is_set() and not seen:
            with open(path) as f:
                if line in f.read():
                    seen.append(time.perf_counter())
            time.sleep(0.02)
    threading.Thread(target=poll, daemon=True).start()
    return seen


def launch(demo_flags, cache, repeats, picture, timeout, requests=True, size=512, steps=20):
    """One launch: {page_s, model_s, first_image_s, steady_ms, log} (or error)."""
    import httpx
    from gradio_client import Client, handle_file

    from bench_web_path import median_ms, raw_request
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, TRITON_CACHE_DIR=cache, GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    log_path = os.path.join(cache, f"demo_{port}.log")
    os.makedirs(cache, exist_ok=True)
    log = open(log_path, "w+")
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "gradio_canny2image.py"),
                             "--port", str(port), *demo_flags], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    built = _watch(log_path, MODEL_BUILT, stop)
    res = {}
    try:
        deadline = start + timeout
        while "page_s" not in res:
            if proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"no page (exit {proc.poll()})")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    res["page_s"] = time.perf_counter() - start
            except httpx.HTTPError:
                time.sleep(0.05)
        if requests:
            client = Client(url, verbose=False)
            file = handle_file(picture)
            args = (file, "a house", "best quality", "lowres", 1, size, steps, False, 1.0, 9.0, 7,
                    0.0, 100, 200)
            client.predict(*args, api_name="/process")
            res["first_image_s"] = time.perf_counter() - start
            raw = raw_request(httpx.Client(timeout=timeout), url, picture, list(args[1:]))
            for key, request in (("steady_ms", lambda: client.predict(*args, api_name="/process")),
                                 ("steady_raw_ms", raw)):
                res[key] = median_ms(request, 0, repeats) if repeats else None
        while not built and proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.02)
        res["model_s"] = built[0] - start if built else None
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        res["log"] = [line.rstrip() for line in log if "precompile" in line
                      or "warm" in line.lower() or "error" in line.lower()][-12:]
        log.close()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=240, help="per launch, seconds")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tag", default="gpu")
    ap.add_argument("--size", type=int, default=512,
                    help="the requests' picture and image resolution (the warm-up's: 512)")
    ap.add_argument("--steps", type=int, default=20, help="the requests' DDIM steps")
    ap.add_argument("--no-requests", action="store_true",
                    help="page served and model built only (no image: for the CPU)")
    ap.add_argument("demo_flags", nargs="*", default=None,
                    help="after --: the demo's flags (default: --random-weights)")
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    import torch
    from PIL import Image

    from runtime.sample import sample_image
    flags = args.demo_flags or ["--random-weights"]
    work = tempfile.mkdtemp(prefix="bench_demo_")
    picture = os.path.join(work, "in.png")
    Image.fromarray(sample_image(args.size, args.size)).save(picture)
    cache = os.path.join(work, "triton")
    launches = {name: launch(flags, cache, args.repeats, picture, args.timeout,
                             requests=not args.no_requests, size=args.size, steps=args.steps)
                for name in ("cold", "warm")}
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
        text=True).stdout.strip()
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "commit": commit,
           "command": " ".join(["python", "benchmarks/bench_demo_startup.py", *sys.argv[1:]])}
    import gradio
    env["gradio"] = gradio.__version__
    os.makedirs(args.out, exist_ok=True)
    data = {"env": env, "demo_flags": flags, "size": args.size, "steps": args.steps,
            "launches": launches}
    path = os.path.join(args.out, f"demo_startup_{args.tag}")
    with open(path + ".json", "w") as f:
        json.dump(data, f, indent=1)
    text = markdown(data)
    with open(path + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}.json and .md")


def markdown(data):
    """The results as a Markdown page: the table, then the demo's own log lines."""
    env, launches = data["env"], data["launches"]
    lines = [f"# The demo's start-up — {env['device']}", "",
             f"torch {env['torch']}, gradio {env['gradio']}, commit {env['commit']}; "
             f"`{env['command']}`; demo flags `{' '.join(data['demo_flags'])}`. Times from the "
             f"spawn of `python gradio_canny2image.py`; requests of one image, "
             f"{data['size']}², {data['steps']} step{'s' if data['steps'] != 1 else ''}.", "",
             "| launch | page served s | model built s | first image s | steady request ms: "
             "gradio_client / plain HTTP |", "|---|---|---|---|---|"]

    def cell(value, form):
        return form.format(value) if value is not None else "–"
    for name, r in launches.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {r['page_s']:.1f} | {cell(r.get('model_s'), '{:.1f}')} | "
                     f"{cell(r.get('first_image_s'), '{:.1f}')} | "
                     f"{cell(r.get('steady_ms'), '{:.0f}')} / "
                     f"{cell(r.get('steady_raw_ms'), '{:.0f}')} |")
    lines += ["", "The demo's log:", ""]
    lines += [f"    {name}: {line}" for name, r in launches.items() for line in r["log"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
