"""Small helpers shared by the data paths: image tensors and in-order reading of shards."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from editflow.data.samples import EditSample, decode_sample


def pixel_batch(images: list[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> (B, 3, H, W) uint8 RGB in channels-last memory.

    Channels-last is PIL's own pixel order, so each image costs one copy; conversion to floats (`unit_range`)
    is left to the device the batch is going to, where it is cheap and the batch 4x smaller on the way."""
    width, height = images[0].size
    batch = torch.empty(len(images), height, width, 3, dtype=torch.uint8)
    array = batch.numpy()
    for i, image in enumerate(images):
        array[i] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    return batch.permute(0, 3, 1, 2)


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 in [-1, 1] in contiguous memory, on the pixels' device."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1]."""
    return unit_range(pixel_batch([image]))[0]


class PixelImages:
    """The source images of a batch for Qwen: the PIL images themselves in the process that made the batch;
    made again from the batch's uint8 (B, 3, H, W) pixels, when read, in the process it was sent to.

    A DataLoader worker thus hands a batch over as shared-memory tensors alone: pickled PIL images would
    cross the process boundary through a pipe, byte by byte, and cost the training process more than the
    worker spent decoding them. Deliberately not a `collections.abc.Sequence`: the DataLoader's
    `default_convert` would rebuild one from its items, i.e. make every image in the worker."""

    def __init__(self, pixels: torch.Tensor, images: list[Image.Image] | None = None):
        self.pixels, self.images = pixels, images

    def __getstate__(self) -> dict:
        return {"pixels": self.pixels, "images": None}

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __iter__(self) -> Iterator[Image.Image]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self.images is not None:
            return self.images[index]
        return Image.fromarray(self.pixels[index].permute(1, 2, 0).numpy())


def read_samples(urls: list[str], limit: int | None = None) -> list[EditSample]:
    """Every sample of `urls` in order (evaluation and previews); a bad sample is an error, not a skip."""
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return [decode_sample(raw) for raw in itertools.islice(dataset, limit)]
