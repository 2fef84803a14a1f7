"""The SD1.5 UNet (guided-diffusion's UNetModel with SpatialTransformer attention) and its parts.

Only the configuration family SD1.x/2.x uses is implemented: spatial-transformer attention, no
class conditioning, no up/down-sampling ResBlocks. Other options raise NotImplementedError.
The encoder half is built by `make_input_blocks`/`make_middle_block`, shared with cldm.cldm.ControlNet.
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embeddings `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 (inner two dims for 3D), then an optional 3x3 conv (`conv`)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`, padding 1 on all sides) or average pooling (inner dims for 3D)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """skip(x) + out_layers(in_layers(x) + emb_layers(emb)).

    in_layers = [GroupNorm32, SiLU, conv3x3]; emb_layers = [SiLU, Linear(emb -> out)];
    out_layers = [GroupNorm32, SiLU, Dropout, conv3x3 (zero-init)]; skip_connection = Identity,
    or a 1x1 conv (3x3 with use_conv) when the channel count changes. The embedding is added
    broadcast over the spatial dims, before out_layers. With use_scale_shift_norm the embedding
    gives (scale, shift) applied after out_layers[0] instead.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        if up or down:
            raise NotImplementedError("ResBlock up/down sampling (resblock_updown) is not implemented in this port")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


def check_supported(
    use_spatial_transformer, resblock_updown, num_classes=None, n_embed=None, num_res_blocks=None, channel_mult=()
):
    """Raise NotImplementedError for the constructor options this port leaves out."""
    if not use_spatial_transformer:
        raise NotImplementedError("only use_spatial_transformer=True (SD1.x/2.x) is implemented in this port")
    if resblock_updown:
        raise NotImplementedError("resblock_updown=True is not implemented in this port")
    if num_classes is not None:
        raise NotImplementedError("class conditioning (num_classes) is not implemented in this port")
    if n_embed is not None:
        raise NotImplementedError("codebook prediction (n_embed) is not implemented in this port")
    if not isinstance(num_res_blocks, int) and len(num_res_blocks) != len(channel_mult):
        raise ValueError("num_res_blocks must be an int or a list with the same length as channel_mult")


def heads_and_dim_head(ch, num_heads, num_head_channels, legacy):
    """Upstream's head rule for a SpatialTransformer at `ch` channels: a fixed head count
    (num_head_channels == -1) or a fixed head width; `legacy` recomputes the width from the count."""
    if num_head_channels == -1:
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads
    return heads, dim_head


def _spatial_transformer(m, ch, level, disable_self_attn=None):
    heads, dim_head = heads_and_dim_head(ch, m.num_heads, m.num_head_channels, m.legacy)
    if disable_self_attn is None:
        disable_self_attn = m.disable_self_attentions[level] if m.disable_self_attentions is not None else False
    return SpatialTransformer(
        ch,
        heads,
        dim_head,
        depth=m.transformer_depth,
        dropout=m.dropout,
        context_dim=m.context_dim,
        disable_self_attn=disable_self_attn,
        use_linear=m.use_linear_in_transformer,
        use_checkpoint=m.use_checkpoint,
    )


def _res_block(m, ch, out_ch):
    return ResBlock(
        ch,
        m.model_channels * 4,
        m.dropout,
        out_channels=out_ch,
        dims=m.dims,
        use_checkpoint=m.use_checkpoint,
        use_scale_shift_norm=m.use_scale_shift_norm,
    )


def _has_attention(m, ds, level, nr):
    return ds in m.attention_resolutions and (m.num_attention_blocks is None or nr < m.num_attention_blocks[level])


def make_input_blocks(m):
    """Encoder blocks of a UNet-shaped module `m` (UNetModel or ControlNet): returns
    (input_blocks, channels after each block, final channels, final downsampling factor)."""
    blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(m.dims, m.in_channels, m.model_channels, 3, padding=1))])
    chans = [m.model_channels]
    ch, ds = m.model_channels, 1
    for level, mult in enumerate(m.channel_mult):
        for nr in range(m.num_res_blocks[level]):
            layers = [_res_block(m, ch, mult * m.model_channels)]
            ch = mult * m.model_channels
            if _has_attention(m, ds, level, nr):
                layers.append(_spatial_transformer(m, ch, level))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(m.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch, m.conv_resample, dims=m.dims, out_channels=ch)))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ch, ds


def make_middle_block(m, ch):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""
    return TimestepEmbedSequential(
        _res_block(m, ch, ch),
        _spatial_transformer(m, ch, None, disable_self_attn=m.disable_middle_self_attn),
        _res_block(m, ch, ch),
    )


def make_time_embed(m):
    time_embed_dim = m.model_channels * 4
    return nn.Sequential(
        linear(m.model_channels, time_embed_dim),
        nn.SiLU(),
        linear(time_embed_dim, time_embed_dim),
    )


def store_unet_config(m, local_vars, names):
    """Keep the constructor arguments as attributes (as upstream does), normalized."""
    for name in names:
        setattr(m, name, local_vars[name])
    if isinstance(m.num_res_blocks, int):
        m.num_res_blocks = [m.num_res_blocks] * len(m.channel_mult)
    if m.num_heads_upsample == -1:
        m.num_heads_upsample = m.num_heads
    if m.num_heads == -1 and m.num_head_channels == -1:
        raise ValueError("either num_heads or num_head_channels has to be set")
    if m.context_dim is not None and not isinstance(m.context_dim, int):
        m.context_dim = list(m.context_dim)
    m.dtype = torch.float16 if m.use_fp16 else torch.float32


UNET_CONFIG_NAMES = (
    "image_size in_channels model_channels num_res_blocks attention_resolutions dropout channel_mult "
    "conv_resample dims use_checkpoint use_fp16 num_heads num_head_channels num_heads_upsample "
    "use_scale_shift_norm transformer_depth context_dim legacy disable_self_attentions "
    "num_attention_blocks disable_middle_self_attn use_linear_in_transformer"
).split()


class UNetModel(nn.Module):
    """The diffusion UNet: time_embed, input_blocks, middle_block, output_blocks, out.

    Constructor parameters are upstream's; `image_size`, `use_new_attention_order` and
    `num_heads_upsample` have no effect with spatial-transformer attention.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=-1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        use_spatial_transformer=False,
        transformer_depth=1,
        context_dim=None,
        n_embed=None,
        legacy=True,
        disable_self_attentions=None,
        num_attention_blocks=None,
        disable_middle_self_attn=False,
        use_linear_in_transformer=False,
    ):
        super().__init__()
        check_supported(use_spatial_transformer, resblock_updown, num_classes, n_embed, num_res_blocks, channel_mult)
        store_unet_config(self, locals(), UNET_CONFIG_NAMES)
        self.out_channels = out_channels
        self.num_classes = None
        self.predict_codebook_ids = False

        self.time_embed = make_time_embed(self)
        self.input_blocks, input_block_chans, ch, ds = make_input_blocks(self)
        self.middle_block = make_middle_block(self, ch)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [_res_block(self, ch + input_block_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if _has_attention(self, ds, level, i):
                    layers.append(_spatial_transformer(self, ch, level))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """x [B, C, H, W], timesteps [B], context [B, L, context_dim] -> [B, out_channels, H, W]."""
        if y is not None:
            raise NotImplementedError("class conditioning (y) is not implemented in this port")
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        return self.out(h)
