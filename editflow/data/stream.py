"""Resumable, bucketed, weighted streaming of shard samples for one rank.

Determinism is the design: the sequence of batches a rank sees is a pure
function of (seed, rank, world size, shard lists, weights). Per epoch a set's
shards are shuffled with (seed, epoch) and dealt to ranks without overlap;
within a rank, DataLoader workers split the rank's shards again. Samples pass a
seeded shuffle buffer, are grouped by aspect bucket, and a batch is emitted
when a bucket fills, so all samples of a batch share (H, W).

The position is the number of batches yielded. Restoring it replays the stream
from the start while reading only tar headers and the small `.json` members
(never decoding images), which is exact and cheap; a different world size
cannot be replayed and is reported.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from editflow.data.buckets import nearest_bucket, resize_to_bucket, scaled_bucket
from editflow.data.encoded import collate_encoded, decode_encoded
from editflow.data.loader import image_tensor
from editflow.data.regions import changed_region
from editflow.data.samples import SampleError, decode_sample

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    name: str
    urls: list[str]
    weight: float = 1.0
    encoding: dict | None = None  # pre-encoded shards: the manifest's record of how (data/encoded.py)


def iter_tar(url: str, meta_only=lambda: False) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts; while `meta_only()` is true, non-json members are skipped
    unread (tarfile seeks over them) and the sample is marked `__partial__`."""
    with tarfile.open(url, mode="r:") as tar:
        current: dict | None = None
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if ext == "json" or not meta_only():
                current[ext] = tar.extractfile(member).read()
            else:
                current["__partial__"] = True
        if current is not None:
            yield current


def refetch(raw: dict) -> dict:
    """The full sample for one read header-only during a fast-forward."""
    for full in iter_tar(raw["__url__"]):
        if full["__key__"] == raw["__key__"]:
            return full
    raise FileNotFoundError(f"shard {raw['__url__']} no longer holds key {raw['__key__']}")


def bucket_of(raw: dict, base: int, square_only: bool = False) -> tuple[int, int, bool]:
    """(width, height, text_to_image) from a sample's json alone, so fast-forwarding never decodes images.

    Text-to-image samples get batches of their own (no source tokens). A pre-encoded sample keeps the
    bucket it was encoded at."""
    try:
        meta = json.loads(raw["json"])
        if "encoded_bucket" in meta:
            return (*meta["encoded_bucket"], bool(meta.get("text_to_image")))
        size = meta.get("target_size") or meta.get("size")
        bucket = (base, base) if square_only else nearest_bucket(int(size[0]), int(size[1]), base)
        return (*bucket, bool(meta.get("text_to_image")))
    except Exception:  # noqa: BLE001 - unreadable metadata: decoded (and rejected) later
        return (0, 0, False)


def collate_images(samples: list, bucket: tuple[int, int], source_pixels: int | None = None,
                   square_only: bool = False, regions: bool = False) -> dict:
    """Decoded samples of one bucket -> a batch: images fitted to the bucket (the source to its scaled
    bucket when `source_pixels` is set), as tensors in [-1, 1] and, for Qwen, as PIL images. With
    `regions`, also each sample's changed region at the target's size (`region`, (B, H, W) bool)."""
    source_bucket = scaled_bucket(bucket, source_pixels) if source_pixels else bucket
    fit = resize_to_bucket
    if square_only:  # squash, as the reference does, instead of cropping to the bucket's aspect
        fit = lambda image, size: image if image.size == size else image.resize(size, Image.BICUBIC)
    targets = [fit(s.target, bucket) for s in samples]
    sources = [fit(s.source, source_bucket) if s.source is not None else None for s in samples]
    has_source = all(s is not None for s in sources)
    batch = {
        "key": [s.key for s in samples],
        "instruction": [s.instruction for s in samples],
        "target": torch.stack([image_tensor(t) for t in targets]),
        "source": torch.stack([image_tensor(s) for s in sources]) if has_source else None,
        "source_images": sources if has_source else [None] * len(samples),
        "text_to_image": [s is None for s in sources],
    }
    if regions:  # the shard's mask when it has one, else |source - target|; all of a text-to-image target
        batch["region"] = torch.from_numpy(np.stack([
            np.ones((bucket[1], bucket[0]), dtype=bool) if s.source is None else
            changed_region(fit(s.source, bucket), t, None if s.mask is None else fit(s.mask, bucket))
            for s, t in zip(samples, targets)]))
    return batch


class BucketStream(IterableDataset):
    """Endless bucketed batches of decoded samples for this rank (and DataLoader worker)."""

    def __init__(
        self,
        sets: list[ShardSet],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        bucket_base: int = 1024,
        source_pixels: int | None = None,
        max_skip_rate: float = 0.05,
        min_seen_for_skip_rate: int = 200,
        square_only: bool = False,
        encoded: bool = False,
        regions: bool = False,
    ):
        super().__init__()
        if not sets or any(not s.urls for s in sets):
            raise ValueError("every shard set needs at least one shard")
        self.sets, self.batch_size, self.rank, self.world_size = sets, batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.bucket_base = seed, shuffle_buffer, bucket_base
        self.source_pixels = source_pixels
        self.square_only = square_only  # the reference's behaviour: every image squashed to base x base
        self.encoded = encoded  # shards of `editflow encode`: latents and Qwen states instead of images
        self.regions = regions  # batches carry each sample's changed region (objective.region_weighting)
        self.max_skip_rate, self.min_seen = max_skip_rate, min_seen_for_skip_rate
        self.skip_batches = 0  # set by the loader when resuming
        self.skipped: dict[str, int] = {}
        self.seen = 0
        self._fast_forward = False  # while true, shards are read for their json only

    # -- which shards this rank/worker reads -------------------------------------------------
    def _my_shards(self, shard_set: ShardSet, epoch: int, worker: int, num_workers: int) -> list[str]:
        urls = list(shard_set.urls)
        random.Random(f"{self.seed}:{shard_set.name}:{epoch}").shuffle(urls)
        readers = self.world_size * num_workers
        if len(urls) < readers:
            # Fewer shards than readers: every reader cycles through all shards but keeps only its own
            # sample slots (handled in _raw_samples), so nothing overlaps.
            return urls
        return urls[self.rank * num_workers + worker :: readers]

    def _raw_samples(self, shard_set: ShardSet, worker: int, num_workers: int) -> Iterator[dict]:
        readers = self.world_size * num_workers
        me = self.rank * num_workers + worker
        epoch = 0
        while True:
            urls = self._my_shards(shard_set, epoch, worker, num_workers)
            strided = len(shard_set.urls) < readers
            index = 0
            for url in urls:
                for raw in iter_tar(url, meta_only=lambda: self._fast_forward):
                    if not strided or index % readers == me:
                        yield raw
                    index += 1
            epoch += 1

    def _mixed(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Weighted interleaving of the sets, then a seeded shuffle buffer."""
        streams = [self._raw_samples(s, worker, num_workers) for s in self.sets]
        weights = [s.weight for s in self.sets]
        rng = random.Random(f"{self.seed}:mix:{self.rank}:{worker}")
        buffer: list[dict] = []
        while True:
            choice = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            buffer.append(next(streams[choice]))
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
            elif self.shuffle_buffer <= 1:
                yield buffer.pop()

    def _batches_of_raw(self, worker: int, num_workers: int) -> Iterator[list[dict]]:
        pending: dict[tuple[int, int, bool], list[dict]] = {}
        for raw in self._mixed(worker, num_workers):
            bucket = bucket_of(raw, self.bucket_base, self.square_only)
            group = pending.setdefault(bucket, [])
            group.append(raw)
            if len(group) == self.batch_size:
                yield pending.pop(bucket)

    # -- decoding ----------------------------------------------------------------------------
    def _decode(self, raws: list[dict]) -> list:
        samples = []
        for raw in raws:
            raw = refetch(raw) if raw.get("__partial__") else raw
            self.seen += 1
            try:
                samples.append(decode_encoded(raw) if self.encoded else decode_sample(raw))
            except SampleError as err:
                self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
                total = sum(self.skipped.values())
                log.warning("skipping sample (%d skipped so far): %s", total, err)
                if self.seen >= self.min_seen and total / self.seen > self.max_skip_rate:
                    raise RuntimeError(f"{total} of {self.seen} samples failed ({self.skipped}), over "
                                       f"data.max_skip_rate={self.max_skip_rate:.1%}; last: {err}") from err
        return samples

    def collate(self, samples: list, bucket: tuple[int, int]) -> dict:
        if self.encoded:
            batch = collate_encoded(samples)
        else:
            batch = collate_images(samples, bucket[:2], self.source_pixels, self.square_only, self.regions)
        return {**batch, "skipped": dict(self.skipped)}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Batches are taken round-robin from the workers: worker w produced batches w, w + n, ...
        skip = max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)
        batches = self._batches_of_raw(worker, num_workers)
        self._fast_forward = True  # replay the already-trained part reading json members only
        for _ in range(skip):
            next(batches)
        self._fast_forward = False
        for raws in batches:
            samples = self._decode(raws)
            if samples:
                yield self.collate(samples, bucket_of(raws[0], self.bucket_base, self.square_only))


class ResumableLoader:
    """A DataLoader over a BucketStream whose position (`state_dict`) is part of the checkpoint."""

    def __init__(self, stream: BucketStream, num_workers: int = 0):
        self.stream, self.num_workers = stream, num_workers
        self.batches_yielded = 0
        self._iterator = None

    def _make(self):
        self.stream.skip_batches = self.batches_yielded
        # An own generator: creating the iterator must not draw from the global torch RNG that the
        # training step's noise comes from (it would shift the noise of a resumed run).
        generator = torch.Generator().manual_seed(self.stream.seed)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, generator=generator,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._make()
        batch = next(self._iterator)
        self.batches_yielded += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_yielded": self.batches_yielded, "world_size": self.stream.world_size,
                "rank": self.stream.rank, "seed": self.stream.seed, "num_workers": self.num_workers,
                "sets": [[s.name, len(s.urls), s.weight] for s in self.stream.sets]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state["world_size"] != mine["world_size"]:
            raise ValueError(
                f"the checkpoint's data position was saved with world size {state['world_size']}, this run has "
                f"{mine['world_size']}: the exact sample order cannot be continued. Set "
                "trainer.resume_data=false to resume the weights with a fresh data order."
            )
        for field in ("seed", "num_workers", "sets"):
            if state[field] != mine[field]:
                raise ValueError(f"the checkpoint's data stream differs in {field}: saved {state[field]}, "
                                 f"now {mine[field]}; set trainer.resume_data=false to start a fresh data order")
        self.batches_yielded = state["batches_yielded"]
        self._iterator = None
