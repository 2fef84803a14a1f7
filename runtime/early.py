"""Start fast mode's kernel precompile (kernels/precompile.py) before the command imports torch.

The precompile child spends its first seconds importing torch, Triton and the model code, and
building the meta-tensor model it records the launches on: none of that needs the job (GPU, image
size, batch). Spawned here, first thing, it does all that while the parent imports the same
modules, then waits for the job on its stdin; the parent sends it from app.start_precompile once
it knows it, or discards the child (reference mode, the CPU, already compiled, an error).

This module imports nothing heavy: the installed commands (runtime/launch.py) call spawn() before
any import of torch.
"""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The device files of the GPU drivers fast mode runs on (NVIDIA's, ROCm's), looked at without
# torch: with none of them (a machine without a GPU) no child is spawned here. Only a hint:
# kernels/precompile.py's start() spawns the child itself where none was spawned early.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd")


def _wants_fast_mode(argv):
    """False where fast mode cannot run or the flags rule it out (the parent decides the rest
    once it has looked at the GPU): no GPU driver, help, the tiny model, reference mode, the
    CPU, the Triton interpreter."""
    flags = set(argv)
    if flags & {"-h", "--help", "--tiny"} or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return False
    return _flag(argv, "--mode") != "reference" and _flag(argv, "--device") != "cpu"


def _flag(argv, name):
    """The value of `name` in argv (`--name value` or `--name=value`; the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


class EarlyChild:
    """The waiting child: send(job) once, or discard() it."""

    def __init__(self, proc, started):
        self.proc, self.started, self.sent = proc, started, False

    def send(self, job):
        """Hand the child its job (kernels/precompile.py's flags as a dict). A child already gone
        (it failed while importing) shows in Precompile.wait's line."""
        self.sent = True
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.close()
        except OSError:
            pass

    def discard(self):
        """Stop the child unless it has its job (no-op then: its handle owns it)."""
        if self.sent:
            return
        self.sent = True
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()


def spawn(argv):
    """The waiting precompile child for a command run with `argv`, or None where its flags rule
    fast mode out."""
    if not _wants_fast_mode(argv):
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "kernels.precompile", "--job-stdin"], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return EarlyChild(proc, time.perf_counter())
