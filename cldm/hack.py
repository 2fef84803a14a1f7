"""Upstream's environment hacks that canny2image can use: disable_verbosity, and the sliced
attention that `config.save_memory` switches on (upstream's docs/low_vram.md)."""
import logging

import torch

import ldm.modules.attention

logger = logging.getLogger(__name__)

_ORIGINAL_FORWARD = ldm.modules.attention.CrossAttention.forward


def disable_verbosity():
    """Silence transformers' info/warning logging (upstream does this at import of `share`)."""
    try:
        from transformers import logging as transformers_logging
    except ImportError:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return
    transformers_logging.set_verbosity_error()


def enable_sliced_attention():
    """Make every CrossAttention compute its attention one (batch, head) slice at a time, as
    upstream's save_memory does: class-wide, for every model in the process. The largest
    temporary shrinks from [B*heads, N, N] logits to one [N, N] slice (512 MiB -> 64 MiB at 512²,
    batch 1). Instance-level forwards (kernels.patch) still take precedence."""
    ldm.modules.attention.CrossAttention.forward = sliced_attention_forward
    logger.info("Enabled sliced attention.")


def disable_sliced_attention():
    """Undo enable_sliced_attention (safe to call when it is not enabled)."""
    ldm.modules.attention.CrossAttention.forward = _ORIGINAL_FORWARD


def sliced_attention_enabled():
    return ldm.modules.attention.CrossAttention.forward is sliced_attention_forward


def sliced_attention_forward(self, x, context=None, mask=None):
    """CrossAttention.forward with the logits, softmax and weighted sum done per (batch, head)
    slice, written into a float32 [B*heads, N, d] result, as upstream's hack does. Like
    upstream's, it ignores `mask` and has no ATTN_PRECISION cast (the canny path is float32)."""
    context = x if context is None else context
    q = self._split_heads(self.to_q(x))
    k = self._split_heads(self.to_k(context))
    v = self._split_heads(self.to_v(context))
    del context, x
    # upstream's buffer: torch.zeros with the default dtype, on q's device
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device)
    for i in range(q.shape[0]):
        sim = torch.einsum("b i d, b j d -> b i j", q[i:i + 1], k[i:i + 1]) * self.scale
        sim = sim.softmax(dim=-1)
        out[i:i + 1] = torch.einsum("b i j, b j d -> b i d", sim, v[i:i + 1])
        del sim
    return self.to_out(self._merge_heads(out))
