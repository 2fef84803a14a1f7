"""AutoencoderKL: the first stage that maps images to 4-channel latents and back (spec §4.6).

Inference surface only (encode, decode, forward); upstream's training and logging code is left out.
"""
import logging

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=[],
                 image_key="image", colorize_nlabels=None, monitor=None):
        super().__init__()
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)  # torch.nn.Identity here: no parameters
        assert ddconfig["double_z"]
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path, ignore_keys=list()):
        """Non-strict load of `state_dict` from a Lightning checkpoint, dropping keys that start
        with any of `ignore_keys`. Tensors only (weights_only=True): no code in the pickle runs."""
        sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        for k in list(sd.keys()):
            if any(k.startswith(ik) for ik in ignore_keys):
                logger.info("Deleting key %s from state_dict.", k)
                del sd[k]
        self.load_state_dict(sd, strict=False)
        logger.info("Restored from %s", path)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True):
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
