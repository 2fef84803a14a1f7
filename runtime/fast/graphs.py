"""The graph cache: one entry per configuration of the step, owning its static buffers, its CUDA/HIP
graph and the graph's memory pool, in an LRU of FastOptions.graph_cache_size entries.

A captured graph reads and writes fixed addresses, so an entry's buffers are allocated once and
never again: `StaticBuffers.put` copies into a buffer and refuses a value of another shape, dtype
or layout with a clear error. Everything that decides a buffer's shape is part of the key (latent
size, batch, guess mode, guidance on/off, only_mid_control, text length), and the hint is brought
to the entry's ControlNet rows before it is stored, so a hint of batch 1 or B fills the same
buffer. (A graph replayed after its buffer was reallocated read freed memory: 0.47 max abs off
eager on the H200, silently.)
"""
from __future__ import annotations

import collections
import logging
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)


_STREAMS = {}


def stream(device, role):
    """The one CUDA/HIP stream of `role` ("capture": the warm-up before a capture; "side": the
    ControlNet beside the UNet encoder) on `device`, made once per process. PyTorch gives every
    stream its own cuBLAS workspace and keeps it for the life of the process (pool streams are
    handed out in turn, 32 per device), so a new stream per capture or per pipeline held more GPU
    memory each time: a benchmark process's peak grew by ~0.13 GiB with every fast pipeline it
    made and closed (H100, 72a5f6c: 3.36 -> 4.01 GiB over six), and so would a long-running demo
    with each graph it captured."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    s = _STREAMS.get((device, role))
    if s is None:
        s = _STREAMS[(device, role)] = torch.cuda.Stream(device=device)
    return s


class Key(NamedTuple):
    h: int
    w: int
    batch: int
    guess: bool
    cfg: bool
    only_mid: bool
    ctx_len: int


class StaticBuffers:
    """Named tensors of one entry: allocated by the first put(), then only copied into."""

    def __init__(self, key):
        self.key = key
        self._t = {}

    def put(self, name, value):
        """Copy `value` into the buffer `name` (allocated like `value` on first use); returns it."""
        buf = self._t.get(name)
        if buf is None:
            buf = self._t[name] = torch.empty_like(value)
        elif buf.shape != value.shape or buf.dtype != value.dtype:
            raise RuntimeError(
                f"fast mode: graph entry {tuple(self.key)}: buffer {name!r} holds "
                f"{tuple(buf.shape)} {buf.dtype}, got {tuple(value.shape)} {value.dtype}: "
                "a captured graph would read stale memory")
        buf.copy_(value)
        return buf

    def __getitem__(self, name):
        return self._t[name]

    def __contains__(self, name):
        return name in self._t

    def clear(self):
        self._t.clear()


class Entry:
    """Buffers and (once captured) the graph of one Key."""

    def __init__(self, key):
        self.key = key
        self.bufs = StaticBuffers(key)
        self.kv = {}              # model call name -> {attn2 module: (k, v) static buffers}
        self.texts = None         # (ctx_c, ctx_u) whose K/V `kv` holds (with precompute)
        self.embo = {}            # ResBlock emb_layers module -> [1, C] view of a static buffer
        self.graph = None
        self.pool = None
        self.capture_error = None
        self.decoder = None       # (graph of the VAE decode, its outputs): capture_decode
        self.decoder_error = None

    def capture(self, step, device):
        """Warm up (cuDNN autotuning if on, Triton autotune, lazy init) on a side stream, then
        capture one step on `device`. A failure is kept as `capture_error` (the entry then runs
        eager)."""
        saved = {k: self.bufs[k].clone() for k in ("x", "bad", "eps")}
        try:
            self.pool = torch.cuda.graph_pool_handle()
            self.graph, _ = _capture(lambda: step(self), device, self.pool, warmups=2)
            logger.info("fast mode: captured the step for %s", self.key)
        except Exception as err:  # a capture problem must not stop generation: run eager
            self.graph = self.pool = None
            self.capture_error = f"{type(err).__name__}: {err}"
            logger.warning("fast mode: CUDA graph capture failed for %s, running eager: %s",
                           self.key, self.capture_error)
            torch.cuda.synchronize(device)
        for k, v in saved.items():
            self.bufs[k].copy_(v)

    def capture_decode(self, decode, device):
        """Warm up, then capture `decode()` (the VAE decode of this entry's latents, returning
        its output tensors) into the step graph's memory pool: the decode's temporaries reuse the
        step's (the two never run at once), and its outputs live there too, so they are read
        before the next step replay overwrites them. A failure is kept as `decoder_error` (the
        decode then runs eager)."""
        try:
            self.decoder = _capture(decode, device, self.pool, warmups=1)
            logger.info("fast mode: captured the decode for %s", self.key)
        except Exception as err:  # as for the step: never stop a generation, decode eager
            self.decoder = None
            self.decoder_error = f"{type(err).__name__}: {err}"
            logger.warning("fast mode: CUDA graph capture of the decode failed for %s, decoding "
                           "eager: %s", self.key, self.decoder_error)
            torch.cuda.synchronize(device)

    def free(self):
        self.graph = self.pool = self.decoder = None
        self.bufs.clear()
        self.kv.clear()
        self.texts = None
        self.embo.clear()


def _capture(fn, device, pool, warmups):
    """Run fn() `warmups` times on the capture stream (cuDNN autotuning if on, Triton compiles,
    lazy init), then capture one call of it into a CUDA graph in `pool`: (graph, what that call
    returned)."""
    s = stream(device, "capture")
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


class GraphCache:
    """LRU of Entries; an evicted entry frees its graph, pool and buffers."""

    def __init__(self, size):
        self.size = size
        self._entries = collections.OrderedDict()

    def get(self, key):
        e = self._entries.get(key)
        if e is not None:
            self._entries.move_to_end(key)
            return e
        e = self._entries[key] = Entry(key)
        if len(self._entries) > self.size:
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)[1].free()
            _release_cached_memory()
        return e

    def keys(self):
        return list(self._entries)

    def clear(self):
        while self._entries:
            self._entries.popitem()[1].free()
        _release_cached_memory()


def _release_cached_memory():
    # A freed graph pool stays in the caching allocator until this: give it back to the device.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
