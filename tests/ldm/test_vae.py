"""The first-stage VAE (AutoencoderKL) against diffusers' AutoencoderKL, an independent implementation.

Our original-layout state dict is converted with diffusers' single-file converters and
strict-loaded; every parameter is seeded random (GroupNorm affines included). CPU, float32.
"""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FULL_CONFIG, TINY_CONFIG, assert_matches_reference
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from runtime.weights import random_weights_


def build_pair(config_path, seed=0):
    """Our VAE with random weights, and diffusers' VAE holding the very same weights."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    ours = AutoencoderKL(**cfg["model"]["params"]["first_stage_config"]["params"])
    random_weights_(ours, seed=seed)
    ours.eval()
    checkpoint = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(cfg, checkpoint)
    theirs = DiffusersAutoencoderKL(**config)
    theirs.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    theirs.eval()
    return ours, theirs


@torch.no_grad()
def test_tiny_decode_and_encode_match_diffusers():
    ours, theirs = build_pair(TINY_CONFIG)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 5, 7, generator=g)  # odd latent size
    assert_matches_reference(ours.decode(z), theirs.decode(z).sample, "decode")

    x = torch.rand(2, 3, 48, 40, generator=g) * 2 - 1
    posterior = ours.encode(x)
    reference = theirs.encode(x).latent_dist
    assert isinstance(posterior, DiagonalGaussianDistribution)
    assert posterior.mean.shape == (2, 4, 6, 5)
    assert_matches_reference(posterior.mean, reference.mean, "posterior mean")
    assert_matches_reference(posterior.std, reference.std, "posterior std")
    assert torch.equal(posterior.mode(), posterior.mean)


@pytest.mark.slow
@torch.no_grad()
def test_full_size_decode_matches_diffusers():
    ours, theirs = build_pair(FULL_CONFIG)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(2)) / 0.18215
    out = ours.decode(z)
    assert out.shape == (1, 3, 96, 128)
    assert_matches_reference(out, theirs.decode(z).sample, "full-size decode")


def test_posterior_clamps_logvar_and_samples():
    mean = torch.randn(1, 4, 3, 3)
    logvar = torch.cat([torch.full((1, 2, 3, 3), -100.0), torch.full((1, 2, 3, 3), 100.0)], 1)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    assert posterior.logvar[:, :2].eq(-30).all() and posterior.logvar[:, 2:].eq(20).all()
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    torch.manual_seed(3)
    sample = posterior.sample()
    torch.manual_seed(3)
    torch.testing.assert_close(sample, mean + posterior.std * torch.randn(mean.shape))
