"""The training batches the data stream makes, all samples of one aspect bucket: `ImageBatch` of decoded
images (`stream.collate_images`) and `EncodedBatch` of what `editflow encode` stored
(`preencoded.collate_encoded`). `frozen_encoders.FrozenEncoder` turns either into the model's inputs.

Batches hold data only (the loader reports skipped samples, `stream.ResumableLoader.skips`). They cross
DataLoader worker processes pickled, their tensors in shared memory, and may be pinned: torch's
`pin_memory` calls a batch's own `pin_memory()`, which returns a copy whose tensors are pinned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image

from editflow.data.pixels import PixelImages

if TYPE_CHECKING:
    from editflow.data.preencoded import EncodedSample


def _pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.pin_memory()


@dataclasses.dataclass
class ImageBatch:
    """B decoded samples, images fitted to their bucket (H, W), the source to its scaled bucket (h, w).

    keys           the samples' keys; after condition dropout a dropped sample's ends in `#drop-<outcome>`
                   (FrozenEncoder's memo and the guard's report of a bad step read them)
    instructions   what Qwen reads with each source ("" where condition dropout dropped the text)
    target         uint8 (B, 3, H, W) RGB pixels, channels-last memory (`pixels.pixel_batch`; normalised on
                   the device by `pixels.unit_range`)
    source         uint8 (B, 3, h, w) likewise, (h, w) the bucket scaled to data.source_pixels when that is
                   set; None for text-to-image
    source_images  the images Qwen reads, one per sample: `PixelImages` over `source`, or a list whose
                   entries are None for text-to-image and where condition dropout dropped the image
    region         bool (B, H, W): each sample's changed region at the target's size (data/regions.py);
                   None unless the stream was asked for it (objective.region_weighting)
    """

    keys: list[str]
    instructions: list[str]
    target: torch.Tensor
    source: torch.Tensor | None
    source_images: Sequence[Image.Image | None]
    region: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> ImageBatch:
        source, images = _pinned(self.source), self.source_images
        if isinstance(images, PixelImages):  # the same pixels, pinned; the images made in this process kept
            images = PixelImages(source, images.images)
        return dataclasses.replace(self, target=_pinned(self.target), source=source, source_images=images,
                                   region=_pinned(self.region))


@dataclasses.dataclass
class EncodedBatch:
    """B samples of pre-encoded shards (data/preencoded.py), whose tensors keep the frozen models' dtype.

    keys     as in ImageBatch
    samples  per sample its stored tensors: `target` latents (16, H/8, W/8), `source` latents (absent for
             text-to-image), unpadded Qwen states `states` (L_i, D) and `states_drop_<outcome>` for each
             stored condition-dropout outcome, `region` uint8 (H/8, W/8)
    drops    per sample the condition-dropout outcome whose stored states it reads (None: the full
             condition), or None before condition dropout is drawn
    """

    keys: list[str]
    samples: list[EncodedSample]
    drops: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> EncodedBatch:
        samples = [dataclasses.replace(s, tensors={name: t.pin_memory() for name, t in s.tensors.items()})
                   for s in self.samples]
        return dataclasses.replace(self, samples=samples)


Batch = ImageBatch | EncodedBatch
