"""One builder for every entry point: the `canny2image` command and its folder job, the demo and
the benchmarks get their device, model and pipeline here, and read and write image files here.

    from runtime import app
    device = app.pick_device("auto")                      # the accelerator if any, else the CPU
    pipe = app.build_pipeline(device, tiny=True)          # mode: app.default_mode(device)
    images = pipe.process(app.read_image("photo.jpg"), prompt="a house", ...)
    app.write_png("out.png", images[1], {"prompt": "a house"})

* pick_device, default_mode: the device for a --device flag; fast mode on a GPU (with low-VRAM
  too), reference mode on the CPU.
* cpu_defaults: on a machine without an accelerator, unless given, a smaller resolution and fewer
  steps (CPU_RESOLUTION, CPU_STEPS) so the full-size model finishes in minutes on two cores.
* make_model, build_pipeline: the tiny or full-size config (or any config), a checkpoint or seeded
  random weights, upstream's save_memory switch (runtime/lowvram.py, set before the build), then
  Canny2Image with its mode and fast-mode options. find_checkpoint: where the default checkpoint
  (cldm.model.DEFAULT_CHECKPOINT, or the same name as .safetensors) is, if anywhere.
* read_image (runtime.inputs', the one reader), write_png (with text chunks, atomic:
  runtime/outputs.py).
* run(args): the command's job from its parsed flags (runtime/cli.py): one image or a folder
  (runtime/folder_job.py), PNGs out, every output planned and checked before the model build
  (runtime/outputs.py: never an input, never shared, an existing file only with --overwrite).
A failure a user can fix is an AppError with a one-line message.
"""
import os
import random
import sys
import tempfile
import time

import numpy as np

from runtime import inputs
from runtime.errors import InputError
from runtime.outputs import OutdirLock
from runtime.inputs import (CONFIG_FULL, CONFIG_TINY, DEFAULT_RESOLUTION, DEFAULT_STEPS,
                            check_inputs)

# Full-size model, fp32, torch's 2 CPU threads, sample image (256x320 px), measured in CPU time
# (process_time, robust to other jobs on the machine): model build with random weights 11 s, one
# DDIM step (two model calls) 19.5 s, VAE decode 13 s. The whole default command
# (`canny2image --random-weights`, 10 steps) took 287 s user + 54 s system CPU time on a shared
# 2-core machine (11 min wall there, at 51 % of one core), i.e. about 3 minutes on two idle cores.
# Upstream's 512 px / 20 steps costs ~4x per step and twice the steps: over 20 minutes.
CPU_RESOLUTION, CPU_STEPS = 256, 10


class AppError(Exception):
    """A failure explained in one line."""


# --- device and defaults -----------------------------------------------------------------------

def pick_device(spec="auto"):
    """torch.device for "auto" (the accelerator if there is one, else the CPU), "cpu", "cuda:1",
    ...; AppError for a device torch does not have."""
    import torch
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError as e:
            raise AppError(f"--device {spec}: {e}") from None
        if device.type != "cpu" and not _available(device):
            raise AppError(f"--device {spec}: no such device is available to torch")
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


def default_mode(device):
    """fast on a GPU (with --low-vram too: it keeps its fp16 diffusion networks resident and
    brings CLIP and the VAE in for their phase), reference on the CPU."""
    import torch
    return "reference" if torch.device(device).type == "cpu" else "fast"


def cpu_defaults(device, resolution=None, steps=None):
    """(resolution, steps, choices): what is not given is CPU_RESOLUTION / CPU_STEPS on the CPU,
    upstream's defaults elsewhere; `choices` names the CPU choices made (for a message)."""
    import torch
    choices = []
    if torch.device(device).type == "cpu":
        if resolution is None:
            resolution = CPU_RESOLUTION
            choices.append(f"--image-resolution {CPU_RESOLUTION} (upstream: {DEFAULT_RESOLUTION})")
        if steps is None:
            steps = CPU_STEPS
            choices.append(f"--ddim-steps {CPU_STEPS} (upstream: {DEFAULT_STEPS})")
    return (DEFAULT_RESOLUTION if resolution is None else resolution,
            DEFAULT_STEPS if steps is None else steps, choices)


# --- the model and its pipeline ----------------------------------------------------------------

def checkpoint_candidates():
    """The default checkpoint's names: cldm.model.DEFAULT_CHECKPOINT, then as .safetensors."""
    from cldm.model import DEFAULT_CHECKPOINT
    return (DEFAULT_CHECKPOINT, os.path.splitext(DEFAULT_CHECKPOINT)[0] + ".safetensors")


def find_checkpoint():
    """The first default checkpoint that exists, in the working folder, then beside the package
    (a checkout's models/); None if there is none."""
    for base in dict.fromkeys([os.getcwd(), inputs.REPO]):
        for name in checkpoint_candidates():
            path = os.path.normpath(os.path.join(base, name))
            if os.path.isfile(path):
                return path
    return None


def make_model(device="cpu", *, tiny=False, config=None, ckpt=None, random_weights=False,
               weights_seed=0, low_vram=False, host_children=()):
    """The ControlLDM of a pipeline, in eval mode on `device`: models/cldm_tiny.yaml (random
    weights) for `tiny`, else `config` (default models/cldm_v15.yaml) with the weights of `ckpt`
    or, with `random_weights`, seeded random ones (runtime/weights.py). `low_vram` switches on
    upstream's save_memory before the build (it stays on for the process, as upstream's
    config.py does). `host_children`: the children built in host memory (fast mode on a GPU
    makes their fp16 device copies itself: runtime.fast.nets.host_children). Checkpoint
    problems: AppError."""
    from cldm.model import CheckpointError
    from runtime import lowvram
    from runtime.weights import build_model

    random_weights = tiny or random_weights
    if ckpt is not None and random_weights:
        raise AppError("a checkpoint or random weights (--tiny has them), not both")
    lowvram.configure(low_vram)
    config = CONFIG_TINY if tiny else (config or CONFIG_FULL)
    try:
        return build_model(config, ckpt=ckpt, random_weights=random_weights, device=device,
                           seed=weights_seed, host_children=host_children)
    except CheckpointError as e:
        raise AppError(str(e)) from None


def build_pipeline(device, *, mode=None, options=None, **model_flags):
    """Canny2Image(make_model(device, **model_flags), mode, options); mode None: default_mode."""
    from runtime.canny2image import Canny2Image
    from runtime.fast.nets import host_children
    mode = mode or default_mode(device)
    model = make_model(device, host_children=host_children(mode, device), **model_flags)
    return Canny2Image(model, mode=mode, options=options)


def start_precompile(device, mode, first_request, *, tiny=False, config=None, early=None):
    """For fast mode on a GPU: compile the Triton kernels of the first request, (H, W, images),
    in parallel in a child process while the caller builds the model (kernels/precompile.py);
    the handle's wait() before that request (cancel() if the build fails). None where there is
    nothing to compile ahead: other modes, the tiny model (its kernels compile in moments), no
    GPU kernels, already compiled. `early`: the child runtime/early.py spawned before the
    imports, which gets the job (or is discarded where there is none)."""
    if (mode or default_mode(device)) != "fast" or tiny:
        if early is not None:
            early.discard()
        return None
    from kernels import precompile
    return precompile.start(device, first_request[:2], first_request[2], config=config,
                            early=early)


# --- image files -------------------------------------------------------------------------------

def list_inputs(path, outdir=None):
    """([(name, path)], skipped) for a file or the image files of a folder (sorted; see
    folder_job.list_folder: only regular files, not this command's outputs in `outdir`)."""
    from runtime import folder_job, outputs
    if os.path.isdir(path):
        files, skipped = folder_job.list_folder(path, outdir)
        if not files and not skipped:
            raise AppError(f"{outputs.shown(path)}: no images in this folder "
                           f"({', '.join(folder_job.IMAGE_EXTENSIONS)})")
        return files, skipped
    if os.path.isfile(path):
        return [(outputs.stems([path])[0], path)], []
    try:
        kind = inputs.special_file(path)
    except OSError:
        kind = None
    raise AppError(f"{outputs.shown(path)}: {kind}, not an image file" if kind
                   else f"{outputs.shown(path)}: no such file or folder")


def read_image(path):
    """runtime.inputs.read_image (the one image reader: uint8 RGB), its errors as AppError."""
    from runtime.outputs import shown
    try:
        return inputs.read_image(path)
    except InputError as e:
        raise AppError(f"{shown(path)}: {e}") from None


def check_outdir(path):
    """Create the output folder and make sure files can be written there, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise AppError(f"--outdir {path}: cannot write there ({e.strerror or e})") from None


def write_png(path, image, text):
    """A uint8 HxWx3 image as a PNG with `text` ({key: value}) as its text chunks, written
    atomically (runtime/outputs.py; OutputError naming the file)."""
    from runtime import outputs
    outputs.write_file(path, outputs.png_writer(image, text))


# --- the command's job -------------------------------------------------------------------------

def settings(args, device):
    """(params, cpu_choices): process()'s values but the image and the seed, from the flags (CPU
    defaults applied), and the CPU choices made. AppError for bad job flags."""
    from runtime.sample import SAMPLE_PROMPT

    resolution, steps, choices = cpu_defaults(device, args.image_resolution, args.ddim_steps)
    if args.batch_size < 1:
        raise AppError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.rendezvous_timeout > 0:
        raise AppError(f"--rendezvous-timeout must be a positive number of seconds, got "
                       f"{args.rendezvous_timeout}")
    if not args.wait_timeout > 0:
        raise AppError(f"--wait-timeout must be a positive number of seconds, got "
                       f"{args.wait_timeout}")
    default_prompt = SAMPLE_PROMPT if args.input is None else ""
    params = dict(prompt=default_prompt if args.prompt is None else args.prompt,
                  a_prompt=args.a_prompt, n_prompt=args.n_prompt,
                  num_samples=args.num_samples, image_resolution=resolution,
                  ddim_steps=steps, guess_mode=args.guess_mode, strength=args.strength,
                  scale=args.scale, eta=args.eta,
                  low_threshold=args.low_threshold, high_threshold=args.high_threshold)
    return params, choices


def checkpoint(args):
    """The checkpoint the flags ask for (None for random weights): --ckpt, else the default one
    (find_checkpoint); AppError unless it is a readable file."""
    if args.tiny or args.random_weights:
        return None
    from cldm.model import DEFAULT_CHECKPOINT, CheckpointError, check_checkpoint_path
    ckpt = args.ckpt or find_checkpoint() or DEFAULT_CHECKPOINT
    try:
        check_checkpoint_path(ckpt)
    except CheckpointError as e:
        hint = (" To try the pipeline without it, pass --random-weights or --tiny."
                if not os.path.lexists(ckpt) else "")
        raise AppError(f"{e}{hint}") from None
    return ckpt


class _Output:
    """Where and how a run's PNGs are written: folder, name tag, text chunks, and the settings
    that make the images (`job`: a folder run with other ones is no resume)."""

    def __init__(self, args, params, random_weights):
        from runtime.outputs import storable
        self.outdir, self.mode, self.params = args.outdir, args.mode, params
        self.model = "tiny" if args.tiny else "full"
        self.weights = (f"random (seed {args.weights_seed}): images are noise, not results"
                        if random_weights else f"checkpoint {args.ckpt or 'default'}")
        self.tag = "_random-weights" if random_weights else ""
        self.job = {k: storable(v) for k, v in self.text(None, args.seed).items()
                    if k not in ("source", "Software")}

    def text(self, source, seed):
        from runtime.outputs import SOFTWARE
        return {"Software": SOFTWARE, "weights": self.weights,
                "source": source or "built-in sample", "seed": str(seed), "mode": self.mode,
                "model": self.model, **{k: str(v) for k, v in self.params.items()}}

    def settings(self, args):
        from runtime import folder_job
        return folder_job.Settings(outdir=self.outdir, params=self.params,
                                   batch_size=args.batch_size, tag=self.tag, text=self.text,
                                   quiet=args.quiet, wait_timeout=args.wait_timeout,
                                   job=self.job, overwrite=args.overwrite)


def run(args, early=None):
    """The `canny2image` command's job (runtime/cli.py's flags): every check that can come before
    the model build (the inputs, the checkpoint, the output plan), the build, then one image or
    a folder. AppError for what a user can fix. `early`: runtime/early.py's waiting precompile
    child (the caller discards it if this returns before handing it a job)."""
    from runtime import folder_job
    from runtime.outputs import listing, shown
    from runtime.sample import SAMPLE_NAME, sample_image

    try:
        ranks = folder_job.Ranks.from_env()
        device = folder_job.rank_device(pick_device(args.device), ranks)
    except folder_job.JobError as e:
        raise AppError(str(e)) from None
    if args.mode is None:
        args.mode = default_mode(device)
    say = _say if ranks.rank == 0 else (lambda msg: None)   # rank 0 speaks for a torchrun job
    params, cpu_choices = settings(args, device)

    # Check everything that can be checked before the (slow) model build: the settings (on a
    # stand-in image) for a folder, whose files are read one by one as they are processed; the
    # image itself for one file.
    folder = args.input is not None and os.path.isdir(args.input)
    if folder:
        try:
            check_inputs(np.zeros((64, 64), np.uint8), seed=args.seed, **params)
        except InputError as e:
            raise AppError(str(e)) from None
    else:
        name, path = (SAMPLE_NAME, None) if args.input is None else list_inputs(args.input)[0][0]
        image = sample_image() if path is None else read_image(path)
        try:
            check_inputs(image, seed=args.seed, **params)
        except InputError as e:
            raise AppError(f"{shown(path or 'sample image')}: {e}") from None
        if ranks.rank != 0:
            return   # one input: rank 0 does it
    ckpt = checkpoint(args)
    check_outdir(args.outdir)
    lock = OutdirLock(args.outdir) if ranks.rank == 0 else None   # one run writes there
    try:
        out = _Output(args, params, random_weights=args.tiny or args.random_weights)
        if folder:
            job_plan, parts = plan_folder(args, out, ranks, say)
            todo = folder_job.share(job_plan.tasks, max(1, args.batch_size), ranks)
        else:
            seed = random.randint(0, 65535) if args.seed == -1 else args.seed   # as upstream
            single = plan_single(out, name, path, seed, args.num_samples, args.overwrite)
            todo = True

        if cpu_choices:
            say(f"no accelerator, so a shorter CPU run: {' and '.join(cpu_choices)}; pass the "
                f"flags to choose")
        pipeline = None     # nothing to do on this rank: all done before, or the others' files
        if todo:
            kind = "tiny model" if args.tiny else "full-size model"
            say(f"building the {kind} ({shown(ckpt or 'random weights')}) on {device}, "
                f"{args.mode} mode ...")
            start = time.perf_counter()
            if folder:  # its images are read as their turn comes: a square of the resolution
                side = params["image_resolution"]
                first = (side, side, max(1, args.batch_size) * params["num_samples"])
            else:
                first = (*inputs.resized_shape(*image.shape[:2], params["image_resolution"]),
                         params["num_samples"])
            # rank 0 compiles ahead for a torchrun job: one set of worker processes per machine
            if ranks.rank == 0:
                pre = start_precompile(device, args.mode, first, tiny=args.tiny, early=early)
            else:
                pre = None
                if early is not None:
                    early.discard()
            try:
                pipeline = build_pipeline(device, mode=args.mode, tiny=args.tiny, ckpt=ckpt,
                                          random_weights=args.random_weights,
                                          weights_seed=args.weights_seed, low_vram=args.low_vram)
            except BaseException:
                if pre is not None:
                    pre.cancel()
                raise
            if pre is not None:
                say(pre.wait())
            say(f"model ready in {time.perf_counter() - start:.1f} s")

        if folder:
            written, failed = run_folder(args, pipeline, out, job_plan, parts, ranks, say)
            if ranks.rank != 0:
                return
        else:
            written, failed = run_single(args, pipeline, out, single, image, say), None
        note = " (RANDOM WEIGHTS: the images are noise)" if out.tag else ""
        print(f"canny2image: wrote {len(written)} PNGs to "
              f"{shown(os.path.abspath(args.outdir))}: {listing(written, args.outdir)}{note}",
              flush=True)
        if failed:
            raise AppError(failed)
    finally:
        if lock is not None:
            lock.release()


def plan_single(out, name, path, seed, num_samples, overwrite):
    """(task, PNG paths, text) of one image, checked against what --outdir holds (AppError naming
    the files it would clobber; this command's own files from the same input and settings may
    be written again)."""
    from runtime import folder_job, outputs
    task = folder_job.Task(0, name, path, seed)
    written = [os.path.join(out.outdir, f)
               for f in folder_job.output_names(task, 1 + num_samples, out.tag)]
    text = out.text(path, seed)
    try:
        outputs.check_plan({f: path for f in written}, [path], out.outdir, overwrite=overwrite,
                           ours=lambda f: outputs.same_origin(f, text))
    except outputs.OutputError as e:
        raise AppError(str(e)) from None
    return task, written, text


def plan_folder(args, out, ranks, say):
    """(folder_job.Plan, parts folder) of a folder run, checked against what --outdir holds
    (folder_job.prepare; rank 0 plans, under torchrun for every rank); says what is skipped."""
    from runtime import folder_job, outputs
    from runtime.outputs import shown

    def make_plan():
        files, skipped = list_inputs(args.input, args.outdir)
        return folder_job.prepare(files, skipped, out.settings(args), args.seed, args.input)

    try:
        job_plan, parts = folder_job.start(ranks, args.outdir, make_plan, args.rendezvous_timeout)
    except (folder_job.JobError, outputs.OutputError) as e:
        raise AppError(str(e)) from None
    if ranks.world == 1:
        outputs.remove_stale_temporaries(args.outdir)
    for skip in job_plan.skipped:
        say(f"skipped {shown(skip['input'])}: {shown(skip['reason'])}")
    if job_plan.resumed:
        say(f"resuming: {len(job_plan.resumed)} of {job_plan.total} files already done by an "
            f"earlier run with these settings (recorded in "
            f"{shown(os.path.join(args.outdir, folder_job.MANIFEST))}), not redone: "
            f"{outputs.listing(job_plan.resumed, args.input)}; pass --overwrite to redo them")
    if ranks.world > 1:
        say(f"{len(job_plan.tasks)} files on {ranks.world} processes")
    if args.batch_size > 1 and args.eta != 0:
        say(f"--batch-size {args.batch_size} needs --eta 0 (per-step noise would differ "
            f"from one image at a time): running one image at a time")
    return job_plan, parts


def run_single(args, pipeline, out, single, image, say):
    """One image (a file, or the sample when its path is None), planned by plan_single: its
    PNGs' paths."""
    from runtime import folder_job
    from runtime.outputs import shown

    task, written, text = single
    t0 = time.perf_counter()
    bar = None if args.quiet else _progress_bar(shown(task.name))
    try:
        results = pipeline.process(image, seed=task.seed, progress=bar, **out.params)
    finally:
        if bar is not None:
            bar.close()
    folder_job.write_outputs([(f, result, text) for f, result in zip(written, results)])
    h, w = results[0].shape[:2]
    say(f"{shown(task.path or 'sample image')}: {w}x{h}, seed {task.seed}, "
        f"{time.perf_counter() - t0:.1f} s")
    return written


def run_folder(args, pipeline, out, job_plan, parts, ranks, say):
    """This process's share of a folder job: (PNG paths, failure line or None) on rank 0,
    (None, None) on the others."""
    from runtime import folder_job

    records = folder_job.run(job_plan, parts, pipeline, out.settings(args), ranks,
                             read=read_image, expected=(AppError, InputError), say=say)
    if ranks.rank != 0:
        return None, None
    written = [os.path.join(out.outdir, f) for r in records for f in r["outputs"]]
    return written, folder_job.failure_message(records, out.outdir)


def _say(msg):
    print(f"canny2image: {msg}", file=sys.stderr, flush=True)


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
