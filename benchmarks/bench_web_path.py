"""Where the demo's web path goes: a request through Gradio against the same work called directly.

A stand-in pipeline returns fixed images at once (edge map + N samples at --size², photo-like
noise so PNG encoding costs what it costs on real results), so everything measured is the demo's
own overhead, on any machine (no GPU, no model):
  * direct: the Run button's function (make_process: input checks, PNGs written into Gradio's
    cache) called in this process;
  * png: save_results alone (the PNG encoding and writing part of direct);
  * client: gradio_client's predict against the served demo (upload excluded: the input file is
    uploaded once; HTTP, queue, event stream, result download URLs);
  * raw: the same request as two plain HTTP calls (POST /gradio_api/call/process, then its event
    stream), no result download;
  * browser (--browser): the page in headless Chromium (Debian's, driven by playwright), the
    picture set once as a user drops it: from the Run click to every new gallery image loaded and
    decoded, timed inside the page (performance.now()).
Medians of --repeats requests after --warmup ones; `web path` = raw − direct, and in the browser
browser − direct.

  python benchmarks/bench_web_path.py                 # 512², 1 sample
  python benchmarks/bench_web_path.py --samples 4
  python benchmarks/bench_web_path.py --browser       # also as a browser user sees it
"""
import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


class StandIn:
    """A Canny2Image stand-in: fixed images, no work (mode and model.device for the info line)."""
    mode = "fast"

    class model:
        device = "cpu"

    def __init__(self, size, samples, seed=0):
        import numpy as np
        rng = np.random.default_rng(seed)
        smooth = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        base = np.kron(smooth, np.ones((8, 8, 1), np.uint8))
        self.images = [np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255)
                       .astype(np.uint8) for _ in range(samples + 1)]

    def process(self, *args, **kwargs):
        return list(self.images)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# One Run click in the page: {total, result, files} in ms: until the gallery holds `n` images, all
# new (the results' files are new on every request) and decoded; until the page asked for the
# first result file (the result reached the page); until the last result file had arrived.
_RUN_ONCE = """async (n) => {
    const images = () => [...document.querySelectorAll("#gallery img")];
    const before = new Set(images().map(i => i.src));
    const run = [...document.querySelectorAll("button")].find(b => b.textContent.trim() === "Run");
    performance.clearResourceTimings();
    const start = performance.now();
    run.click();
    const total = await new Promise(resolve => {
        const check = () => {
            const now = images();
            if (now.length >= n && now.every(i => !before.has(i.src) && i.complete
                                             && i.naturalWidth > 0)) {
                resolve(performance.now() - start);
            } else {
                setTimeout(check, 1);
            }
        };
        check();
    });
    const files = performance.getEntriesByType("resource").filter(
        e => e.name.includes("/file=") && e.startTime >= start);
    return {total: total,
            result: Math.min(...files.map(e => e.startTime)) - start,
            files: Math.max(...files.map(e => e.responseEnd)) - start};
}"""


def browser_ms(url, picture, images, warmup, repeats):
    """Medians (ms) of a Run click in headless Chromium until: `images` new gallery images shown
    (total), the page asked for the first result file (result), the last file arrived (files)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(picture)
            page.locator("#input_image img").first.wait_for(state="visible", timeout=60_000)
            runs = [page.evaluate(_RUN_ONCE, images) for _ in range(warmup + repeats)][warmup:]
        finally:
            browser.close()
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def raw_request(http, url, picture, values):
    """A function making one /process request of the demo at `url` as plain HTTP on the client
    `http`: POST, then its event stream until "complete". The picture is uploaded once, here."""
    with open(picture, "rb") as f:
        uploaded = http.post(url + "gradio_api/upload", files={"files": f}).json()
    payload = {"data": [{"path": uploaded[0], "meta": {"_type": "gradio.FileData"}}] + values}

    def request():
        event = http.post(url + "gradio_api/call/process", json=payload).json()["event_id"]
        with http.stream("GET", url + f"gradio_api/call/process/{event}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: complete"):
                    return
                if line.startswith("event: error"):
                    raise RuntimeError("the request failed")
        raise RuntimeError("the event stream ended without a result")
    return request


def median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--browser", action="store_true",
                    help=f"also time the page in headless Chromium ({CHROMIUM}, playwright)")
    args = ap.parse_args(argv)

    import httpx
    from gradio_client import Client, handle_file
    from PIL import Image

    import gradio_canny2image as app
    from runtime.sample import sample_image

    pipeline = StandIn(args.size, args.samples)
    values = dict(prompt="a house", a_prompt=app.A_PROMPT, n_prompt=app.N_PROMPT,
                  num_samples=args.samples, image_resolution=args.size, ddim_steps=20,
                  guess_mode=False, strength=1.0, scale=9.0, seed=1, eta=0.0, low_threshold=100,
                  high_threshold=200)
    order = ("prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps",
             "guess_mode", "strength", "scale", "seed", "eta", "low_threshold", "high_threshold")
    image = sample_image(args.size, args.size)
    process, _ = app.make_process([pipeline])
    result = {"size": args.size, "samples": args.samples, "repeats": args.repeats,
              "python": platform.python_version(), "cpu": platform.processor() or "cpu",
              "cpus": os.cpu_count()}

    def direct():
        return asyncio.run(process(image, *(values[k] for k in order),
                                   progress=lambda *a, **k: None))
    paths = direct()
    if not (isinstance(paths, list) and len(paths) == args.samples + 1
            and all(os.path.exists(p) for p in paths)):
        raise SystemExit(f"error: the direct call returned {paths!r}, not "
                         f"{args.samples + 1} PNG files")
    result["direct_ms"] = median_ms(direct, args.warmup, args.repeats)
    result["png_ms"] = median_ms(lambda: app.save_results(pipeline.images), args.warmup,
                                 args.repeats)
    demo = app.create_demo([pipeline])
    _, url, _ = app.launch(demo, server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "in.png")
            Image.fromarray(image).save(path)
            client = Client(url, verbose=False)
            file = handle_file(path)
            result["client_ms"] = median_ms(
                lambda: client.predict(file, *(values[k] for k in order), api_name="/process"),
                args.warmup, args.repeats)
            # the raw API: the upload once, then POST + event stream per request, on one HTTP
            # client (a new httpx client per call costs ~35 ms here, for its SSL context)
            http = httpx.Client(timeout=60)
            raw = raw_request(http, url, path, [values[k] for k in order])
            result["raw_ms"] = median_ms(raw, args.warmup, args.repeats)
            if args.browser:
                times = browser_ms(url, path, args.samples + 1, args.warmup, args.repeats)
                result["browser_ms"] = times["total"]
                result["browser_result_ms"] = times["result"]
                result["browser_files_ms"] = times["files"]
    finally:
        demo.close()
    # the web path: what a request over plain HTTP adds to the call it wraps; gradio_client's
    # own work (its threads, polling and file download) comes on top of that
    result["web_path_ms"] = result["raw_ms"] - result["direct_ms"]
    result["client_overhead_ms"] = result["client_ms"] - result["direct_ms"]
    if args.browser:
        result["browser_web_path_ms"] = result["browser_ms"] - result["direct_ms"]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
