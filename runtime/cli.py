"""The `canny2image` command: upstream's canny2image process() on image files, PNGs out.

    canny2image photo.jpg --prompt "a house" --random-weights
    canny2image                      # the built-in sample picture (runtime/sample.py)
    canny2image folder/ --tiny       # every image in a folder, on the tiny smoke-test model
    torchrun --standalone --nproc-per-node 4 -m runtime.cli folder/   # a folder on 4 GPUs

Choices made here (upstream has no CLI):
* --seed defaults to 12345, so two runs with the same flags give the same images; -1 draws a
  random seed like the demo (upstream's randint(0, 65535)). The seed used is printed.
* On a machine without an accelerator, unless --image-resolution / --ddim-steps are given, the
  run is made smaller (CPU_RESOLUTION, CPU_STEPS) so the full-size model finishes in a few
  minutes on two cores; the choice is printed at start.
* Images are read by runtime/inputs.py's read_image, the demo's reader too (upright by EXIF,
  8-bit RGB, alpha dropped), after the size in the file's header is checked (MAX_INPUT_PIXELS):
  nothing too large is ever decoded.
* Random weights are said in every file name (`_random-weights`), in the PNG text chunk
  "weights" and in the final line: such images are noise, not results.
* Outputs are planned before the model is built and never replace a file unless --overwrite
  (never an input), are written atomically, and a folder run resumes (runtime/outputs.py,
  runtime/folder_job.py). With --seed -1 the seed is drawn here, as upstream's randint(0, 65535),
  so that the file names are known before the run. SIGTERM ends the run like Ctrl-C (exit 143).
Every error ends in one line on stderr and a non-zero exit status, without a traceback. A folder
run goes on past a bad file and ends non-zero after the others (runtime/folder_job.py).
"""
import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time

import numpy as np

from runtime import inputs
from runtime.errors import InputError, NonFiniteOutputError
from runtime.inputs import (A_PROMPT, CONFIG_FULL, CONFIG_TINY, DEFAULT_ETA,
                            DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, DEFAULT_RESOLUTION,
                            DEFAULT_SCALE, DEFAULT_STEPS, DEFAULT_STRENGTH, MODES, N_PROMPT,
                            check_inputs)

# Full-size model, fp32, torch's 2 CPU threads, sample image (256x320 px), measured in CPU time
# (process_time, robust to other jobs on the machine): model build with random weights 11 s, one
# DDIM step (two model calls) 19.5 s, VAE decode 13 s. The whole default command
# (`canny2image --random-weights`, 10 steps) took 287 s user + 54 s system CPU time on a shared
# 2-core machine (11 min wall there, at 51 % of one core), i.e. about 3 minutes on two idle cores.
# Upstream's 512 px / 20 steps costs ~4x per step and twice the steps: over 20 minutes.
CPU_RESOLUTION, CPU_STEPS = 256, 10
DEFAULT_SEED = 12345


class CliError(Exception):
    """A failure explained in one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and the model flags' one rule argparse cannot say: --tiny
    takes no --ckpt (--tiny --random-weights is fine: the tiny model has random weights)."""

    def error(self, message):
        """A bad flag in one line (argparse's default adds the whole usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        if getattr(namespace, "tiny", False) and getattr(namespace, "ckpt", None) is not None:
            self.error("argument --ckpt: not allowed with argument --tiny")
        return namespace, rest


def add_model_flags(p):
    """The flags that choose the model (shared with the demo): --ckpt | --random-weights, --tiny
    (not with --ckpt: Parser checks), and --low-vram."""
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ckpt", default=None,
                         help="checkpoint (.pth/.ckpt/.safetensors; default "
                              "./models/control_sd15_canny.pth)")
    weights.add_argument("--random-weights", action="store_true",
                         help="full-size model with seeded random weights (images are noise)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny model (models/cldm_tiny.yaml) with random weights: a smoke test")
    p.add_argument("--low-vram", action="store_true",
                   help="upstream's config.save_memory: sliced attention, and the UNet/ControlNet "
                        "and the VAE/CLIP take turns on the GPU (runtime/lowvram.py)")


def parse_args(argv):
    p = Parser(
        prog="canny2image",
        description="ControlNet canny2image (SD1.5 + ControlNet; upstream-exact reference mode or "
                    "fast mode): edge map + generated images as PNGs.")
    p.add_argument("input", nargs="?",
                   help="an image file or a folder of images (default: a built-in sample picture)")
    p.add_argument("--prompt", default=None,
                   help="prompt (default: '' for your images, 'a house, best quality' for the "
                        "built-in sample)")
    p.add_argument("--a-prompt", default=A_PROMPT, help="added prompt (default: %(default)r)")
    p.add_argument("--n-prompt", default=N_PROMPT, help="negative prompt")
    p.add_argument("--num-samples", type=int, default=1, help="images per input (default 1)")
    p.add_argument("--image-resolution", type=int, default=None,
                   help=f"short side in px, rounded to 64 (default {DEFAULT_RESOLUTION}; "
                        f"{CPU_RESOLUTION} on a CPU-only machine)")
    p.add_argument("--ddim-steps", type=int, default=None,
                   help=f"DDIM steps (default {DEFAULT_STEPS}; {CPU_STEPS} on a CPU-only machine)")
    p.add_argument("--guess-mode", action="store_true", help="guess mode")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="control strength (default %(default)s)")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="guidance scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="seed; -1 for a random one (default %(default)s)")
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="DDIM eta (default %(default)s)")
    p.add_argument("--low-threshold", type=float, default=DEFAULT_LOW_THRESHOLD,
                   help="Canny low (default %(default)s)")
    p.add_argument("--high-threshold", type=float, default=DEFAULT_HIGH_THRESHOLD,
                   help="Canny high (default %(default)s)")
    add_model_flags(p)
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--device", default="auto",
                   help="auto (the accelerator if there is one, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="reference: upstream-exact fp32; fast: fp16, batched guidance, kernels, "
                        "CUDA/HIP graph (runtime/fast/). Default: fast on a GPU, else reference")
    p.add_argument("--outdir", default=os.path.join(".", "outputs"),
                   help="output folder (default ./outputs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=1,
                   help="folders: run up to K images whose edge maps have one size as one model "
                        "batch (K x --num-samples rows), for throughput. Each image keeps its "
                        "seed's noise (needs --eta 0, else one at a time), but its pixels may "
                        "differ by one level in a few places from a --batch-size 1 run "
                        "(batch-size-dependent summation order); the same K gives the same "
                        "bytes on any number of processes (default 1)")
    p.add_argument("--wait-timeout", type=float, default=1800.0,
                   help="under torchrun: how long rank 0 waits without news from any other rank "
                        "before it gives up on them (seconds, default %(default)g)")
    p.add_argument("--rendezvous-timeout", type=float, default=120.0,
                   help="under torchrun: how long the ranks wait for each other at the start "
                        "(seconds, default %(default)g)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files in --outdir (else a run that would replace a "
                        "file refuses, naming it) and redo the files an interrupted folder run "
                        "with the same settings finished (else they are skipped)")
    return p.parse_args(argv)


def pick_device(spec):
    import torch
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError as e:
            raise CliError(f"--device {spec}: {e}") from None
        if device.type != "cpu" and not _available(device):
            raise CliError(f"--device {spec}: no such device is available to torch")
        return device
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _available(device):
    import torch
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        return False
    index = device.index or 0
    return not hasattr(module, "device_count") or index < module.device_count()


def list_inputs(path, outdir=None):
    """([(name, path)], skipped) for a file or the image files of a folder (sorted; see
    folder_job.list_folder: only regular files, not this command's outputs in `outdir`)."""
    from runtime import folder_job, outputs
    if os.path.isdir(path):
        files, skipped = folder_job.list_folder(path, outdir)
        if not files and not skipped:
            raise CliError(f"{outputs.shown(path)}: no images in this folder "
                           f"({', '.join(folder_job.IMAGE_EXTENSIONS)})")
        return files, skipped
    if os.path.isfile(path):
        return [(outputs.stems([path])[0], path)], []
    try:
        kind = inputs.special_file(path)
    except OSError:
        kind = None
    raise CliError(f"{outputs.shown(path)}: {kind}, not an image file" if kind
                   else f"{outputs.shown(path)}: no such file or folder")


def read_image(path):
    """runtime.inputs.read_image (the one image reader: uint8 RGB), its errors as CliError."""
    try:
        return inputs.read_image(path)
    except InputError as e:
        from runtime.outputs import shown
        raise CliError(f"{shown(path)}: {e}") from None


def check_outdir(path):
    """Create the output folder and make sure files can be written there, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise CliError(f"--outdir {path}: cannot write there ({e.strerror or e})") from None


def build_pipeline(args, device):
    from cldm.model import CheckpointError
    from runtime import lowvram
    from runtime.canny2image import Canny2Image
    from runtime.weights import build_model

    lowvram.configure(getattr(args, "low_vram", False))     # before the model is built
    config = CONFIG_TINY if args.tiny else CONFIG_FULL
    random_weights = args.tiny or args.random_weights
    try:
        model = build_model(config, ckpt=args.ckpt, random_weights=random_weights,
                            device=device, seed=args.weights_seed)
    except CheckpointError as e:
        raise CliError(str(e)) from None
    return Canny2Image(model, mode=args.mode)


def default_mode(device):
    """fast on a GPU (with --low-vram too: it keeps its fp16 diffusion networks resident and
    brings CLIP and the VAE in for their phase), reference on the CPU."""
    import torch
    return "reference" if torch.device(device).type == "cpu" else "fast"


def run(args):
    from runtime import folder_job, outputs
    from runtime.outputs import shown
    from runtime.sample import SAMPLE_NAME, SAMPLE_PROMPT, sample_image

    try:
        ranks = folder_job.Ranks.from_env()
        device = folder_job.rank_device(pick_device(args.device), ranks)
    except folder_job.JobError as e:
        raise CliError(str(e)) from None
    if args.mode is None:
        args.mode = default_mode(device)
    say = lambda msg: print(f"canny2image: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if ranks.rank != 0:   # under torchrun rank 0 speaks for the job; the others only fail loudly
        say = lambda msg: None  # noqa: E731
    resolution, steps = args.image_resolution, args.ddim_steps
    cpu_choices = []
    if device.type == "cpu" and resolution is None:
        resolution = CPU_RESOLUTION
        cpu_choices.append(f"--image-resolution {CPU_RESOLUTION} (upstream: {DEFAULT_RESOLUTION})")
    if device.type == "cpu" and steps is None:
        steps = CPU_STEPS
        cpu_choices.append(f"--ddim-steps {CPU_STEPS} (upstream: {DEFAULT_STEPS})")
    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    steps = DEFAULT_STEPS if steps is None else steps
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.rendezvous_timeout > 0:
        raise CliError(f"--rendezvous-timeout must be a positive number of seconds, got "
                       f"{args.rendezvous_timeout}")
    if not args.wait_timeout > 0:
        raise CliError(f"--wait-timeout must be a positive number of seconds, got "
                       f"{args.wait_timeout}")

    folder = args.input is not None and os.path.isdir(args.input)
    if args.input is None:
        prompt = SAMPLE_PROMPT if args.prompt is None else args.prompt
    else:
        prompt = "" if args.prompt is None else args.prompt
    params = dict(prompt=prompt, a_prompt=args.a_prompt, n_prompt=args.n_prompt,
                  num_samples=args.num_samples, image_resolution=resolution,
                  ddim_steps=steps, guess_mode=args.guess_mode, strength=args.strength,
                  scale=args.scale, eta=args.eta,
                  low_threshold=args.low_threshold, high_threshold=args.high_threshold)
    # Check everything that can be checked before the (slow) model build: the settings (on a
    # stand-in image) for a folder, whose files are read one by one as they are processed; the
    # image itself for one file.
    if folder:
        try:
            check_inputs(np.zeros((64, 64), np.uint8), seed=args.seed, **params)
        except InputError as e:
            raise CliError(str(e)) from None
        single = None
    else:
        name, path = (SAMPLE_NAME, None) if args.input is None else list_inputs(args.input)[0][0]
        image = sample_image() if path is None else read_image(path)
        try:
            check_inputs(image, seed=args.seed, **params)
        except InputError as e:
            raise CliError(f"{shown(path or 'sample image')}: {e}") from None
        single = (name, path, image)
        if ranks.rank != 0:
            return   # one input: rank 0 does it
    if not (args.tiny or args.random_weights):
        from cldm.model import DEFAULT_CHECKPOINT, CheckpointError, check_checkpoint_path
        ckpt = args.ckpt or DEFAULT_CHECKPOINT
        try:
            check_checkpoint_path(ckpt)
        except CheckpointError as e:
            hint = (" To try the pipeline without it, pass --random-weights or --tiny."
                    if not os.path.lexists(ckpt) else "")
            raise CliError(f"{e}{hint}") from None
    check_outdir(args.outdir)
    random_weights = args.tiny or args.random_weights
    weights_text = (f"random (seed {args.weights_seed}): images are noise, not results"
                    if random_weights else f"checkpoint {args.ckpt or 'default'}")
    tag = "_random-weights" if random_weights else ""

    def png_text(source, seed):
        return {"Software": outputs.SOFTWARE, "weights": weights_text,
                "source": source or "built-in sample", "seed": str(seed), "mode": args.mode,
                "model": "tiny" if args.tiny else "full", **{k: str(v) for k, v in params.items()}}

    job = {k: outputs.storable(v) for k, v in png_text(None, args.seed).items()
           if k not in ("source", "Software")}
    settings = folder_job.Settings(outdir=args.outdir, params=params, batch_size=args.batch_size,
                                   tag=tag, text=png_text, quiet=args.quiet,
                                   wait_timeout=args.wait_timeout, job=job,
                                   overwrite=args.overwrite)
    if folder:
        def make_plan():
            files, skipped = list_inputs(args.input, args.outdir)
            return folder_job.prepare(files, skipped, settings, args.seed)
        try:
            job_plan, parts = folder_job.start(ranks, args.outdir, make_plan,
                                               args.rendezvous_timeout)
        except (folder_job.JobError, outputs.OutputError) as e:
            raise CliError(str(e)) from None
        if ranks.world == 1:
            outputs.remove_stale_temporaries(args.outdir)
        for skip in job_plan.skipped:
            say(f"skipped {shown(skip['input'])}: {shown(skip['reason'])}")
        if job_plan.resumed:
            say(f"resuming: {len(job_plan.resumed)} of {job_plan.total} files already done by "
                f"an earlier run with these settings (recorded in "
                f"{shown(os.path.join(args.outdir, folder_job.MANIFEST))}), not redone: "
                f"{outputs.listing(job_plan.resumed, args.input)}; pass --overwrite to redo them")
        if ranks.world > 1:
            say(f"{len(job_plan.tasks)} files on {ranks.world} processes")
        if args.batch_size > 1 and args.eta != 0:
            say(f"--batch-size {args.batch_size} needs --eta 0 (per-step noise would differ "
                f"from one image at a time): running one image at a time")
    else:
        name, path, image = single
        seed = random.randint(0, 65535) if args.seed == -1 else args.seed   # as upstream
        task = folder_job.Task(0, name, path, seed)
        written = [os.path.join(args.outdir, f)
                   for f in folder_job.output_names(task, 1 + args.num_samples, tag)]
        text = png_text(path, seed)
        try:
            outputs.check_plan({f: path for f in written}, [path], args.outdir,
                               overwrite=args.overwrite,
                               ours=lambda f: outputs.same_origin(f, text))
        except outputs.OutputError as e:
            raise CliError(str(e)) from None

    if cpu_choices:
        say(f"no accelerator, so a shorter CPU run: {' and '.join(cpu_choices)}; pass the flags "
            f"to choose")
    kind = "tiny model" if args.tiny else "full-size model"
    weights = "random weights" if random_weights else (
        args.ckpt or "./models/control_sd15_canny.pth")
    start = time.perf_counter()
    if folder and not folder_job.share(job_plan.tasks, max(1, args.batch_size), ranks):
        pipeline = None      # nothing to do here (all done before, or the other ranks' files)
    else:
        say(f"building the {kind} ({shown(weights)}) on {device}, {args.mode} mode ...")
        pipeline = build_pipeline(args, device)
        say(f"model ready in {time.perf_counter() - start:.1f} s")

    if folder:
        records = folder_job.run(job_plan, parts, pipeline, settings, ranks, read=read_image,
                                 expected=(CliError, InputError), say=say)
        if ranks.rank != 0:
            return
        written = [os.path.join(args.outdir, f) for r in records for f in r["outputs"]]
        failed = folder_job.failure_message(records, args.outdir)
    else:
        t0 = time.perf_counter()
        bar = None if args.quiet else _progress_bar(shown(name))
        try:
            results = pipeline.process(image, seed=seed, progress=bar, **params)
        finally:
            if bar is not None:
                bar.close()
        folder_job.write_outputs([(f, result, text) for f, result in zip(written, results)])
        h, w = results[0].shape[:2]
        say(f"{shown(path or 'sample image')}: {w}x{h}, seed {seed}, "
            f"{time.perf_counter() - t0:.1f} s")
        failed = None
    note = " (RANDOM WEIGHTS: the images are noise)" if random_weights else ""
    print(f"canny2image: wrote {len(written)} PNGs to {shown(os.path.abspath(args.outdir))}: "
          f"{outputs.listing(written, args.outdir)}{note}", flush=True)
    if failed:
        raise CliError(failed)


def _progress_bar(name):
    from tqdm import tqdm
    bar = tqdm(desc=f"DDIM {name}", unit="step", file=sys.stderr, leave=False)

    def progress(done, total):
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    progress.close = bar.close
    return progress


def main(argv=None):
    from runtime.outputs import OutputError, Terminated, handle_sigterm, shown
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="canny2image: %(message)s")
    previous = (handle_sigterm() if threading.current_thread() is threading.main_thread()
                else None)
    try:
        run(args)
    except (CliError, InputError, NonFiniteOutputError, OutputError) as e:
        print(f"canny2image: error: {shown(e)}", file=sys.stderr)
        return 1
    except Terminated:
        print("canny2image: terminated (SIGTERM); finished files are complete, run the same "
              "command again to go on", file=sys.stderr)
        return 143
    except MemoryError:
        print("canny2image: error: out of memory: try a lower --image-resolution or fewer "
              "--num-samples", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("canny2image: interrupted; finished files are complete, run the same command "
              "again to go on", file=sys.stderr)
        return 130
    except Exception as e:   # keep the promise of one line; details with CANNY2IMAGE_DEBUG=1
        if os.environ.get("CANNY2IMAGE_DEBUG"):
            raise
        if _is_out_of_memory(e):
            print("canny2image: error: out of device memory: try a lower --image-resolution or "
                  "fewer --num-samples", file=sys.stderr)
        else:
            print(f"canny2image: error: {type(e).__name__}: {shown(e)} (set CANNY2IMAGE_DEBUG=1 "
                  f"for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _is_out_of_memory(error):
    import torch
    # torch.OutOfMemoryError since torch 2.5 (CUDA and HIP); torch.cuda's is the same class
    return isinstance(error, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


if __name__ == "__main__":
    sys.exit(main())
