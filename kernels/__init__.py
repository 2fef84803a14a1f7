"""Triton kernels for the port, and `patch` to swap them into a model (see kernels/README.md).

Importing this package does not import Triton: `patch` checks for it and leaves the model as it
is where the kernels cannot run.
"""

from .patch import DEFAULT_FUSIONS, FUSIONS, KernelFallback, PatchHandle, patch, patched

__all__ = ["patch", "patched", "PatchHandle", "KernelFallback", "FUSIONS", "DEFAULT_FUSIONS"]
