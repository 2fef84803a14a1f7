"""Upstream's environment hacks that canny2image can use: disable_verbosity, and the sliced
attention that `config.save_memory` switches on (upstream's docs/low_vram.md)."""
import logging

import torch
import torch.nn.functional as F

import ldm.modules.attention
from ldm.modules.diffusionmodules.model import AttnBlock

logger = logging.getLogger(__name__)

_ORIGINAL_FORWARD = ldm.modules.attention.CrossAttention.forward
_ORIGINAL_ATTN_BLOCK_FORWARD = AttnBlock.forward
# The largest block of attention logits sliced attention computes at once: upstream's one
# [N, N] float32 slice at 512² (N = 4096 tokens).
SLICE_BYTES = 64 << 20


def disable_verbosity():
    """Silence transformers' info/warning logging (upstream does this at import of `share`)."""
    try:
        from transformers import logging as transformers_logging
    except ImportError:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return
    transformers_logging.set_verbosity_error()


def enable_sliced_attention():
    """Make every CrossAttention compute its attention in slices, as upstream's save_memory does
    (one (batch, head) slice at a time), class-wide, for every model in the process, and the VAE's
    AttnBlock likewise (one image at a time). Each slice is further cut into blocks of query rows
    so that no block of logits exceeds SLICE_BYTES: upstream's one [N, N] slice per head grows
    with the square of the pixel count (340 MiB at 768², 16 GiB at 2048²), the blocks do not.
    Up to 512² a slice is a single block, exactly upstream's computation; above it only the
    blocking of the same rows changes (softmax is per row). Instance-level forwards
    (kernels.patch) still take precedence."""
    ldm.modules.attention.CrossAttention.forward = sliced_attention_forward
    AttnBlock.forward = sliced_attn_block_forward
    logger.info("Enabled sliced attention.")


def disable_sliced_attention():
    """Undo enable_sliced_attention (safe to call when it is not enabled)."""
    ldm.modules.attention.CrossAttention.forward = _ORIGINAL_FORWARD
    AttnBlock.forward = _ORIGINAL_ATTN_BLOCK_FORWARD


def sliced_attention_enabled():
    return ldm.modules.attention.CrossAttention.forward is sliced_attention_forward


def _row_blocks(queries, keys):
    """Ranges of query rows whose [rows, keys] float32 logits fit in SLICE_BYTES (at least one
    row per block)."""
    rows = max(1, SLICE_BYTES // (4 * keys))
    return [(r, min(r + rows, queries)) for r in range(0, queries, rows)]


def sliced_attention_forward(self, x, context=None, mask=None):
    """CrossAttention.forward with the logits, softmax and weighted sum done per (batch, head)
    slice and block of query rows, written into a float32 [B*heads, N, d] result, as upstream's
    hack does per slice. Like upstream's, it ignores `mask` and has no ATTN_PRECISION cast (the
    canny path is float32)."""
    context = x if context is None else context
    q = self._split_heads(self.to_q(x))
    k = self._split_heads(self.to_k(context))
    v = self._split_heads(self.to_v(context))
    del context, x
    # upstream's buffer: torch.zeros with the default dtype, on q's device
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device)
    blocks = _row_blocks(q.shape[1], k.shape[1])
    for i in range(q.shape[0]):
        for r0, r1 in blocks:
            sim = torch.einsum("b i d, b j d -> b i j", q[i:i + 1, r0:r1], k[i:i + 1]) * self.scale
            sim = sim.softmax(dim=-1)
            out[i:i + 1, r0:r1] = torch.einsum("b i j, b j d -> b i d", sim, v[i:i + 1])
            del sim
    return self.to_out(self._merge_heads(out))


def sliced_attn_block_forward(self, x):
    """AttnBlock.forward (the VAE's single-head attention over all pixels) one image and block of
    query rows at a time, the same operations per row as the unsliced forward."""
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    del h_
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)  # [B, N, C]
    k = k.reshape(b, c, h * w)  # [B, C, N]
    v = v.reshape(b, c, h * w)
    out = torch.empty(b, c, h * w, dtype=q.dtype, device=q.device)
    for i in range(b):
        for r0, r1 in _row_blocks(h * w, h * w):
            w_ = torch.bmm(q[i:i + 1, r0:r1], k[i:i + 1]) * (int(c) ** (-0.5))
            w_ = F.softmax(w_, dim=2)
            out[i:i + 1, :, r0:r1] = torch.bmm(v[i:i + 1], w_.permute(0, 2, 1))
            del w_
    return x + self.proj_out(out.reshape(b, c, h, w))
