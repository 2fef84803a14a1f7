"""The `canny2image` command: its flags and main(); the job itself is runtime/app.py's run.

    canny2image photo.jpg --prompt "a house" --random-weights
    canny2image                      # the built-in sample picture (runtime/sample.py)
    canny2image folder/ --tiny       # every image in a folder, on the tiny smoke-test model
    torchrun --standalone --nproc-per-node 4 -m runtime.cli folder/   # a folder on 4 GPUs

Choices made here (upstream has no CLI):
* --seed defaults to 12345, so two runs with the same flags give the same images; -1 draws a
  random seed like the demo (upstream's randint(0, 65535)). The seed used is printed.
* On a machine without an accelerator, unless --image-resolution / --ddim-steps are given, the
  run is made smaller (runtime/app.py's CPU_RESOLUTION, CPU_STEPS) so the full-size model
  finishes in a few minutes on two cores; the choice is printed at start.
* Images are read by runtime/inputs.py's read_image, the demo's reader too (upright by EXIF,
  8-bit RGB, alpha dropped), after the size in the file's header is checked (MAX_INPUT_PIXELS):
  nothing too large is ever decoded.
* Random weights are said in every file name (`_random-weights`), in the PNG text chunk
  "weights" and in the final line: such images are noise, not results.
* Outputs are planned before the model is built and never replace a file unless --overwrite
  (never an input), are written atomically, and a folder run resumes (runtime/outputs.py,
  runtime/app.py, runtime/folder_job.py). With --seed -1 the seed is drawn before the run, as
  upstream's randint(0, 65535), so that the file names are known. SIGTERM ends the run like
  Ctrl-C (exit 143).
Every error ends in one line on stderr and a non-zero exit status, without a traceback. A folder
run goes on past a bad file and ends non-zero after the others (runtime/folder_job.py).
"""
import argparse
import logging
import os
import signal
import sys
import threading

from cldm.model import DEFAULT_CHECKPOINT
from runtime import app
from runtime.app import CPU_RESOLUTION, CPU_STEPS, AppError
from runtime.errors import InputError, NonFiniteOutputError, device_out_of_memory
from runtime.folder_job import RENDEZVOUS_TIMEOUT_S
from runtime.inputs import (A_PROMPT, DEFAULT_ETA, DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD,
                            DEFAULT_RESOLUTION, DEFAULT_SCALE, DEFAULT_STEPS, DEFAULT_STRENGTH,
                            MODES, N_PROMPT)

DEFAULT_SEED = 12345


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
                         help=f"checkpoint (.pth/.ckpt/.safetensors; default {DEFAULT_CHECKPOINT}, "
                              f"or the same name as .safetensors)")
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
    p.add_argument("--rendezvous-timeout", type=float, default=RENDEZVOUS_TIMEOUT_S,
                   help="under torchrun: how long the ranks wait for each other at the start "
                        "(seconds, default %(default)g)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files in --outdir (else a run that would replace a "
                        "file refuses, naming it) and redo the files an interrupted folder run "
                        "with the same settings finished (else they are skipped)")
    return p.parse_args(argv)


def main(argv=None, early=None):
    """`early`: the kernel precompile child runtime/launch.py spawned before importing this; it is
    discarded on the way out unless the run handed it its job."""
    try:
        return _main(argv, early)
    finally:
        if early is not None:
            early.discard()   # a no-op once it has its job


def _main(argv, early):
    from runtime.outputs import OutputError, Terminated, handle_sigterm, shown
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="canny2image: %(message)s")
    previous = (handle_sigterm() if threading.current_thread() is threading.main_thread()
                else None)
    try:
        app.run(args, early)
    except (AppError, InputError, NonFiniteOutputError, OutputError) as e:
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
        if isinstance(e, device_out_of_memory()):
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


if __name__ == "__main__":
    sys.exit(main())
