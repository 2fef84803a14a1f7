"""seed_everything: the same draws as pytorch_lightning.seed_everything, without importing it
(importing pytorch_lightning costs ~3 s and pulls in torchvision).

PL 2.x sets PL_GLOBAL_SEED and seeds Python's `random`, numpy and torch (CPU and every CUDA
device, which torch.manual_seed does) and rejects seeds outside numpy's 0..2**32-1.

Those generators are process-wide: a run that seeds them and then draws its noise must not let a
run in another thread reseed them in between. seeded_noise() does both under RNG_LOCK, and a run
that keeps drawing per step (reference mode, or eta > 0) holds RNG_LOCK throughout
(runtime/canny2image.py).
"""
import os
import random
import threading

import numpy as np
import torch

from runtime.errors import InputError

MIN_SEED = 0
MAX_SEED = 2**32 - 1
RNG_LOCK = threading.RLock()


def seed_everything(seed):
    """Seed random, numpy and torch with `seed` (an int in 0..2**32-1); return the seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not MIN_SEED <= seed <= MAX_SEED:
        raise InputError(f"seed {seed} is out of range: use {MIN_SEED}..{MAX_SEED}")
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def seeded_noise(seed, shape, device):
    """seed_everything(seed), then torch.randn(shape, device=device), under RNG_LOCK: the x_T
    upstream's sampler draws right after seeding (nothing in between draws)."""
    with RNG_LOCK:
        seed_everything(seed)
        return torch.randn(shape, device=device)
