"""The canny2image demo (upstream's gradio_canny2image.py) on Gradio 6.

Same page as upstream: title, input image, Prompt, Run, a closed "Advanced options" accordion with
the twelve controls (labels, ranges, steps and defaults of spec §4.10) and a 2-column gallery with
the inverted edge map followed by the samples. Differences, each on purpose:

* binds 127.0.0.1 unless --listen (upstream always bound 0.0.0.0); analytics off;
* without a checkpoint it still starts (random weights) and says so in a banner on the page;
* the page is served as soon as the flags are checked: the model is built and warmed up behind
  it (Startup), the page says so, and requests sent meanwhile wait and then run;
* a progress bar over the DDIM steps; one queue worker per GPU (one model replica each);
* bad input (no image, unreadable or oversized files, values of the wrong type or out of range
  sent through the API, server paths or URLs named as the image) gets a short message instead of
  a traceback, and the server keeps serving; the rules are runtime/inputs.py's (the CLI's and
  the API's too), the image size is checked on the header before decoding;
* uploads are limited to MAX_UPLOAD_BYTES, and Gradio's cache is cleaned (DELETE_CACHE); from
  the command line it is a folder of this process, removed at exit, SIGTERM and SIGHUP;
* runtime/web_guard.py in front of every route: foreign Host (DNS rebinding) and Origin get 403,
  bounds per request (413/411), unknown API names, handler/component numbers, ids: 404;
* a cancelled request, or one whose client closed its event stream, stops at the next DDIM step.

Run `python gradio_canny2image.py --help` for the flags.
"""
import os
import sys

# Read when gradio is imported: without it Gradio phones home at launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# Run as a script: fast mode's kernel precompile starts now, before the imports below (~5 s of
# gradio and torch) rather than after them (runtime/early.py; the installed command does the
# same in runtime/launch.py).
if __name__ == "__main__":
    from runtime import early as _early
    EARLY = _early.spawn(sys.argv[1:])

import argparse  # noqa: E402
import asyncio  # noqa: E402
import atexit  # noqa: E402
import errno  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import OrderedDict  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from typing import NamedTuple, Optional  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from gradio.exceptions import InvalidPathError  # noqa: E402
from gradio_client.utils import is_http_url_like  # noqa: E402

from cldm.model import DEFAULT_CHECKPOINT, CheckpointError, check_checkpoint_path  # noqa: E402
from runtime import app, web_guard  # noqa: E402
from runtime.errors import (Cancelled, InputError, NonFiniteOutputError,  # noqa: E402
                            device_out_of_memory)
from runtime.inputs import (  # noqa: E402
    A_PROMPT, DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, DEFAULT_RESOLUTION, DEFAULT_SCALE,
    DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_UPLOAD_BYTES, MODES, N_PROMPT, check_inputs, pil_to_array,
    read_image)

log = logging.getLogger("gradio_canny2image")

CKPT_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"

TITLE = "## Control Stable Diffusion with Canny Edge Maps"
OOM_MESSAGE = "Out of GPU memory: try fewer images or a lower resolution"
OUT_OF_MEMORY = device_out_of_memory()
# Gradio's cache (uploads, results): every 10 minutes, files older than an hour are deleted; all
# of them when the server stops.
DELETE_CACHE = (600, 3600)
UPLOAD_ONLY = ("The image must be a file uploaded to this demo (the page does it, or POST it to "
               "/gradio_api/upload first): server paths and URLs are not read.")


class _PipelinePool:
    """One pipeline per queue worker, so no two requests ever share a model at the same time
    (Canny2Image would make them wait on its model's lock). The seeded noise does not depend on
    what runs at the same time on other GPUs (runtime/seed.py's RNG_LOCK). Requests wait for the
    start-up (Startup.ready) before they take a pipeline."""

    def __init__(self, startup):
        self.size = startup.workers
        self._startup = startup
        self._free = None
        self._lock = threading.Lock()

    def acquire(self):
        self._startup.ready.wait()
        if self._startup.error is not None:
            raise _error(f"The demo could not start: {self._startup.error}")
        with self._lock:
            if self._free is None:
                self._free = queue.Queue()
                for p in self._startup.pipelines:
                    self._free.put(p)
        return self._free.get()

    def release(self, pipeline):
        self._free.put(pipeline)


def _error(message):
    return gr.Error(message, print_exception=False)


class UploadImage(gr.Image):
    """gr.Image whose upload is decoded by runtime/inputs.py's read_image, the CLI's and the API's
    reader too (Gradio's own rule for type="numpy": upright by EXIF, 8-bit RGB, alpha dropped;
    the size checked on the header before anything is decoded), with its one-line messages
    (Gradio's own is a bare "Error").

    `is_template` is Gradio's mechanism (gr.ClearButton uses it) for a subclass that keeps the
    parent's front-end component.
    """
    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is None or not _inside(payload.path, self.GRADIO_CACHE):
            raise _error(UPLOAD_ONLY)       # also data: URLs, which Gradio would decode
        try:
            return read_image(payload.path)
        except InputError as e:
            log.info("unreadable upload: %s", e)
            raise _error(_labelled(e) + ".") from None

    async def async_move_resource_to_block_cache(self, url_or_file_path):
        # Gradio would download a URL named as the image (from the server: never wanted here)
        if is_http_url_like(str(url_or_file_path)):
            raise _error(UPLOAD_ONLY)
        return await super().async_move_resource_to_block_cache(url_or_file_path)


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


class CheckedBlocks(gr.Blocks):
    """gr.Blocks whose API requests get a clear message for values of the wrong type (a string
    for a slider, null, a list, a server path as the image), before Gradio's own processing turns
    them into a traceback in the server log and {"error": null} for the caller."""

    def validate_inputs(self, block_fn, inputs):
        """One line for a wrong number of values (Gradio's lists object reprs and the values,
        server paths included, and lets extra values pass)."""
        if len(inputs) != len(block_fn.inputs):
            names = ", ".join(b.label or type(b).__name__ for b in block_fn.inputs)
            raise _error(f"This API takes {len(block_fn.inputs)} values ({names}), got "
                         f"{len(inputs)}.")

    async def preprocess_data(self, block_fn, inputs, *args, **kwargs):
        self.validate_inputs(block_fn, inputs)
        for block, value in zip(block_fn.inputs, inputs):
            _check_payload(block, value)
        try:
            return await super().preprocess_data(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except InvalidPathError:
            raise _error(UPLOAD_ONLY) from None
        except Exception as e:                    # e.g. a malformed file object: no traceback
            log.info("unreadable request: %s", e)
            raise _error("The request holds a value this demo cannot read (see /?view=api for "
                         "the expected types).") from None


def _check_payload(block, value):
    """Raise gr.Error unless `value` has the type `block` takes from the API."""
    label = block.label or type(block).__name__
    if isinstance(block, (gr.Slider, gr.Number)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(f"{label} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise _error(f"{label} must be a finite number, got {value!r}.")
        # Gradio checks the range too, but prints a traceback for each refusal
        if block.minimum is not None and value < block.minimum:
            raise _error(f"{label}: value {value} is less than minimum value {block.minimum}.")
        if block.maximum is not None and value > block.maximum:
            raise _error(f"{label}: value {value} is greater than maximum value {block.maximum}.")
    elif isinstance(block, gr.Checkbox) and not isinstance(value, bool):
        raise _error(f"{label} must be true or false, got {value!r}.")
    elif isinstance(block, gr.Textbox) and not isinstance(value, str):
        raise _error(f"{label} must be text, got {value!r}.")
    elif isinstance(block, gr.Image) and value is not None:
        # Without Gradio's file marker, Gradio would pass any server path through unchecked.
        meta = value.get("meta") if isinstance(value, dict) else None
        path = value.get("path") if isinstance(value, dict) else None
        if (not isinstance(path, str) or is_http_url_like(path) or not isinstance(meta, dict)
                or meta.get("_type") != "gradio.FileData"):
            raise _error(UPLOAD_ONLY)


def _labelled(error):
    """runtime's message with the parameter's name (n_prompt) replaced by its label."""
    message = str(error)
    name = message.split(" ", 1)[0]
    if name in LABELS:
        return LABELS[name] + message[len(name):]
    return message[:1].upper() + message[1:]


def image_to_array(image):
    """The uploaded image (UploadImage has decoded it) for the pipeline, or InputError; a PIL
    image (process called directly) is converted by the same rule (runtime.inputs)."""
    if image is None:
        raise InputError("No input image: upload an image first.")
    if isinstance(image, PIL.Image.Image):
        return pil_to_array(image)
    return image


# The labels of the 13 values after the image (upstream's), used in messages.
LABELS = dict(prompt="Prompt", a_prompt="Added Prompt", n_prompt="Negative Prompt",
              num_samples="Images", image_resolution="Image Resolution", ddim_steps="Steps",
              guess_mode="Guess Mode", strength="Control Strength", scale="Guidance Scale",
              seed="Seed", eta="eta (DDIM)", low_threshold="Canny low threshold",
              high_threshold="Canny high threshold")
# minimum, maximum of the UI's sliders (spec §4.10; Gradio refuses API values outside them);
# runtime/inputs.py's check_inputs then applies the rules every caller shares.
SLIDER_RANGES = {
    "num_samples": (1, 12),
    "image_resolution": (256, 768),
    "strength": (0.0, 2.0),
    "low_threshold": (1, 255),
    "high_threshold": (1, 255),
    "ddim_steps": (1, 100),
    "scale": (0.1, 30.0),
    "seed": (-1, 2147483647),
}
ORDER = ("prompt", "a_prompt", "n_prompt", "num_samples", "image_resolution", "ddim_steps",
         "guess_mode", "strength", "scale", "seed", "eta", "low_threshold", "high_threshold")


# ---------------------------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------------------------

def _device_of(pipeline):
    model = getattr(pipeline, "model", None)
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


# How often a running request looks whether its client is still there (closed event stream).
CLIENT_POLL_SECONDS = 0.25


def _client_gone():
    """True once Gradio has given up this request's event (its client closed the event stream).
    Gradio 6 only marks the event (Event.alive, which Progress's lookup uses too); a plain
    function would run on to the end."""
    from gradio.context import LocalContext

    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    if blocks is None or event_id is None:
        return False
    for job in blocks._queue.active_jobs:
        for event in job or ():
            if event._id == event_id:
                return not event.alive
    return False


def _retrieve(future):
    if not future.cancelled():
        future.exception()          # an abandoned run's error: no "never retrieved" log


def make_process(pipelines=None, startup=None):
    """The function the Run button calls: the 14 UI inputs → gallery images, or a gr.Error, and
    the number of queue workers. `pipelines`: ready now; or `startup`: a Startup, whose pipelines
    requests wait for.

    It is a coroutine that runs the work in a thread: when Gradio cancels the request (the Stop
    button, /cancel) or its client closes the event stream, it sets the run's cancel event, and
    the pipeline stops at its next DDIM step and goes back to the pool."""
    pool = _PipelinePool(startup or Startup.given(pipelines))
    infos = RequestInfos()

    async def process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                      ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                      high_threshold, progress=gr.Progress(), request: gr.Request = None):
        cancel = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(
            run, input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
            ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold,
            progress, request, cancel))
        work.add_done_callback(_retrieve)
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=CLIENT_POLL_SECONDS)
                if not work.done() and not cancel.is_set() and _client_gone():
                    log.info("the client left: stopping its request at the next step")
                    cancel.set()
            return work.result()
        except asyncio.CancelledError:
            cancel.set()
            raise

    def run(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
            guess_mode, strength, scale, seed, eta, low_threshold, high_threshold, progress,
            request, cancel):
        start = time.perf_counter()
        try:
            checked = check_inputs(image_to_array(input_image), prompt, a_prompt, n_prompt,
                                   num_samples, image_resolution, ddim_steps, guess_mode,
                                   strength, scale, seed, eta, low_threshold, high_threshold)
        except InputError as e:
            raise _error(_labelled(e)) from None
        img, args = checked[0], dict(zip(ORDER, checked[1:]))

        def on_step(step, total=None):
            total = total or args["ddim_steps"]
            progress((step, total), desc="DDIM sampling", unit="steps")

        out_of_memory = False
        pipeline = pool.acquire()
        try:
            device = _device_of(pipeline)
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                progress((0, args["ddim_steps"]), desc="DDIM sampling", unit="steps")
                images = pipeline.process(img, progress=on_step, cancel=cancel, **args)
            paths = save_results(images)
            infos.put(request, describe_request(pipeline, images, time.perf_counter() - start))
            return paths
        except gr.Error:
            raise
        except Cancelled as e:
            log.info("request %s", e)
            raise _error("The request was cancelled.") from None
        except OUT_OF_MEMORY:
            log.warning("out of GPU memory (%d images at %d px)", args["num_samples"],
                        args["image_resolution"])
            out_of_memory = True      # freed below, once this frame no longer holds the traceback
        except (InputError, CheckpointError, NonFiniteOutputError, ValueError) as e:
            raise _error(_labelled(e)) from None
        except MemoryError:
            log.warning("out of host memory (%d images at %d px)", args["num_samples"],
                        args["image_resolution"])
            raise _error("Out of memory: try fewer images or a lower resolution.") from None
        except Exception:
            log.exception("process() failed")
            raise _error("Generation failed with an internal error (details are in the server "
                         "log). Please try again.") from None
        finally:
            pool.release(pipeline)
        if out_of_memory:
            gc.collect()
            torch.cuda.empty_cache()
            raise _error(OOM_MESSAGE)

    process.infos = infos
    return process, pool.size


# ---------------------------------------------------------------------------------------------
# Results, the line under the gallery, warm-up
# ---------------------------------------------------------------------------------------------

# zlib level 1 instead of PIL's default 6: a 512² photo-like image encodes ~5x faster (77 vs
# 412 ms on a busy 2-core CPU) for a ~30 % larger file, and lossless all the same. The files go
# straight into Gradio's cache folder, so Gradio neither re-encodes, hashes nor copies them.
PNG_COMPRESS_LEVEL = 1
_SAVERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="png")   # zlib releases the GIL


def save_results(images):
    """Write the gallery's images as PNGs into a new folder of Gradio's cache; their paths."""
    folder = os.path.join(gr.utils.get_upload_folder(), "results", uuid.uuid4().hex)
    os.makedirs(folder)

    def save(item):
        index, image = item
        path = os.path.join(folder, f"{index}.png")
        PIL.Image.fromarray(np.asarray(image)).save(path, compress_level=PNG_COMPRESS_LEVEL)
        return path
    return list(_SAVERS.map(save, enumerate(images)))


def describe_device(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return "CPU"


def describe_request(pipeline, images, seconds):
    """The line under the gallery: how long the request took, where and in which mode."""
    from runtime import lowvram

    samples = max(len(images) - 1, 0)              # the first image is the edge map
    height, width = np.asarray(images[0]).shape[:2] if images else (0, 0)
    mode = getattr(pipeline, "mode", "?") + (", low-VRAM" if lowvram.enabled() else "")
    return (f"{samples} image{'s' if samples != 1 else ''} at {width}×{height} in "
            f"{seconds:.2f} s · {describe_device(_device_of(pipeline))} · {mode} mode")


class RequestInfos:
    """The last request's line per browser session, for the event that shows it."""
    MAX_SESSIONS = 256           # API clients never fetch theirs: keep only the newest

    def __init__(self):
        self._lines, self._lock = OrderedDict(), threading.Lock()

    def put(self, request, line):
        with self._lock:
            self._lines[getattr(request, "session_hash", None)] = line
            while len(self._lines) > self.MAX_SESSIONS:
                self._lines.popitem(last=False)

    def pop(self, request: gr.Request = None):
        with self._lock:
            return self._lines.pop(getattr(request, "session_hash", None), "")


def warm_up(pipelines):
    """One request of the default shape (512², 1 image, 20 steps) per GPU pipeline, all at once
    (a thread each): kernels compile and graphs are captured now, so the first user request is
    as fast as the second. Pipelines on the CPU have nothing to warm up."""
    from runtime.sample import sample_image

    todo = [p for p in pipelines if _device_of(p).type != "cpu"]
    if not todo:
        return 0.0
    start = time.perf_counter()
    resolution, steps = DEFAULT_RESOLUTION, DEFAULT_STEPS
    image = sample_image(resolution, resolution)
    log.info("warming up %d pipeline(s): %dx%d, 1 image, %d steps (compiles kernels, captures "
             "graphs) ...", len(todo), resolution, resolution, steps)

    def one(pipeline):
        device = _device_of(pipeline)

        def progress(done, total):
            if done == 1 or done == total:
                log.info("warm-up on %s: step %d/%d at %.1f s", device, done, total,
                         time.perf_counter() - start)
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            pipeline.process(image, prompt="", a_prompt=A_PROMPT, n_prompt=N_PROMPT,
                             num_samples=1, image_resolution=resolution, ddim_steps=steps,
                             guess_mode=False, strength=DEFAULT_STRENGTH, scale=DEFAULT_SCALE,
                             seed=0, eta=0.0, low_threshold=DEFAULT_LOW_THRESHOLD,
                             high_threshold=DEFAULT_HIGH_THRESHOLD, progress=progress)
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        list(pool.map(one, todo))
    seconds = time.perf_counter() - start
    log.info("warm-up done in %.1f s: ready", seconds)
    return seconds


LOADING = "**Loading the model…**: a request sent now waits for it and then runs."
WARMING_UP = ("**Warming up…** (compiling kernels, capturing graphs): a request sent now waits "
              "for it and then runs.")


class Startup:
    """The pipelines, built and warmed up in a background thread while the page is already served
    (or given ready-made). Requests wait for `ready` (the pipeline pool does) and the page shows
    `status()` until then. A failed build sets `error` (one line; main() stops the demo with it);
    a failed warm-up is logged and requests run without it (they then pay the compilation)."""

    def __init__(self, build, workers, warm=True):
        """`build()` → (pipelines, precompiling): the pipelines and app.start_precompile's handle
        (or None), waited for before the warm-up. `workers`: how many pipelines it builds."""
        self.workers, self._build, self._warm = workers, build, warm
        self.built, self.ready = threading.Event(), threading.Event()
        self.pipelines = self.error = self.seconds = None
        self._thread = threading.Thread(target=self._run, name="start-up", daemon=True)

    @classmethod
    def given(cls, pipelines, precompiling=None, warm=False):
        """Pipelines built already; without a warm-up they are ready at once."""
        pipelines = list(pipelines) if isinstance(pipelines, (list, tuple)) else [pipelines]
        startup = cls(lambda: (pipelines, precompiling), len(pipelines), warm)
        if not warm:
            startup._run()
        return startup

    def start(self):
        self._thread.start()
        return self

    def busy(self):
        """Whether the start-up thread is still building or warming up."""
        return self._thread.is_alive()

    def _run(self):
        try:
            self.pipelines, precompiling = self._build()
        except BaseException as e:
            self.error = startup_error(e)
            self.built.set()
            self.ready.set()
            return
        self.built.set()
        try:
            if self._warm:
                if precompiling is not None:
                    log.info("%s", precompiling.wait())
                self.seconds = warm_up(self.pipelines)
        except Exception:
            log.exception("warm-up failed: requests run without it")
        finally:
            self.ready.set()

    def status(self):
        """The line shown on the page: what the start-up is doing, its error, or nothing."""
        if self.error is not None:
            return f"**The demo could not start:** {self.error}"
        if not self.built.is_set():
            return LOADING
        return "" if self.ready.is_set() else WARMING_UP


def startup_error(e):
    """One line for an exception of the model build (SystemExit's own text as it is)."""
    if isinstance(e, SystemExit):
        return str(e.code).removeprefix("error: ")
    if isinstance(e, (app.AppError, InputError, CheckpointError)):
        return str(e)
    if isinstance(e, OUT_OF_MEMORY):
        return "out of GPU memory while loading the model"
    if isinstance(e, MemoryError):
        return "out of host memory while loading the model"
    if os.environ.get("CANNY2IMAGE_DEBUG"):
        log.error("the model build failed", exc_info=e)
    return (f"the model build failed ({type(e).__name__}: {e}) (set CANNY2IMAGE_DEBUG=1 for the "
            f"traceback)")


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def create_demo(pipeline=None, banner=None, startup=None):
    """Build the page. `pipeline`: a Canny2Image, or a list of them (one queue worker each), ready
    now; or `startup`: a Startup, whose status the page shows until it is ready (requests wait
    for it)."""
    process, workers = make_process(pipeline, startup)
    r = SLIDER_RANGES
    with CheckedBlocks(title="ControlNet canny2image", delete_cache=DELETE_CACHE) as demo:
        with gr.Row():
            gr.Markdown(TITLE)
        if banner:
            with gr.Row():
                gr.Markdown(banner, elem_id="weights-banner")
        if startup is not None:
            with gr.Row():
                status = gr.Markdown(startup.status(), elem_id="warm-up")
            # refreshed on page load and every second until the start-up is over (then the timer
            # stops); no concurrency limit, so it never waits behind a generation
            timer = gr.Timer(1.0, active=bool(startup.status()))

            def tick():
                text = startup.status()
                return text, gr.Timer(active=bool(text) and startup.error is None)
            for event in (timer.tick, demo.load):
                event(tick, outputs=[status, timer], concurrency_limit=None,
                      show_progress="hidden", api_visibility="private")
        with gr.Row():
            with gr.Column():
                # numpy RGB uint8, decoded by runtime.inputs.read_image (the CLI's reader)
                input_image = UploadImage(sources=["upload"], type="numpy",
                                          label="Image", elem_id="input_image")
                prompt = gr.Textbox(label="Prompt")
                run_button = gr.Button("Run")
                with gr.Accordion("Advanced options", open=False):
                    num_samples = gr.Slider(label="Images", minimum=r["num_samples"][0],
                                            maximum=r["num_samples"][1], value=1, step=1)
                    image_resolution = gr.Slider(
                        label="Image Resolution", minimum=r["image_resolution"][0],
                        maximum=r["image_resolution"][1], value=DEFAULT_RESOLUTION, step=64)
                    strength = gr.Slider(label="Control Strength", minimum=r["strength"][0],
                                         maximum=r["strength"][1], value=DEFAULT_STRENGTH,
                                         step=0.01)
                    guess_mode = gr.Checkbox(label="Guess Mode", value=False)
                    low_threshold = gr.Slider(label="Canny low threshold",
                                              minimum=r["low_threshold"][0],
                                              maximum=r["low_threshold"][1],
                                              value=DEFAULT_LOW_THRESHOLD, step=1)
                    high_threshold = gr.Slider(label="Canny high threshold",
                                               minimum=r["high_threshold"][0],
                                               maximum=r["high_threshold"][1],
                                               value=DEFAULT_HIGH_THRESHOLD, step=1)
                    ddim_steps = gr.Slider(label="Steps", minimum=r["ddim_steps"][0],
                                           maximum=r["ddim_steps"][1], value=DEFAULT_STEPS, step=1)
                    scale = gr.Slider(label="Guidance Scale", minimum=r["scale"][0],
                                      maximum=r["scale"][1], value=DEFAULT_SCALE, step=0.1)
                    seed = gr.Slider(label="Seed", minimum=r["seed"][0], maximum=r["seed"][1],
                                     step=1, randomize=True)
                    eta = gr.Number(label="eta (DDIM)", value=0.0)
                    a_prompt = gr.Textbox(label="Added Prompt", value=A_PROMPT)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=N_PROMPT)
            with gr.Column():
                # png: the gallery's default (webp) would alter the pixels. Upstream's
                # height="auto" grew with the images; Gradio 6's "auto" caps it at 55% of the
                # window and scrolls, CSS max-content grows as before. "contain": whole images, not
                # square crops of them.
                result_gallery = gr.Gallery(label="Output", show_label=False, elem_id="gallery",
                                            columns=2, height="max-content", object_fit="contain",
                                            format="png")
                result_info = gr.Markdown(elem_id="request-info")
        inputs = [input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                  ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold,
                  high_threshold]
        run_button.click(fn=process, inputs=inputs, outputs=[result_gallery],
                         api_name="process").then(fn=process.infos.pop, outputs=[result_info],
                                                  api_visibility="private")
    demo.queue(default_concurrency_limit=workers)
    return demo


# One upload request: one image at the upload limit plus the multipart framing; files per request.
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 1_000_000
MAX_REQUEST_FILES = 4


def launch(demo, server_name="127.0.0.1", server_port=7860, allowed_hosts=(), share=False,
           **kwargs):
    """demo.launch behind runtime/web_guard.py (Host and Origin checks for 127.0.0.1, localhost,
    [::1], the bind address and `allowed_hosts`; any IP address when bound to all of them; bounds
    per request) and with the upload limit (runtime/inputs.py's MAX_UPLOAD_BYTES, fitted to the
    pixel limit); returns what launch returns. Server-side rendering and static workers stay off:
    they would answer from outside the guard."""
    hosts = [*allowed_hosts, server_name] + ([".gradio.live"] if share else [])
    guard = web_guard.install(hosts=hosts, any_ip=server_name in web_guard.ANY_ADDRESS,
                              max_body=MAX_REQUEST_BYTES, max_files=MAX_REQUEST_FILES,
                              check=lambda asgi, scope: unknown_route(asgi.get_blocks(), scope),
                              body_check=lambda asgi, scope, body: unknown_handler(
                                  asgi.get_blocks(), scope, body),
                              body_paths=["/gradio_api/queue/join",
                                          "/gradio_api/component_server",
                                          "/gradio_api/component_server/"])
    return demo.launch(server_name=server_name, server_port=server_port, share=share,
                       max_file_size=MAX_UPLOAD_BYTES, app_kwargs={"lifespan": guard},
                       ssr_mode=False, num_workers=0, **kwargs)


def unknown_route(blocks, scope):
    """(404, one line) for an API name, event id or session id that `blocks` does not know, as
    Gradio would find out only after starting its answer (a 500 or a broken event stream, and a
    traceback in the server log); None otherwise. Mirrors Gradio 6's lookups in its routes."""
    parts = scope["path"].split("/")[1:]
    if parts[:1] != ["gradio_api"]:
        return None
    parts = [p for p in parts[1:] if p]
    queue, method = blocks._queue, scope["method"]
    if parts == ["queue", "data"] and method == "GET":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        session = query.get("session_hash", [None])[0]
        if session is not None and session not in queue.pending_messages_per_session:
            return 404, "Unknown session id (its events have ended, or it never existed)"
        return None
    if parts[:2] == ["call", "v2"]:
        parts = parts[:1] + parts[2:]
    if len(parts) < 2 or parts[0] not in ("call", "run", "api"):
        return None
    names = {fn.api_name for fn in blocks.fns.values() if fn.api_name}
    if parts[1] not in names:
        return 404, f"No API named /{parts[1]} (see /?view=api)"
    if parts[0] == "call" and len(parts) == 3 and method == "GET":
        event_id = parts[2]
        event = queue.event_ids_to_events.get(event_id)
        session = event.session_hash if event is not None else next(
            (s for s, ids in queue.pending_event_ids_session.items() if event_id in ids),
            event_id)
        if session not in queue.pending_messages_per_session:
            return 404, "Unknown event id (its result was already read, or it never existed)"
    return None


def unknown_handler(blocks, scope, body):
    """(404, one line) for a JSON body naming an event handler (/queue/join's fn_index) or a
    component (/component_server's component_id) that `blocks` does not have (Gradio: KeyError, a
    500 and a traceback); None otherwise (Gradio answers)."""
    try:
        body = json.loads(body)
    except ValueError:
        return None
    join = scope["path"].endswith("/queue/join")
    key, known = ("fn_index", blocks.fns) if join else ("component_id", blocks.blocks)
    number = body.get(key) if isinstance(body, dict) else None
    if isinstance(number, int) and not isinstance(number, bool) and number not in known:
        what = "event handler" if join else "component"
        return 404, f"No {what} number {number} (see /?view=api for the API)"
    return None


# ---------------------------------------------------------------------------------------------
# Startup
# ---------------------------------------------------------------------------------------------

def no_checkpoint_banner():
    return ("### ⚠️ No checkpoint: running with random weights, so every image is noise.\n"
            f"Place `{os.path.basename(DEFAULT_CHECKPOINT)}` at `{DEFAULT_CHECKPOINT}` (download "
            f"it from {CKPT_URL}) and restart, or pass `--ckpt PATH`.")


def parse_args(argv=None, prog="gradio_canny2image.py"):
    """The demo's flags; `prog`: its name in usage and error lines (the installed command's own)."""
    from runtime.cli import Parser, add_model_flags
    p = Parser(
        prog=prog,
        description="ControlNet canny2image demo (Gradio). Opens on http://127.0.0.1:7860.")
    add_model_flags(p)
    p.add_argument("--device", default="auto",
                   help="auto (every visible GPU, else CPU), cpu, cuda (every GPU) or cuda:N")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="reference: upstream-exact fp32; fast: the fast runtime (GPU only). "
                        "Default: fast on a GPU (with --low-vram too), else reference")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the start-up request of the default shape on each GPU (then the "
                        "first request pays for compiling kernels and capturing graphs)")
    p.add_argument("--port", type=_port, default=7860)
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0 (reachable from other machines); default 127.0.0.1 only")
    p.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names the demo may be opened as, besides "
                        "127.0.0.1, localhost and [::1] (requests naming any other Host are "
                        "refused, against DNS rebinding)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    return p.parse_args(argv)


def _port(text):
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use 1..65535")
    return port


def _devices(spec):
    """The devices to serve on (one pipeline each) for --device, or SystemExit with one line."""
    if spec == "cuda" or (spec == "auto" and torch.cuda.is_available()):   # every GPU
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise SystemExit("error: --device cuda: no GPU is visible to torch")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        return [str(app.pick_device(spec))]
    except app.AppError as e:
        raise SystemExit(f"error: {e}") from None


class Plan(NamedTuple):
    """What the flags decide before any model is built (plan_pipelines)."""
    devices: list
    mode: str
    ckpt: Optional[str]
    random_weights: bool
    banner: Optional[str]


def plan_pipelines(args):
    """The Plan (devices, mode, ckpt, random_weights, banner) from the parsed flags, at once (no
    model is built): a wrong device or mode (SystemExit) or a checkpoint that is not a readable file
    (CheckpointError) end the demo with one line before the page is served.
    Without a checkpoint the demo still starts, on random weights, and the banner says so."""
    devices = _devices(args.device)
    mode = args.mode or app.default_mode(devices[0])
    if mode == "fast" and not devices[0].startswith("cuda"):
        raise SystemExit("error: --mode fast needs a GPU: use --mode reference on the CPU")
    banner = ckpt = None
    random_weights = args.random_weights
    if args.tiny:
        banner = "Tiny model with random weights (`--tiny`): a smoke test, outputs are noise."
    elif args.random_weights:
        banner = "Random weights (`--random-weights`): outputs are noise."
    else:
        ckpt = args.ckpt or app.find_checkpoint()
        if ckpt is None:
            random_weights = True
            banner = no_checkpoint_banner()
            log.warning("no checkpoint at %s: starting with random weights (images are noise). "
                        "Download it from %s", DEFAULT_CHECKPOINT, CKPT_URL)
        else:
            check_checkpoint_path(ckpt)           # missing, a folder, unreadable: at once
    return Plan(devices, mode, ckpt, random_weights, banner)


def build_pipelines(args, early=None, plan=None):
    """(pipelines, banner, precompiling): the pipelines (one per device, built by runtime/app.py),
    the banner to show, and fast mode's kernel precompile for the warm-up's shape, started before
    the build (app.start_precompile; None if none), from the parsed flags (and their
    plan_pipelines, if made already). `early`: runtime/early.py's waiting precompile child, which
    gets the precompile's job (the caller discards it on an error before)."""
    devices, mode, ckpt, random_weights, banner = plan or plan_pipelines(args)
    precompiling = app.start_precompile(devices[0], mode, (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION, 1),
                                        tiny=args.tiny, early=early)
    pipelines = []
    try:
        for device in devices:
            log.info("building the %s model on %s (%s)", "tiny" if args.tiny else "full-size",
                     device, ckpt or "random weights")
            pipelines.append(app.build_pipeline(device, mode=mode, tiny=args.tiny, ckpt=ckpt,
                                                random_weights=random_weights,
                                                low_vram=args.low_vram))
    except BaseException:
        if precompiling is not None:
            precompiling.cancel()
        raise
    log.info("mode: %s, %d queue worker(s)", pipelines[0].mode, len(pipelines))
    return pipelines, banner, precompiling


def check_port(host, port):
    """SystemExit with one line unless `port` can be listened on (Gradio would say "Cannot find
    empty port" for a port below 1024 as much as for one in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)       # as uvicorn does
        try:
            s.bind((host, port))
        except PermissionError:
            raise SystemExit(f"error: no permission to listen on port {port} (ports below 1024 "
                             f"need root): use --port 7860 or another port from 1024 up") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SystemExit(f"error: port {port} is in use by another program: pick a free "
                                 f"one with --port") from None
            raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}") from None


def own_cache_folder():
    """A folder of this process for Gradio's uploads and results (inside GRADIO_TEMP_DIR if set,
    else the system's temp folder), made GRADIO_TEMP_DIR; its path."""
    folder = tempfile.mkdtemp(prefix="canny2image-demo-", dir=os.environ.get("GRADIO_TEMP_DIR"))
    os.environ["GRADIO_TEMP_DIR"] = folder
    return folder


# Folders removed at exit (clean_on_exit); a stop that outlasts STOP_GRACE_S removes them itself.
_CLEANUP = []
STOP_GRACE_S = 10.0


def clean_on_exit(folder):
    """Remove `folder` when the process ends: normally, on Ctrl-C, and on SIGTERM or SIGHUP
    (which would otherwise end Python without any clean-up)."""
    _CLEANUP.append(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)

    def stop(signum, frame):
        log.info("%s: stopping; removing %s", signal.Signals(signum).name, folder)
        raise SystemExit(0)           # unwinds launch(); atexit removes the folder
    for name in ("SIGTERM", "SIGHUP"):           # no SIGHUP on Windows
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def main(argv=None, early=None, exiting=False, prog="gradio_canny2image.py"):
    """Start the demo; every start-up error ends in one line and exit status 1. The page is
    served as soon as the flags are checked; the model is built and warmed up behind it
    (Startup), and a failed build stops the demo with its line. `early`: the kernel precompile
    child spawned before the imports (runtime/early.py). `exiting`: the process ends when main
    returns (the script, the installed command), so a stop that hangs is cut short (stop).
    `prog`: the program's name in usage and error lines."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(argv, prog)
        host = "0.0.0.0" if args.listen else "127.0.0.1"
        check_port(host, args.port)                   # at once, not after the model is built
        plan = plan_pipelines(args)
    except BaseException as e:
        if early is not None:
            early.discard()
        if isinstance(e, (app.AppError, InputError, CheckpointError)):
            raise SystemExit(f"error: {e}") from None
        raise

    def build():
        try:
            pipelines, _, precompiling = build_pipelines(args, early, plan)
        finally:
            if early is not None:
                early.discard()   # a no-op once it has its job
        return pipelines, precompiling
    # The build starts first and runs while the page is made and served.
    startup = Startup(build, workers=len(plan.devices), warm=not args.no_warmup).start()
    demo = None
    try:
        try:
            clean_on_exit(own_cache_folder())     # before the page: Gradio reads it then
            demo = create_demo(banner=plan.banner, startup=startup)
            launch(demo, server_name=host, server_port=args.port, share=args.share,
                   allowed_hosts=[h.strip() for h in args.allowed_hosts.split(",") if h.strip()],
                   prevent_thread_lock=True)
        except OSError as e:          # e.g. the port was taken after check_port
            raise SystemExit(f"error: {e}") from None
        startup.built.wait()
        if startup.error is not None:
            raise SystemExit(f"error: {startup.error}")
        demo.block_thread()                       # until Ctrl-C (or SIGTERM, SIGHUP)
    except KeyboardInterrupt:                     # during the build
        stop(demo, startup, 130, exiting)
        raise SystemExit(130) from None
    except SystemExit as e:
        stop(demo, startup, e.code, exiting)
        raise
    stop(demo, startup, 0, exiting)


def stop(demo, startup, code, exiting=False):
    """Close the server. If the start-up thread is still building or warming up, end the process
    now (exit handlers first, so the upload cache goes): torch aborts ("terminate called without
    an active exception") when the interpreter shuts down under a thread inside it. With
    `exiting` (the process ends after this), it ends within STOP_GRACE_S whatever hangs
    (end_anyway)."""
    if exiting:
        end_anyway(1 if isinstance(code, str) else (code or 0))
    if demo is not None:
        demo.close(verbose=False)
    if not startup.busy():
        return
    if isinstance(code, str):                     # SystemExit("error: ...")
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code or 0)


def end_anyway(code, after=None):
    """A daemon timer: if the process is still there `after` seconds (STOP_GRACE_S) from now (a
    server that does not close, a thread the interpreter waits for at exit), it removes the
    folders of clean_on_exit and ends the process with `code`. A stop must never hang."""
    def cut():
        log.warning("stopping took over %.0f s: ending the process now", after)
        for folder in _CLEANUP:
            shutil.rmtree(folder, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    after = STOP_GRACE_S if after is None else after
    timer = threading.Timer(after, cut)
    timer.daemon = True
    timer.start()
    return timer


if __name__ == "__main__":
    sys.exit(main(early=EARLY, exiting=True))
