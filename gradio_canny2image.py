"""The canny2image demo (upstream's gradio_canny2image.py) on Gradio 6.

Same page as upstream: title, input image, Prompt, Run, a closed "Advanced options" accordion with
the twelve controls (labels, ranges, steps and defaults of spec §4.10) and a 2-column gallery with
the inverted edge map followed by the samples. Differences, each on purpose:

* binds 127.0.0.1 unless --listen (upstream always bound 0.0.0.0); analytics off;
* without a checkpoint it still starts (random weights) and says so in a banner on the page;
* a progress bar over the DDIM steps; one queue worker per GPU (one model replica each);
* bad input (no image, odd image formats, huge images, out-of-range values sent through the API)
  gets a short message in the page instead of a traceback, and the server keeps serving.

Run `python gradio_canny2image.py --help` for the flags.
"""
import os

# Read when gradio is imported: without it Gradio phones home at launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import OrderedDict  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from cldm.model import CheckpointError  # noqa: E402
from runtime.canny2image import MAX_PROMPT_CHARS, MODES, Canny2Image, resized_shape  # noqa: E402
from runtime.errors import InputError  # noqa: E402

log = logging.getLogger("gradio_canny2image")

REPO = os.path.dirname(os.path.abspath(__file__))
CONFIG_FULL = os.path.join(REPO, "models", "cldm_v15.yaml")
CONFIG_TINY = os.path.join(REPO, "models", "cldm_tiny.yaml")
CKPT_CANDIDATES = ("models/control_sd15_canny.pth", "models/control_sd15_canny.safetensors")
CKPT_URL = "https://huggingface.co/lllyasviel/ControlNet/tree/main/models"

TITLE = "## Control Stable Diffusion with Canny Edge Maps"
A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
            "cropped, worst quality, low quality")

# Checked on the image header, before anything is decoded: 50 MP passes any ordinary photo (a
# 48 MP phone picture, 8K video frames) and keeps the decoded RGB copy under ~150 MB.
MAX_INPUT_PIXELS = 50_000_000
# Smaller than this has no edges worth the name (a 1x1 upload is a mistake, not a picture).
MIN_INPUT_SIDE = 16
# After resize_image (short side = Image Resolution): long thin images would otherwise ask the
# model for e.g. 512 x 60000 px. 4096 px allows 8:1 at 512 and 16:1 at 256.
MAX_OUTPUT_SIDE = 4096

OOM_MESSAGE = "Out of GPU memory: try fewer images or a lower resolution"


class _PipelinePool:
    """One pipeline per queue worker, so no two requests ever share a model at the same time.

    Caveat with several GPUs: the pipeline seeds process-global RNGs (as upstream's
    seed_everything does), so two requests running at once can shift each other's noise; each
    image is still valid, but a seed then does not reproduce it exactly.
    """

    def __init__(self, pipelines):
        self.size = len(pipelines)
        self._free = queue.Queue()
        for p in pipelines:
            self._free.put(p)

    def acquire(self):
        return self._free.get()

    def release(self, pipeline):
        self._free.put(pipeline)


class UploadImage(gr.Image):
    """gr.Image whose unreadable uploads get a clear message: Gradio's own is a bare "Error".

    `is_template` is Gradio's mechanism (gr.ClearButton uses it) for a subclass that keeps the
    parent's front-end component.
    """
    is_template = True

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except PIL.Image.DecompressionBombError:
            raise gr.Error(f"The image is far too large: the limit is "
                           f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels.",
                           print_exception=False) from None
        except Exception as e:
            log.info("unreadable upload: %s", e)
            raise gr.Error("Could not read the uploaded file as an image: use a PNG or JPEG.",
                           print_exception=False) from None


# ---------------------------------------------------------------------------------------------
# Input checks: what Gradio hands over, turned into what the pipeline takes, or a clear message.
# ---------------------------------------------------------------------------------------------

def image_to_array(image):
    """A PIL image (opened lazily, nothing decoded yet) → what the pipeline takes, or InputError.

    The size is checked before decoding. Like the Gradio 3 upstream ran on, alpha is dropped and
    gray/palette images become RGB uint8. 16-bit gray stays uint16 for the pipeline to reduce
    (as the CLI does): PIL's own RGB conversion would clip it to white.
    """
    if image is None:
        raise InputError("No input image: upload an image first.")
    if isinstance(image, np.ndarray):         # create_demo's function may be called directly
        image = PIL.Image.fromarray(image)
    w, h = image.size
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(
            f"The image is too large ({w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is "
            f"{MAX_INPUT_PIXELS / 1e6:.0f}). Downscale it first: it is resized to about "
            f"768 px anyway.")
    if min(w, h) < MIN_INPUT_SIDE:
        raise InputError(f"The image is too small ({w}x{h}): use at least "
                         f"{MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} px.")
    if image.mode == "F":
        raise InputError("32-bit float images are not supported: save it as an 8- or 16-bit PNG "
                         "or a JPEG.")
    try:
        if image.mode.startswith("I"):        # "I;16", "I;16B", "I": 16-bit gray
            return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:   # truncated or corrupt file
        raise InputError(f"Could not read the image ({e}). Try a PNG or JPEG.") from None


def _whole_number(value, label):
    number = _finite(value, label)
    if number != int(number):
        raise InputError(f"{label} must be a whole number, got {value!r}.")
    return int(number)


def _finite(value, label):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{label} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise InputError(f"{label} must be a finite number, got {value!r}.")
    return float(value)


def _text(value, label):
    value = "" if value is None else str(value)
    if len(value) > MAX_PROMPT_CHARS:
        raise InputError(f"{label} is too long ({len(value)} characters; the limit is "
                         f"{MAX_PROMPT_CHARS}). Only the first 77 CLIP tokens are read anyway.")
    return value


def check_inputs(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution, ddim_steps,
                 guess_mode, strength, scale, seed, eta, low_threshold, high_threshold):
    """Normalise the 14 UI values (types, text lengths, sizes); raise InputError with a message.

    Ranges are the UI's; Gradio already rejects out-of-range slider values sent through the API,
    this repeats the check for direct calls and catches what Gradio lets through (NaN, fractions).
    """
    img = image_to_array(input_image)
    args = dict(
        prompt=_text(prompt, "Prompt"), a_prompt=_text(a_prompt, "Added Prompt"),
        n_prompt=_text(n_prompt, "Negative Prompt"),
        num_samples=_whole_number(num_samples, "Images"),
        image_resolution=_whole_number(image_resolution, "Image Resolution"),
        ddim_steps=_whole_number(ddim_steps, "Steps"), guess_mode=bool(guess_mode),
        strength=_finite(strength, "Control Strength"), scale=_finite(scale, "Guidance Scale"),
        seed=_whole_number(seed, "Seed"), eta=_finite(eta, "eta (DDIM)"),
        low_threshold=_whole_number(low_threshold, "Canny low threshold"),
        high_threshold=_whole_number(high_threshold, "Canny high threshold"))
    for key, (label, lo, hi) in SLIDER_RANGES.items():
        if not lo <= args[key] <= hi:
            raise InputError(f"{label} must be between {lo} and {hi}, got {args[key]}.")
    if args["low_threshold"] > args["high_threshold"]:
        raise InputError(f"Canny low threshold ({args['low_threshold']}) must not be above the "
                         f"high threshold ({args['high_threshold']}).")
    h, w = img.shape[:2]
    out_h, out_w = resized_shape(h, w, args["image_resolution"])
    if max(out_h, out_w) > MAX_OUTPUT_SIDE:
        raise InputError(
            f"The image is too elongated ({w}x{h}): at Image Resolution "
            f"{args['image_resolution']} it would be generated at {out_w}x{out_h} px (the limit "
            f"is {MAX_OUTPUT_SIDE} px a side). Crop it or lower Image Resolution.")
    return img, args


# label, minimum, maximum (spec §4.10); the UI builds its sliders from the same numbers.
SLIDER_RANGES = {
    "num_samples": ("Images", 1, 12),
    "image_resolution": ("Image Resolution", 256, 768),
    "strength": ("Control Strength", 0.0, 2.0),
    "low_threshold": ("Canny low threshold", 1, 255),
    "high_threshold": ("Canny high threshold", 1, 255),
    "ddim_steps": ("Steps", 1, 100),
    "scale": ("Guidance Scale", 0.1, 30.0),
    "seed": ("Seed", -1, 2147483647),
}


# ---------------------------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------------------------

def _device_of(pipeline):
    model = getattr(pipeline, "model", None)
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def make_process(pipelines):
    """The function the Run button calls: the 14 UI inputs → gallery images, or a gr.Error."""
    pool = _PipelinePool(pipelines)
    infos = RequestInfos()

    def process(input_image, prompt, a_prompt, n_prompt, num_samples, image_resolution,
                ddim_steps, guess_mode, strength, scale, seed, eta, low_threshold, high_threshold,
                progress=gr.Progress(), request: gr.Request = None):
        start = time.perf_counter()
        try:
            img, args = check_inputs(input_image, prompt, a_prompt, n_prompt, num_samples,
                                     image_resolution, ddim_steps, guess_mode, strength, scale,
                                     seed, eta, low_threshold, high_threshold)
        except InputError as e:
            raise gr.Error(str(e), print_exception=False) from None

        def on_step(step, total=None):
            total = total or args["ddim_steps"]
            progress((step, total), desc="DDIM sampling", unit="steps")

        out_of_memory = False
        pipeline = pool.acquire()
        try:
            device = _device_of(pipeline)
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                progress((0, args["ddim_steps"]), desc="DDIM sampling", unit="steps")
                images = pipeline.process(img, progress=on_step, **args)
            paths = save_results(images)
            infos.put(request, describe_request(pipeline, images, time.perf_counter() - start))
            return paths
        except gr.Error:
            raise
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory (%d images at %d px)", args["num_samples"],
                        args["image_resolution"])
            out_of_memory = True      # freed below, once this frame no longer holds the traceback
        except (InputError, CheckpointError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except MemoryError:
            log.warning("out of host memory (%d images at %d px)", args["num_samples"],
                        args["image_resolution"])
            raise gr.Error("Out of memory: try fewer images or a lower resolution.",
                           print_exception=False) from None
        except Exception:
            log.exception("process() failed")
            raise gr.Error("Generation failed with an internal error (details are in the server "
                           "log). Please try again.", print_exception=False) from None
        finally:
            pool.release(pipeline)
        if out_of_memory:
            gc.collect()
            torch.cuda.empty_cache()
            raise gr.Error(OOM_MESSAGE, print_exception=False)

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


def save_results(images, folder=None):
    """Write the gallery's images as PNGs into a new folder of Gradio's cache; their paths."""
    folder = os.path.join(folder or gr.utils.get_upload_folder(), "results", uuid.uuid4().hex)
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


def warm_up(pipelines, resolution=512, steps=20):
    """One request of the default shape (512², 1 image, 20 steps) per GPU pipeline, all at once
    (a thread each): kernels compile and graphs are captured now, so the first user request is
    as fast as the second. Pipelines on the CPU have nothing to warm up."""
    from runtime.sample import sample_image

    todo = [p for p in pipelines if _device_of(p).type != "cpu"]
    if not todo:
        return 0.0
    start = time.perf_counter()
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
                             guess_mode=False, strength=1.0, scale=9.0, seed=0, eta=0.0,
                             low_threshold=100, high_threshold=200, progress=progress)
    with ThreadPoolExecutor(max_workers=len(todo)) as pool:
        list(pool.map(one, todo))
    seconds = time.perf_counter() - start
    log.info("warm-up done in %.1f s: ready", seconds)
    return seconds


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def create_demo(pipeline, banner=None):
    """Build the page. `pipeline`: a Canny2Image, or a list of them (one queue worker each)."""
    pipelines = list(pipeline) if isinstance(pipeline, (list, tuple)) else [pipeline]
    process, workers = make_process(pipelines)
    r = SLIDER_RANGES
    with gr.Blocks(title="ControlNet canny2image") as demo:
        with gr.Row():
            gr.Markdown(TITLE)
        if banner:
            with gr.Row():
                gr.Markdown(banner, elem_id="weights-banner")
        with gr.Row():
            with gr.Column():
                # PIL, opened lazily: image_to_array checks the size before anything is decoded
                # and converts 16-bit and alpha itself. The pipeline still gets RGB numpy.
                input_image = UploadImage(sources=["upload"], type="pil", image_mode=None,
                                       label="Image", elem_id="input_image")
                prompt = gr.Textbox(label="Prompt")
                run_button = gr.Button("Run")
                with gr.Accordion("Advanced options", open=False):
                    num_samples = gr.Slider(label="Images", minimum=r["num_samples"][1],
                                            maximum=r["num_samples"][2], value=1, step=1)
                    image_resolution = gr.Slider(
                        label="Image Resolution", minimum=r["image_resolution"][1],
                        maximum=r["image_resolution"][2], value=512, step=64)
                    strength = gr.Slider(label="Control Strength", minimum=r["strength"][1],
                                         maximum=r["strength"][2], value=1.0, step=0.01)
                    guess_mode = gr.Checkbox(label="Guess Mode", value=False)
                    low_threshold = gr.Slider(label="Canny low threshold",
                                              minimum=r["low_threshold"][1],
                                              maximum=r["low_threshold"][2], value=100, step=1)
                    high_threshold = gr.Slider(label="Canny high threshold",
                                               minimum=r["high_threshold"][1],
                                               maximum=r["high_threshold"][2], value=200, step=1)
                    ddim_steps = gr.Slider(label="Steps", minimum=r["ddim_steps"][1],
                                           maximum=r["ddim_steps"][2], value=20, step=1)
                    scale = gr.Slider(label="Guidance Scale", minimum=r["scale"][1],
                                      maximum=r["scale"][2], value=9.0, step=0.1)
                    seed = gr.Slider(label="Seed", minimum=r["seed"][1], maximum=r["seed"][2],
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


# ---------------------------------------------------------------------------------------------
# Startup
# ---------------------------------------------------------------------------------------------

def find_checkpoint():
    """The first of ./models/control_sd15_canny.{pth,safetensors} that exists (cwd, then repo)."""
    for base in dict.fromkeys([os.getcwd(), REPO]):
        for rel in CKPT_CANDIDATES:
            path = os.path.join(base, rel)
            if os.path.isfile(path):
                return path
    return None


def no_checkpoint_banner():
    return ("### ⚠️ No checkpoint: running with random weights, so every image is noise.\n"
            "Place `control_sd15_canny.pth` at `./models/control_sd15_canny.pth` (download it "
            f"from {CKPT_URL}) and restart, or pass `--ckpt PATH`.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="ControlNet canny2image demo (Gradio). Opens on http://127.0.0.1:7860.")
    p.add_argument("--ckpt", help="checkpoint (.pth/.ckpt/.safetensors); default: "
                   "./models/control_sd15_canny.pth or .safetensors when present")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights instead of a checkpoint (outputs are noise)")
    p.add_argument("--device", default="auto",
                   help="auto (every visible GPU, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="reference: upstream-exact fp32; fast: the fast runtime (GPU only). "
                        "Default: fast on a GPU when this build has it, else reference")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model (models/cldm_tiny.yaml) with random weights: a quick smoke run")
    p.add_argument("--low-vram", action="store_true",
                   help="upstream's config.save_memory: sliced attention, and the UNet/ControlNet "
                        "and the VAE/CLIP take turns on the GPU (runtime/lowvram.py)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the start-up request of the default shape on each GPU (then the "
                        "first request pays for compiling kernels and capturing graphs)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0 (reachable from other machines); default 127.0.0.1 only")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    return p.parse_args(argv)


def _devices(spec):
    if spec == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"]
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU is visible to torch")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [spec]


def _pipeline(model, mode, requested):
    """Canny2Image in `mode`; a default (not requested) fast mode falls back to reference when
    this build cannot run it yet."""
    try:
        return Canny2Image(model, mode=mode)
    except NotImplementedError as e:
        if requested:
            raise SystemExit(f"--mode {mode}: {e}") from None
        log.warning("fast mode unavailable (%s): using reference mode", e)
        return Canny2Image(model, mode="reference")


def build_pipelines(args):
    """The pipelines (one per device) and the banner to show, from the parsed flags."""
    from runtime import lowvram
    from runtime.weights import build_model

    lowvram.configure(getattr(args, "low_vram", False))     # before the model is built
    devices = _devices(args.device)
    on_gpu = devices[0].startswith("cuda")
    mode = args.mode or ("fast" if on_gpu else "reference")
    if mode == "fast" and not on_gpu:
        raise SystemExit("--mode fast needs a GPU: use --mode reference on the CPU")

    banner = None
    ckpt = None
    config = CONFIG_FULL
    random_weights = args.random_weights
    if args.tiny:
        config, random_weights = CONFIG_TINY, True
        banner = "Tiny model with random weights (`--tiny`): a smoke test, outputs are noise."
    elif args.random_weights:
        if args.ckpt:
            raise SystemExit("pass either --ckpt or --random-weights, not both")
        banner = "Random weights (`--random-weights`): outputs are noise."
    else:
        ckpt = args.ckpt or find_checkpoint()
        if ckpt is None:
            random_weights = True
            banner = no_checkpoint_banner()
            log.warning("no checkpoint at ./models/control_sd15_canny.pth: starting with random "
                        "weights (images are noise). Download it from %s", CKPT_URL)

    pipelines = []
    for device in devices:
        log.info("building the model on %s (%s, %s)", device, os.path.basename(config),
                 ckpt or "random weights")
        model = build_model(config, ckpt=ckpt, random_weights=random_weights, device=device)
        pipelines.append(_pipeline(model, mode, requested=args.mode is not None))
    log.info("mode: %s, %d queue worker(s)", pipelines[0].mode, len(pipelines))
    return pipelines, banner


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        pipelines, banner = build_pipelines(args)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    if not args.no_warmup:
        warm_up(pipelines)
    demo = create_demo(pipelines, banner=banner)
    demo.launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port,
                share=args.share)


if __name__ == "__main__":
    sys.exit(main())
