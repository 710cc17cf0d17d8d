"""The changed region of an edit sample: where the target differs from the source.

Toy shards carry it exactly (`{key}.mask.png`); for other data it is |source - target| above a threshold.
It serves the evaluation (the error inside and outside the region) and the region-weighted loss
(`objective.region_weighting`). It is computed once per sample: `editflow encode` stores it with the
latents (at latent resolution, `region`), the image loader takes a shard's mask or computes it when it
loads the sample.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from editflow.data.batches import Batch, EncodedBatch
from editflow.data.images import to_gray, to_rgb

# A pixel has changed when its mean absolute difference over the channels exceeds this ([0, 1] scale):
# above JPEG noise at usual qualities, below any visible recolouring.
CHANGE_THRESHOLD = 0.1


def pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] at `size` (bicubic when it must be resized)."""
    image = to_rgb(image)  # 16-bit, palette, CMYK and alpha images read as everywhere else
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255


def changed_region(source: Image.Image, target: Image.Image, mask: Image.Image | None = None,
                   threshold: float = CHANGE_THRESHOLD) -> np.ndarray:
    """Boolean (H, W) changed region at the target's size: `mask` (white = changed) when the sample has
    one, else the pixels where source and target differ by more than `threshold`."""
    if mask is not None:
        return np.asarray(to_gray(mask).resize(target.size, Image.NEAREST)) > 127
    difference = np.abs(pixels(source, target.size) - pixels(target, target.size))
    return difference.mean(-1) > threshold


def latent_region(region: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) pixel region -> (B, h, w) at latent resolution: a latent cell belongs to the region when
    any of its pixels does (max-pooling, as the public GPT-Image-Edit code does)."""
    h, w = size
    if region.shape[-2] % h or region.shape[-1] % w:
        raise ValueError(f"region of {tuple(region.shape[-2:])} pixels does not tile a {h}x{w} latent grid")
    kernel = (region.shape[-2] // h, region.shape[-1] // w)
    return torch.nn.functional.max_pool2d(region[:, None].float(), kernel)[:, 0] > 0


def batch_region(batch: Batch, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) changed region of a training batch at latent resolution: stored by `editflow encode`, or
    pooled from the image loader's pixel region."""
    if isinstance(batch, EncodedBatch):
        for sample in batch.samples:
            if "region" not in sample.tensors:
                raise KeyError(f"shard {sample.url}, key {sample.key}: no region tensor; these shards were encoded "
                               "before `editflow encode` stored changed regions. Re-run `editflow encode` to train "
                               "with objective.region_weighting, or set objective.region_weighting=none")
        return torch.stack([sample.tensors["region"].bool() for sample in batch.samples])
    return latent_region(batch.region, size)
