"""ControlNet: a trainable copy of the UNet encoder whose outputs, through zero-initialized 1x1
convs, are added to the skip connections and the middle of a frozen SD UNet."""
import torch
import torch.nn as nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.openaimodel import (
    UNetModel,
    TimestepEmbedSequential,
    UNET_CONFIG_NAMES,
    make_input_blocks,
    make_middle_block,
    store_unet_config,
    make_time_embed,
    check_supported,
)
from ldm.modules.diffusionmodules.util import conv_nd, timestep_embedding, zero_module
from ldm.util import instantiate_from_config


class ControlledUnetModel(UNetModel):
    """UNetModel whose decoder adds the ControlNet residuals to the skips and the middle."""

    def forward(self, x, timesteps=None, context=None, control=None, only_mid_control=False, **kwargs):
        """`control`: 13 residuals in ControlNet order (12 input blocks, then middle); the middle
        one is added to h, then output block j gets cat[h, hs[11-j] + control[11-j]]."""
        hs = []
        with torch.no_grad():
            t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
            emb = self.time_embed(t_emb)
            h = x.type(self.dtype)
            for module in self.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = self.middle_block(h, emb, context)

        # Upstream pops from the caller's list; a copy gives the same order without the side effect.
        control = None if control is None else list(control)
        if control is not None:
            h += control.pop()

        for module in self.output_blocks:
            if only_mid_control or control is None:
                h = torch.cat([h, hs.pop()], dim=1)
            else:
                h = torch.cat([h, hs.pop() + control.pop()], dim=1)
            h = module(h, emb, context)

        h = h.type(x.dtype)
        return self.out(h)


class ControlNet(nn.Module):
    """The UNet encoder (time_embed, input_blocks, middle_block; same keys as the UNet) plus
    `input_hint_block` (hint image -> latent-sized features, added after input block 0),
    `zero_convs` (one per input block) and `middle_block_out`."""

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        hint_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
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
        check_supported(use_spatial_transformer, resblock_updown, None, n_embed, num_res_blocks, channel_mult)
        store_unet_config(self, locals(), UNET_CONFIG_NAMES)
        self.hint_channels = hint_channels

        # Registration order = upstream's state_dict order:
        # time_embed, input_blocks, zero_convs, input_hint_block, middle_block, middle_block_out.
        self.time_embed = make_time_embed(self)
        self.input_blocks, input_block_chans, ch, _ = make_input_blocks(self)
        self.zero_convs = nn.ModuleList([self.make_zero_conv(c) for c in input_block_chans])
        self.input_hint_block = TimestepEmbedSequential(
            conv_nd(dims, hint_channels, 16, 3, padding=1),
            nn.SiLU(),
            conv_nd(dims, 16, 16, 3, padding=1),
            nn.SiLU(),
            conv_nd(dims, 16, 32, 3, padding=1, stride=2),
            nn.SiLU(),
            conv_nd(dims, 32, 32, 3, padding=1),
            nn.SiLU(),
            conv_nd(dims, 32, 96, 3, padding=1, stride=2),
            nn.SiLU(),
            conv_nd(dims, 96, 96, 3, padding=1),
            nn.SiLU(),
            conv_nd(dims, 96, 256, 3, padding=1, stride=2),
            nn.SiLU(),
            zero_module(conv_nd(dims, 256, model_channels, 3, padding=1)),
        )
        self.middle_block = make_middle_block(self, ch)
        self.middle_block_out = self.make_zero_conv(ch)

    def make_zero_conv(self, channels):
        return TimestepEmbedSequential(zero_module(conv_nd(self.dims, channels, channels, 1, padding=0)))

    def forward(self, x, hint, timesteps, context, **kwargs):
        """x [B,4,h,w], hint [B,3,8h,8w] -> 13 residuals (12 input blocks, then middle)."""
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        guided_hint = self.input_hint_block(hint, emb, context)

        outs = []
        h = x.type(self.dtype)
        for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h += guided_hint
            outs.append(zero_conv(h, emb, context))

        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


class ControlLDM(LatentDiffusion):
    """LatentDiffusion with a ControlNet (`control_model`); `control_scales` (13 floats, set by
    the caller) multiply the residuals before they reach the UNet."""

    def __init__(self, control_stage_config, control_key, only_mid_control, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.control_scales = [1.0] * 13

    def apply_model(self, x_noisy, t, cond, *args, **kwargs):
        """eps for `cond` = {'c_crossattn': [context], 'c_concat': [hint] or None (no control)}."""
        assert isinstance(cond, dict)
        diffusion_model = self.model.diffusion_model
        cond_txt = torch.cat(cond["c_crossattn"], 1)

        if cond["c_concat"] is None:
            return diffusion_model(
                x=x_noisy, timesteps=t, context=cond_txt, control=None, only_mid_control=self.only_mid_control
            )
        control = self.control_model(x=x_noisy, hint=torch.cat(cond["c_concat"], 1), timesteps=t, context=cond_txt)
        control = [c * scale for c, scale in zip(control, self.control_scales)]
        return diffusion_model(
            x=x_noisy, timesteps=t, context=cond_txt, control=control, only_mid_control=self.only_mid_control
        )

    def low_vram_shift(self, is_diffusing):
        """Upstream's save_memory placement: while diffusing, the UNet (`model`) and the ControlNet
        on the model's device and the VAE and CLIP in host memory; otherwise the reverse. The
        model's device (its schedule buffers, `device`) stays put, so noise and inputs are made
        where they would be without the shift."""
        device, host = self.device, torch.device("cpu")
        diffusion, other = (device, host) if is_diffusing else (host, device)
        self.model = self.model.to(diffusion)
        self.control_model = self.control_model.to(diffusion)
        self.first_stage_model = self.first_stage_model.to(other)
        self.cond_stage_model = self.cond_stage_model.to(other)

    @torch.no_grad()
    def get_unconditional_conditioning(self, N):
        return self.get_learned_conditioning([""] * N)
