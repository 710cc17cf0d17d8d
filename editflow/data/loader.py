"""Streaming training batches from WebDataset shards."""

from __future__ import annotations

import itertools
import random
import logging
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from editflow.data.samples import EditSample, SampleError, decode_sample

log = logging.getLogger(__name__)


def image_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def collate(samples: list[EditSample]) -> dict:
    """Stack a batch whose images share one size."""
    sizes = {s.target.size for s in samples} | {s.source.size for s in samples if s.source is not None}
    if len(sizes) != 1:
        raise ValueError(f"a batch must share one image size, got {sorted(sizes)} (keys {[s.key for s in samples]})")
    return {
        "key": [s.key for s in samples],
        "instruction": [s.instruction for s in samples],
        "source_images": [s.source for s in samples],
        "source": torch.stack([image_tensor(s.source) for s in samples]),
        "target": torch.stack([image_tensor(s.target) for s in samples]),
    }


class SkipCounter:
    """Counts samples skipped per reason; raises once the skip rate passes `max_rate` (after `min_seen`)."""

    def __init__(self, max_rate: float = 0.05, min_seen: int = 100):
        self.max_rate, self.min_seen = max_rate, min_seen
        self.seen = 0
        self.skipped: dict[str, int] = {}

    def __call__(self, raws: Iterator[dict]) -> Iterator[EditSample]:
        for raw in raws:
            self.seen += 1
            try:
                yield decode_sample(raw)
            except SampleError as err:
                self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
                log.warning("skipping sample: %s", err)
                total = sum(self.skipped.values())
                if self.seen >= self.min_seen and total / self.seen > self.max_rate:
                    raise RuntimeError(
                        f"{total} of {self.seen} samples failed ({self.skipped}), over the allowed "
                        f"skip rate {self.max_rate:.1%}; last: {err}"
                    ) from err


def train_batches(
    urls: list[str],
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    max_skip_rate: float = 0.05,
) -> Iterator[dict]:
    """An endless, shuffled stream of batches for one rank.

    Each rank reads its own random sequence of shards (resampled with a
    rank-specific seed), shuffles samples in a buffer and collates batches.
    """
    dataset = wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed * 1000 + rank,
                             nodesplitter=None, empty_check=False)
    stream = dataset.shuffle(shuffle_buffer, rng=random.Random(seed * 7919 + rank))
    samples = SkipCounter(max_skip_rate)(iter(stream))
    while True:
        yield collate(list(itertools.islice(samples, batch_size)))


def read_samples(urls: list[str], limit: int | None = None) -> list[EditSample]:
    """Every sample of `urls` in order (evaluation and previews); a bad sample is an error, not a skip."""
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False)
    return [decode_sample(raw) for raw in itertools.islice(dataset, limit)]
