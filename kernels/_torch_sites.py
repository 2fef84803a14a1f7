"""The kernels.patch sites that need no Triton: CrossAttention through PyTorch's SDPA, the
cross-attention (attn2) that reads the per-generation constant K/V of the text from a cache, and
the ResBlocks' timestep projection (emb_layers) read from a cache of the current step's values.

All three run wherever torch does (CPU too), so `patch` installs them even where the Triton kernels
cannot run. SDPA keeps the softmax in fp32 and never materializes the [N, N] logits; the model's
own CrossAttention cannot run in fp16 without autocast (fp32 logits meet fp16 V).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


def _heads(m, t):
    # [B, N, heads*d] -> [B, heads, N, d] (head-major channels, as CrossAttention splits them)
    b, n, _ = t.shape
    return t.view(b, n, m.heads, -1).transpose(1, 2)


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def split_kv(m, context):
    """(K, V) of `context` [B, L, D] for CrossAttention `m`, as [B, heads, L, d] (contiguous):
    what a `cross_kv` lookup returns."""
    return _heads(m, m.to_k(context)).contiguous(), _heads(m, m.to_v(context)).contiguous()


def _sdpa(m, x, k, v):
    out = F.scaled_dot_product_attention(_heads(m, m.to_q(x)), k, v, scale=m.scale)
    return m.to_out(_merge(out))


def _sdpa_on(m, x, context):
    ctx = x if context is None else context
    return _sdpa(m, x, _heads(m, m.to_k(ctx)), _heads(m, m.to_v(ctx)))


def cross_attentions(model):
    """The attn2 (cross-attention) module of every BasicTransformerBlock, in module order."""
    return [blk.attn2 for blk in model.modules()
            if type(blk).__name__ == "BasicTransformerBlock" and hasattr(blk, "attn2")]


def _is_cross_attention(m):
    return type(m).__name__ == "CrossAttention" and hasattr(m, "to_q") and hasattr(m, "heads")


def _patch_sdpa(handle, m):
    orig = m.forward

    def forward(self, x, context=None, mask=None):
        return handle.run("sdpa", "mask" if mask is not None else None,
                          lambda: _sdpa_on(self, x, context),
                          lambda: orig(x, context=context, mask=mask))
    handle._set(m, "forward", forward, "sdpa")


def _patch_cross_kv(handle, m, lookup, sdpa):
    orig = m.forward

    def forward(self, x, context=None, mask=None):
        # context=None means "the cached text": the fast step passes no context. A caller that
        # passes one gets attention on it (SDPA when that is on), counted as a fallback.
        if context is not None or mask is not None:
            def slow():
                if sdpa and mask is None:
                    return _sdpa_on(self, x, context)
                return orig(x, context=context, mask=mask)
            return handle.run("cross_kv", "mask" if mask is not None else "context given",
                              None, slow)
        kv = lookup(self)
        if kv is None:  # never attention on x itself: that would be a silent wrong answer
            raise RuntimeError("kernels.patch cross_kv: no cached K/V for this attn2 module "
                               "(the cache was not filled for this call)")
        handle.counts["cross_kv"]["calls"] += 1  # no fallback: the context is not here
        return _sdpa(self, x, *kv)
    handle._set(m, "forward", forward, "cross_kv")


def install_cross_kv(handle, model, lookup, sdpa):
    """The cached-K/V forward on every attn2 (first: it takes precedence over any attention)."""
    for m in cross_attentions(model):
        if "forward" not in m.__dict__:
            _patch_cross_kv(handle, m, lookup, sdpa)


def resblock_emb_layers(model):
    """The emb_layers (SiLU, Linear) of every ResBlock, in module order."""
    return [m.emb_layers for m in model.modules()
            if type(m).__name__ == "ResBlock" and isinstance(getattr(m, "emb_layers", None),
                                                             nn.Sequential)]


def _patch_emb_out(handle, m, lookup):
    orig = m.forward

    def forward(self, emb):
        # The cached value depends only on the timestep, the same for every row of the call.
        out = lookup(self)
        return handle.run("emb_out", "not cached" if out is None else None,
                          lambda: out.expand(emb.shape[0], -1), lambda: orig(emb))
    handle._set(m, "forward", forward, "emb_out")


def install_emb_out(handle, model, lookup):
    """The cached timestep projection on every ResBlock's emb_layers."""
    for m in resblock_emb_layers(model):
        if "forward" not in m.__dict__:
            _patch_emb_out(handle, m, lookup)


def install_sdpa(handle, model):
    """SDPA on every CrossAttention whose forward no other site took (the Triton attention, when
    on, is installed before this)."""
    for m in model.modules():
        if _is_cross_attention(m) and "forward" not in m.__dict__:
            _patch_sdpa(handle, m)
