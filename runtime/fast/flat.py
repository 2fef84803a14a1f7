"""One network's fast tensors in one device allocation (FastNets makes the UNet's and the
ControlNet's so).

Each tensor is a view of the allocation, in the order FastNets lists them (module order), every
one starting on a 256-byte boundary. Two things follow:
* a self-attention's to_q, to_k and to_v weights ([C, C] each, no bias, C a multiple of 64) lie
  one above the other, so kernels' qkv fusion reads them as one [3C, C] weight instead of keeping
  a concatenated copy (~0.1 GiB of fp16 over the UNet and ControlNet at full size);
* low-VRAM mode can hand the whole network's device memory back to the allocator while the
  network is not needed (`park`: its tensors become views of a host copy) and bring it back
  (`unpark`). A CUDA/HIP graph captured with the network reads its weights at their old
  addresses: `unpark` says whether the allocation came back at the same address (the caching
  allocator gives the freed block back when nothing else took it), and the caller captures again
  where it did not.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ALIGN = 256   # bytes


def _strides(shape, memory_format):
    return torch.empty(shape, device="meta").contiguous(memory_format=memory_format).stride()


class FlatWeights:
    """Tensors of (shape, dtype, memory format) as views of one uint8 allocation on `device`; the
    memory format applies to 4-D shapes (others are contiguous)."""

    def __init__(self, specs, device):
        self.device = torch.device(device)
        self.layout, offset = [], 0
        for shape, dtype, memory_format in specs:
            shape = tuple(shape)
            fmt = memory_format if len(shape) == 4 else torch.contiguous_format
            size = _numel(shape) * dtype.itemsize
            self.layout.append((offset, size, shape, _strides(shape, fmt), dtype))
            offset += -(-max(1, size) // ALIGN) * ALIGN
        self.nbytes = offset
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.address = self.flat.data_ptr()
        self.host = None     # the host copy, made at the first park (pinned on CUDA/HIP)

    @property
    def parked(self):
        return self.flat is None

    def views(self, buffer=None):
        """The tensors, as views of `buffer` (default: the device allocation)."""
        buffer = self.flat if buffer is None else buffer
        return [buffer[off:off + size].view(dt).as_strided(shape, stride)
                for off, size, shape, stride, dt in self.layout]

    def park(self):
        """Copy to host memory (once: the weights never change), drop the device allocation, and
        return the tensors as views of the host copy (point the modules at them: nothing may
        keep a view of the device allocation, or its memory is not given back)."""
        if self.host is None:
            host = torch.empty(self.nbytes, dtype=torch.uint8, device="cpu")
            host.copy_(self.flat)
            if self.device.type == "cuda":
                try:        # pinned: the copy back is a DMA, not a staged copy
                    host = host.pin_memory()
                except RuntimeError as err:   # e.g. a locked-memory limit: pageable works too
                    logger.info("low-VRAM: host copy not pinned (%s)", err)
            self.host = host
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # no kernel of any stream still reads it
        self.flat = None
        return self.views(self.host)

    def unpark(self):
        """A new device allocation with the host copy's bytes; returns (views, same_address)."""
        self.flat = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.flat.copy_(self.host, non_blocking=True)
        same = self.flat.data_ptr() == self.address
        self.address = self.flat.data_ptr()
        return self.views(), same


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
