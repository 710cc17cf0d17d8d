"""Image tensors of the data paths: batches of uint8 pixels (normalised on the device they go to), and the
source images Qwen reads, carried across a DataLoader worker as those pixels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from editflow.data.images import to_rgb


def pixel_batch(images: list[Image.Image]) -> torch.Tensor:
    """Same-size PIL images -> (B, 3, H, W) uint8 RGB in channels-last memory.

    Channels-last is PIL's own pixel order, so each image costs one copy; conversion to floats (`unit_range`)
    is left to the device the batch is going to, where it is cheap and the batch 4x smaller on the way."""
    width, height = images[0].size
    batch = torch.empty(len(images), height, width, 3, dtype=torch.uint8)
    array = batch.numpy().reshape(len(images), -1)
    for i, image in enumerate(images):
        _copy_rgb(to_rgb(image), array[i])
    return batch.permute(0, 3, 1, 2)


def _copy_rgb(image: Image.Image, out: np.ndarray) -> None:
    """An RGB image's pixels into `out` (flat uint8, H*W*3), packed by PIL's raw encoder piece by piece.

    `np.asarray(image)` costs a third more for 1024-px images: `tobytes` packs into pieces, joins them into a
    new bytes object and numpy copies that again, each a fresh allocation of the whole image (measured 0.78
    against 0.59 ms per 1-megapixel image). `Image._getencoder` is what `tobytes` itself calls."""
    encoder = Image._getencoder("RGB", "raw", "RGB")
    encoder.setimage(image.im, (0, 0, *image.size))
    piece, done = max(1 << 18, image.width * 4), 0  # whole rows per piece, as `tobytes` asks for
    while True:
        _, status, data = encoder.encode(piece)
        out[done:done + len(data)] = np.frombuffer(data, np.uint8)
        done += len(data)
        if status:
            break
    if status < 0 or done != out.size:
        raise ValueError(f"raw encoder error {status} after {done} of {out.size} bytes of a {image.size} image")


def unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 in [-1, 1] in contiguous memory, on the pixels' device."""
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode, read as `to_rgb` reads it) -> (3, H, W) float tensor in [-1, 1]."""
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
