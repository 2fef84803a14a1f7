"""The model walk behind kernels.patch: which modules get which kernel, and their new forwards.

Modules are recognised by class name plus the attributes the new forward uses, so the model code
never has to import anything from kernels. Each new forward is a plain function bound to the
instance; it reads the module's own attributes (weights, eps, heads, scale) at call time, so
`model.to(...)`, `.half()` and `load_state_dict` after patching keep working.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import _fused
from .activations import activation
from .attention import MAX_KERNEL_HEAD_DIM, attention
from .group_norm import group_norm
from .layer_norm import MAX_N as LN_MAX_N
from .layer_norm import layer_norm
from .patch import _dense_reason, _identity, _tensor_reason


def _name(m):
    return type(m).__name__


def _gn(handle, m, x, *, silu=False, add=None):
    return group_norm(x, m.num_groups, m.weight, m.bias, m.eps, silu=silu, add=add)


def _gn_reason(x):
    r = _dense_reason(x)
    if r is None and x.dim() < 3:
        r = "rank < 3"
    return r


# -- GroupNorm (optionally fused with the SiLU that follows it) ---------------------------------
def _patch_group_norm(handle, gn, silu_module=None):
    orig = gn.forward
    if silu_module is None:
        def forward(self, x):
            return handle.run("group_norm", _gn_reason(x), lambda: _gn(handle, self, x),
                              lambda: orig(x))
    else:
        orig_silu = silu_module.forward

        def forward(self, x):
            # slot 1 is now the identity, so the fallback must apply the SiLU itself
            return handle.run("group_norm", _gn_reason(x), lambda: _gn(handle, self, x, silu=True),
                              lambda: orig_silu(orig(x)))
        handle._set(silu_module, "forward", _identity)
    handle._set(gn, "forward", forward, "group_norm")


def _is_gn_silu(seq, i):
    return (isinstance(seq[i], nn.GroupNorm) and i + 1 < len(seq)
            and type(seq[i + 1]) is nn.SiLU and "forward" not in seq[i + 1].__dict__)


# -- UNet ResBlock: GN(h + emb_out) -> SiLU in one kernel ------------------------------------------
def _patch_resblock(handle, rb):
    orig = rb._forward

    def _forward(self, x, emb):
        def fast():
            h = self.in_layers(x)  # slot 0 already fused GN+SiLU, slot 1 identity
            emb_out = self.emb_layers(emb).type(h.dtype)
            gn = self.out_layers[0]
            h = _gn(handle, gn, h, silu=True, add=emb_out)
            for layer in self.out_layers[2:]:
                h = layer(h)
            return self.skip_connection(x) + h

        r = _gn_reason(x) or (None if emb.dim() == 2 else "emb rank")
        return handle.run("group_norm", r, fast, lambda: orig(x, emb))
    handle._set(rb, "_forward", _forward, "group_norm")


def _resblock_ok(m):
    return (_name(m) == "ResBlock" and hasattr(m, "_forward") and not m.use_scale_shift_norm
            and isinstance(getattr(m, "in_layers", None), nn.Sequential)
            and len(m.out_layers) == 4 and isinstance(m.out_layers[0], nn.GroupNorm)
            and type(m.out_layers[1]) is nn.SiLU)


# -- VAE ResnetBlock: norm1/norm2 fused with the functional swish --------------------------------
def _patch_resnet_block(handle, rb):
    orig = rb.forward

    def forward(self, x, temb=None):
        def fast():
            h = self.conv1(_gn(handle, self.norm1, x, silu=True))
            add = None
            if temb is not None:
                add = self.temb_proj(temb * torch.sigmoid(temb))
            h = self.conv2(self.dropout(_gn(handle, self.norm2, h, silu=True, add=add)))
            if self.in_channels != self.out_channels:
                x2 = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
            else:
                x2 = x
            return x2 + h
        return handle.run("group_norm", _gn_reason(x), fast, lambda: orig(x, temb))
    handle._set(rb, "forward", forward, "group_norm")


# -- attention -----------------------------------------------------------------------------------
def _count_sdpa(handle, d):
    if d > MAX_KERNEL_HEAD_DIM:
        handle.counts["attention"]["sdpa"] += 1


def _patch_cross_attention(handle, m):
    orig = m.forward

    def forward(self, x, context=None, mask=None):
        ctx = x if context is None else context

        def fast():
            q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
            if not (q.dtype == k.dtype == v.dtype):
                raise TypeError("q/k/v dtypes differ")
            _count_sdpa(handle, q.shape[-1] // self.heads)
            return self.to_out(attention(q, k, v, self.heads, scale=self.scale))

        r = _tensor_reason(x) or (context is not None and _tensor_reason(context)) or None
        if mask is not None:
            r = "mask"
        elif r is None and (x.dim() != 3 or ctx.dim() != 3):
            r = "rank"
        return handle.run("attention", r, fast, lambda: orig(x, context=context, mask=mask))
    handle._set(m, "forward", forward, "attention")


def _patch_clip_attention(handle, m):
    orig = m.forward

    def forward(self, x, causal_mask):
        # The mask argument is the causal -inf mask CLIPTextTransformer builds for every call;
        # checking its values would need a host sync (breaks graph capture), so its shape is
        # checked and the kernel applies the causal mask itself.
        def fast():
            q = self.q_proj(x) * self.scale  # CLIP scales q before QKᵀ: keep its rounding
            k, v = self.k_proj(x), self.v_proj(x)
            return self.out_proj(attention(q, k, v, self.num_heads, scale=1.0, causal=True))

        n = x.shape[1] if x.dim() == 3 else -1
        r = _tensor_reason(x)
        if r is None and (x.dim() != 3 or tuple(causal_mask.shape[-2:]) != (n, n)):
            r = "mask shape"
        return handle.run("attention", r, fast, lambda: orig(x, causal_mask))
    handle._set(m, "forward", forward, "attention")


def _patch_attn_block(handle, m):
    orig = m.forward

    def forward(self, x):
        def fast():
            h_ = self.norm(x)
            q, k, v = self.q(h_), self.k(h_), self.v(h_)
            b, c, hh, ww = q.shape
            tokens = [t.reshape(b, c, hh * ww).transpose(1, 2) if t.is_contiguous()
                      else t.permute(0, 2, 3, 1).reshape(b, hh * ww, c) for t in (q, k, v)]
            out = torch.empty_like(q)  # [B, C, H, W]; written through a [B, N, C] view
            o_tok = (out.view(b, c, hh * ww).transpose(1, 2) if out.is_contiguous()
                     else out.permute(0, 2, 3, 1).view(b, hh * ww, c))
            _count_sdpa(handle, c)
            attention(*tokens, 1, scale=int(c) ** (-0.5), out=o_tok)
            return x + self.proj_out(out)
        r = _dense_reason(x) or (None if x.dim() == 4 else "rank")
        return handle.run("attention", r, fast, lambda: orig(x))
    handle._set(m, "forward", forward, "attention")


# -- LayerNorm, GEGLU, activations ---------------------------------------------------------------
def _patch_layer_norm(handle, m):
    orig = m.forward

    def forward(self, x):
        r = _tensor_reason(x)
        if r is None and (len(self.normalized_shape) != 1 or x.shape[-1] > LN_MAX_N
                          or x.stride(-1) != 1):
            r = "shape"
        return handle.run("layer_norm", r, lambda: layer_norm(x, self.weight, self.bias, self.eps),
                          lambda: orig(x))
    handle._set(m, "forward", forward, "layer_norm")


def _patch_geglu(handle, m):
    orig = m.forward

    def forward(self, x):
        return _fused.run_geglu(handle, self, x, orig, _tensor_reason(x))
    handle._set(m, "forward", forward, "geglu")


def _patch_activation(handle, m, mode, compute_input=None):
    orig = m.forward
    if compute_input is None:
        def forward(self, x):
            return handle.run("silu", _dense_reason(x), lambda: activation(x, mode), lambda: orig(x))
    else:  # CLIPMLP: fc2(quick_gelu(fc1(x)))
        def forward(self, x):
            def fast():
                return self.fc2(activation(self.fc1(x).contiguous(), mode))
            return handle.run("silu", _tensor_reason(x), fast, lambda: orig(x))
    handle._set(m, "forward", forward, "silu")


def _is_self_attention(m, mods):
    """attn1 of a BasicTransformerBlock that attends to its own input (not disable_self_attn)."""
    return any(getattr(b, "attn1", None) is m and not getattr(b, "disable_self_attn", False)
               for b in mods if _name(b) == "BasicTransformerBlock")


def _attention_kernel(handle, m, self_attention):
    """Does CrossAttention `m` get the Triton attention (the handle's policy, if it has one)?"""
    policy = handle.attention_policy
    return handle.enabled["attention"] and (policy is None or bool(policy(m, self_attention)))


def install(handle, model):
    en = handle.enabled
    mods = list(model.modules())
    done = set()  # ids of modules whose forward is taken care of

    def fresh(m):
        return id(m) not in done and "forward" not in m.__dict__

    fu = handle.fusions
    for m in mods:  # block-level fusions first: their forwards replace the per-op sites
        if "spatial_transformer" in fu and _fused.spatial_transformer_ok(m) and fresh(m):
            _fused.patch_spatial_transformer(handle, m)
        elif "add_layer_norm" in fu and en["layer_norm"] and _fused.transformer_block_ok(m) \
                and "_forward" not in m.__dict__:
            _fused.patch_transformer_block(
                handle, m, ff_residual="ff_residual" in fu and _fused.ff_residual_ok(m))
        elif "qkv" in fu and _fused.qkv_ok(m) and _is_self_attention(m, mods) and fresh(m):
            _fused.patch_qkv(handle, m, use_kernel=_attention_kernel(handle, m, True))
            done.add(id(m))
        elif "conv1x1_bias" in fu and _fused.conv1x1_ok(m) and fresh(m):
            _fused.patch_conv1x1(handle, m)
            done.add(id(m))
        elif "conv_gemm" in fu and _fused.conv_gemm_ok(m) and fresh(m):
            _fused.patch_conv_gemm(handle, m)
            done.add(id(m))
        elif "geglu_gemm" in fu and en["geglu"] and _fused.geglu_gemm_ok(m) and fresh(m):
            _fused.patch_geglu_gemm(handle, m)
            done.add(id(m))
    if en["group_norm"]:
        for m in mods:
            if "conv_bias" in fu and _fused.resblock_ok(m) and "_forward" not in m.__dict__:
                _fused.patch_resblock(handle, m)
            elif _resblock_ok(m) and "_forward" not in m.__dict__:
                _patch_resblock(handle, m)
            elif _name(m) == "ResnetBlock" and isinstance(getattr(m, "norm1", None), nn.GroupNorm) \
                    and fresh(m):
                _patch_resnet_block(handle, m)
        for m in mods:
            if isinstance(m, nn.Sequential):
                for i in range(len(m)):
                    if _is_gn_silu(m, i) and fresh(m[i]):
                        _patch_group_norm(handle, m[i], m[i + 1])
                        done.update((id(m[i]), id(m[i + 1])))
        for m in mods:
            if isinstance(m, nn.GroupNorm) and fresh(m):
                _patch_group_norm(handle, m)
                done.add(id(m))
    for m in mods:
        if not fresh(m):
            continue
        name = _name(m)
        if name == "CrossAttention" and hasattr(m, "to_q") \
                and _attention_kernel(handle, m, _is_self_attention(m, mods)):
            _patch_cross_attention(handle, m)
        elif en["attention"] and name == "CLIPAttention" and hasattr(m, "q_proj"):
            _patch_clip_attention(handle, m)
        elif en["attention"] and name == "AttnBlock" and hasattr(m, "proj_out"):
            _patch_attn_block(handle, m)
        elif en["layer_norm"] and isinstance(m, nn.LayerNorm):
            _patch_layer_norm(handle, m)
        elif en["geglu"] and name == "GEGLU" and hasattr(m, "proj"):
            _patch_geglu(handle, m)
        elif en["silu"] and name == "CLIPMLP" and hasattr(m, "fc1"):
            _patch_activation(handle, m, "quick_gelu", compute_input=True)
        elif en["silu"] and type(m) is nn.SiLU:
            _patch_activation(handle, m, "silu")
