"""Kontext token layout: 2x2 packing of latents and the (index, row, col) position ids.

The pipeline's own static helpers are reused, so training and diffusers'
FluxKontextPipeline pack tokens identically.
"""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    return FluxKontextPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) tokens -> (B, C, H, W) latents, for a latent grid of `height` x `width`."""
    b, n, d = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, index: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (H/2 * W/2, 3) of a packed latent grid: (index, row, col).

    index 0 is the image being generated, 1 the Kontext source, 2.. extra references.
    """
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
    ids[:, 0] = index
    return ids


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux gives every text token the position (0, 0, 0)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
