"""The FLUX autoencoder as a latent codec: images in [-1, 1] <-> normalised latents."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class LatentCodec:
    """Wraps a frozen AutoencoderKL with FLUX's latent normalisation `z = (mode - shift) * scale`."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae.eval().requires_grad_(False)
        self.shift = float(vae.config.shift_factor or 0.0)
        self.scale = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f); the posterior mode, as FluxKontextPipeline uses."""
        mode = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        return (mode - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) normalised latents -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        latents = latents.to(self.device, self.dtype) / self.scale + self.shift
        return self.vae.decode(latents).sample.clamp(-1, 1)
