"""runtime.seed.seed_everything draws exactly like pytorch_lightning.seed_everything (which
upstream's scripts call), and such a script runs unchanged in this environment."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime.seed import MAX_SEED, seed_everything
from tests.conftest import REPO

pl = pytest.importorskip("pytorch_lightning")


def _draws():
    return (os.environ.get("PL_GLOBAL_SEED"), [random.random() for _ in range(4)],
            random.randint(0, 65535), np.random.rand(4).tolist(),
            np.random.randint(0, 9, 5).tolist(),
            torch.rand(4).tolist(), torch.randn(2, 3).tolist(), torch.randint(0, 9, (5,)).tolist())


@pytest.mark.parametrize("seed", [0, 1, 12345, 65535, MAX_SEED])
def test_same_streams_as_pytorch_lightning(seed, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert pl.seed_everything(seed, verbose=False) == seed
    theirs = _draws()
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    random.seed(seed + 1), np.random.seed(seed ^ 1), torch.manual_seed(seed + 2)   # disturb
    assert seed_everything(seed) == seed
    ours = _draws()
    assert ours == theirs
    assert ours[0] == str(seed)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_both_refuse_seeds_out_of_range(seed):
    with pytest.raises(ValueError):
        pl.seed_everything(seed, verbose=False)
    with pytest.raises(ValueError):      # InputError is a ValueError
        seed_everything(seed)


def test_an_upstream_style_script_runs(tmp_path):
    script = tmp_path / "upstream_style.py"
    script.write_text(
        "from pytorch_lightning import seed_everything\n"
        "import torch\n"
        "seed_everything(1234)\n"
        "print(torch.rand(1).item())\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    torch.manual_seed(1234)
    assert float(result.stdout.split()[-1]) == torch.rand(1).item()
