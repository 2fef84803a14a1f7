import os

import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set before any kernel
# module is imported. Without a GPU every kernel test runs in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "models", "cldm_tiny.yaml")
FULL_CONFIG = os.path.join(REPO, "models", "cldm_v15.yaml")
# Copies of ../shared/reference/ (the exact upstream state dict, every hot shape), so the suite
# runs from any checkout.
REFERENCE_DATA = os.path.join(REPO, "tests", "data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a GPU: run `python -m pytest -m gpu` on a GPU machine (README, Tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
