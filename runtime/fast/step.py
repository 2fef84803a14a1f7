"""One denoising step of fast mode: ControlNet + UNet, classifier-free guidance, the DDIM update,
all on one graph entry's static buffers and in place, so it can be captured (no host syncs).

Guidance: cond and uncond in one call of batch 2B (rows [uncond; cond]) with `batched_cfg`, or two
calls; guess mode runs the ControlNet on the cond rows only and adds zero residuals to the uncond
rows, which is exactly upstream's uncond call without control; guidance scale 1 runs the cond
call alone. The guidance combine and the DDIM update run in fp32 on fp32 latents, with the
reference's float32 per-step scalars: one kernel with kernels' "ddim_update" fusion, else
PyTorch ops (`ddim_eager`), bit for bit the same.
"""
from __future__ import annotations

import torch

from ldm.modules.diffusionmodules.util import timestep_embedding
from runtime.fast.graphs import stream
from runtime.fast.split import cat_skip, control_forward, unet_decoder, unet_encoder


def model_calls(key, batched_cfg):
    """The model calls of one step: [(name, ControlNet off for this call)]."""
    if not key.cfg:
        return [("cond", False)]
    if batched_cfg:
        return [("both", False)]
    return [("cond", False), ("uncond", key.guess)]


def control_rows(key, batched_cfg):
    """Rows of the ControlNet's input in the step's calls (the same in each call)."""
    return 2 * key.batch if key.cfg and batched_cfg and not key.guess else key.batch


class Step:
    """`step(entry)`: one DDIM step on entry.bufs["x"] in place."""

    def __init__(self, nets, precompute, cross_kv, emb_out, options, device):
        self.nets, self.unet, self.control = nets, nets.unet, nets.control
        self.pre, self.kv, self.embo, self.options = precompute, cross_kv, emb_out, options
        self.side = (stream(device, "side")
                     if options.two_streams and device.type == "cuda" else None)

    def model_eps(self, e, name, control_off):
        """One UNet(+ControlNet) call of the step; eps in the fast dtype."""
        o, b, key = self.options, e.bufs, e.key
        x = b["x"].to(o.dtype)
        if name == "both":
            x = torch.cat([x, x])
        x = self.pre.fmt(x)
        rows = x.shape[0]
        if o.precompute:
            emb_u, emb_c = b["emb"][0:1].expand(rows, -1), b["emb"][1:2]
            ctx_u = ctx_c = None  # the attn2 modules read the cached K/V
            self.kv.current = e.kv[name]
        else:
            temb = timestep_embedding(b["t"], self.unet.model_channels).to(o.dtype)
            emb_u = self.unet.time_embed(temb).expand(rows, -1)
            emb_c = self.control.time_embed(temb)
            ctx_u, ctx_c = b["ctx_u_" + name], b["ctx_c_" + name]
        # Which rows get the ControlNet: all, the cond half (guess mode, batched), or none.
        if control_off:
            xc = None
        elif name == "both" and key.guess:
            xc = x[key.batch:]
        else:
            xc = x

        fused_cat = self.skip_cat()

        def run_control():
            g = b["g"] if o.precompute else self.control.input_hint_block(b["hint"], None, None)
            res = control_forward(self.control, xc, emb_c.expand(xc.shape[0], -1), ctx_c, g)
            if fused_cat is None:  # else the decoder's skip_cat kernel applies the scales
                res = [r * b["cscales"][i] for i, r in enumerate(res)]
            if xc.shape[0] != rows:      # guess mode: zero residuals for the uncond rows
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            return res

        control = None
        if xc is not None and self.side is not None:
            cur = torch.cuda.current_stream()
            self.side.wait_stream(cur)
            with torch.cuda.stream(self.side):
                control = run_control()
            hm, hs = unet_encoder(self.unet, x, emb_u, ctx_u)
            cur.wait_stream(self.side)
        else:
            if xc is not None:
                control = run_control()
            hm, hs = unet_encoder(self.unet, x, emb_u, ctx_u)
        return unet_decoder(self.unet, hm, hs, emb_u, ctx_u, control, key.only_mid,
                            scales=None if fused_cat is None else b["cscales"], skip_cat=fused_cat)

    def fusion(self, name):
        """The patch handle when it has kernels' fusion `name` (counted through handle.run),
        else None."""
        h = self.nets.handle
        if h is None or not self.nets.kernels_active or name not in h.fusions:
            return None
        return h

    def skip_cat(self):
        """kernels' skip_cat when the handle has that fusion, else None."""
        h = self.fusion("skip_cat")
        if h is None:
            return None
        from kernels.residual import skip_cat
        return lambda *a: h.run("skip_cat", None, lambda: skip_cat(*a), lambda: cat_skip(*a))

    def __call__(self, e):
        b, key = e.bufs, e.key
        if self.options.precompute:   # the ResBlocks read this step's projections (static buffer)
            self.embo.current = e.embo
        try:
            outs = [self.model_eps(e, name, off)
                    for name, off in model_calls(key, self.options.batched_cfg)]
        finally:
            self.embo.current = None
        e_u, e_c, g = None, outs[0], None
        if key.cfg:
            e_u, e_c = outs[0].chunk(2) if len(outs) == 1 else outs[::-1]
            g = b["gscale"]
        bad = b["bad"] if self.options.nan_check else None
        h = self.fusion("ddim_update")
        if h is None:
            ddim_eager(b, e_u, e_c, g, bad)
        else:
            from kernels.ddim import ddim_update
            h.run("ddim_update", None,
                  lambda: ddim_update(b["x"], e_c, b["sc"], b["noise"], b["eps"], e_u, g, bad),
                  lambda: ddim_eager(b, e_u, e_c, g, bad))


def ddim_eager(b, e_u, e_c, gscale, bad):
    """Guidance (e_u None: none) and the DDIM update in PyTorch fp32 ops on the static buffers `b`
    (x and eps in place; bad |= non-finite eps unless None): what kernels' ddim_update fuses."""
    eps = e_c.float()
    if e_u is not None:
        u = e_u.float()
        eps = u + gscale * (eps - u)
    x = b["x"]
    a_t, a_prev, sigma, s1m = (b["sc"][i].view(1, 1, 1, 1) for i in range(4))
    pred_x0 = (x - s1m * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma * b["noise"]
    if bad is not None:
        torch.logical_or(bad, ~torch.isfinite(eps).all(), out=bad)
    b["eps"].copy_(eps)
    x.copy_(x_prev)
