"""The UNet/ControlNet forward in the pieces fast mode needs: the ControlNet takes the hint block's
output precomputed, and runs (on a second stream) beside the UNet encoder until the decoder needs
its residuals. Each piece is the matching part of cldm/cldm.py's forwards and honours the same
options: no control (c_concat None), `only_mid_control` (only the middle residual reaches the
UNet), and the control scales (applied by the caller between the two, as apply_model does).
tests/runtime/test_fast_split.py compares the pieces with ControlLDM.apply_model for each option.
"""
import torch


def control_forward(cn, x, emb, context, guided_hint):
    """ControlNet.forward with the hint block's output given: 13 residuals (before scaling)."""
    outs = []
    h = x
    for i, (block, zero_conv) in enumerate(zip(cn.input_blocks, cn.zero_convs)):
        h = block(h, emb, context)
        if i == 0:
            h = h + guided_hint
        outs.append(zero_conv(h, emb, context))
    h = cn.middle_block(h, emb, context)
    outs.append(cn.middle_block_out(h, emb, context))
    return outs


def unet_encoder(unet, x, emb, context):
    """ControlledUnetModel's first half: (middle block output, the 12 skips)."""
    hs = []
    h = x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        hs.append(h)
    return unet.middle_block(h, emb, context), hs


def unet_decoder(unet, h, hs, emb, context, control, only_mid_control=False, scales=None,
                 skip_cat=None):
    """ControlledUnetModel's second half: the middle residual, then skip (+ its residual unless
    only_mid_control) per output block. `control`: the 13 residuals, or None; scaled already, or
    unscaled with `scales` given (control[i] · scales[i] is applied here). `skip_cat(h, skip,
    ctrl, scale)` (kernels' fusion "skip_cat") makes cat([h, skip + ctrl · scale]) in one kernel
    instead of a mul, an add and a cat."""
    if control is not None:
        h = h + (control[-1] if scales is None else control[-1] * scales[len(control) - 1])
    for j, block in enumerate(unet.output_blocks):
        skip = hs[-1 - j]
        i = len(unet.output_blocks) - 1 - j  # index of this skip's residual
        ctrl = None if (control is None or only_mid_control) else control[i]
        sc = None if (ctrl is None or scales is None) else scales[i:i + 1]
        if skip_cat is not None:
            h = block(skip_cat(h, skip, ctrl, sc), emb, context)
        else:
            h = block(cat_skip(h, skip, ctrl, sc), emb, context)
    return unet.out(h)


def cat_skip(h, skip, ctrl, scale):
    """cat([h, skip + ctrl · scale], dim=1) in PyTorch ops (what the skip_cat kernel fuses)."""
    if ctrl is not None:
        skip = skip + (ctrl if scale is None else ctrl * scale)
    return torch.cat([h, skip], dim=1)
