"""Small helpers shared by the data paths: image tensors and in-order reading of shards."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from editflow.data.images import to_rgb
from editflow.data.samples import EditSample, decode_sample


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode, read as `to_rgb` reads it) -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def read_samples(urls: list[str], limit: int | None = None) -> list[EditSample]:
    """Every sample of `urls` in order (evaluation and previews); a bad sample is an error, not a skip."""
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return [decode_sample(raw) for raw in itertools.islice(dataset, limit)]
