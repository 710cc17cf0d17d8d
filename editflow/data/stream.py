"""Resumable, bucketed, weighted streaming of shard samples for one rank.

Determinism is the design: the sequence of batches a rank sees is a pure
function of (seed, rank, world size, shard lists, weights). Per epoch a set's
shards are shuffled with (seed, epoch) and dealt to ranks without overlap;
within a rank, DataLoader workers (if any) split the rank's shards again.
Samples pass a seeded shuffle buffer, are grouped by aspect bucket, and a batch
is emitted when a bucket fills, so all samples of a batch share (H, W).

Reading, shuffling and bucketing run in one thread, in order; decoding and
collating a batch, the expensive part, is a pure function of its raw samples,
so threads may run it for several batches at once (`decode_threads`) while
the results are still taken, and their skips counted, in stream order: the
number of threads changes the speed, never the batches.

The position is the number of batches yielded. Restoring it replays the stream
from the start while reading only tar headers and the small `.json` members
(never decoding images), which is exact and cheap; a different world size
cannot be replayed and is reported.

Damaged data never stops a run by surprise: a sample that fails to decode and a shard that cannot be
read to the end (truncated, corrupt or gone) are skipped and counted per reason (`data/skipped_*` in
the metrics); past `data.max_skip_rate` the stream raises `DataError`, and so does a set from which a
full pass yields no sample at all.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from editflow.data.batches import Batch, ImageBatch
from editflow.data.buckets import nearest_bucket, resize_to_bucket, scaled_bucket
from editflow.data.pixels import PixelImages, pixel_batch
from editflow.data.preencoded import collate_encoded, decode_encoded
from editflow.data.regions import changed_region
from editflow.data.samples import EditSample, SampleError, decode_sample, reject_duplicate
from editflow.data.shards import SHARD_ERRORS, iter_tar
from editflow.data.skips import SkipCounter
from editflow.data.threads import ordered_map, usable_cpus
from editflow.errors import ConfigError, DataError, EditflowError

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    name: str
    urls: list[str]
    weight: float = 1.0
    encoding: dict | None = None  # pre-encoded shards: the manifest's record of how (data/preencoded.py)


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


def fit_sizes(bucket: tuple[int, int], source_pixels: int | None = None) -> dict[str, tuple[int, int]]:
    """(width, height) each role's image is fitted to: the target to the bucket, the source to the bucket
    scaled to `source_pixels` when set. Also the decode hint of `decode_sample(raw, draft=...)`."""
    return {"tgt": bucket, "src": scaled_bucket(bucket, source_pixels) if source_pixels else bucket}


def decode_in_bucket(raw: dict, bucket: tuple, source_pixels: int | None = None) -> EditSample:
    """`decode_sample`, with JPEGs much larger than the sizes they are fitted to decoded at a reduced scale
    (an image whose bucket the json does not tell, (0, 0), is decoded whole)."""
    return decode_sample(raw, fit_sizes(bucket[:2], source_pixels) if all(bucket[:2]) else None)


def collate_images(samples: list, bucket: tuple[int, int], source_pixels: int | None = None,
                   square_only: bool = False, regions: bool = False) -> ImageBatch:
    """Decoded samples of one bucket -> their batch: images fitted to the bucket (the source to its scaled
    bucket when `source_pixels` is set) and, with `regions`, each sample's changed region."""
    sizes = fit_sizes(bucket, source_pixels)
    fit = resize_to_bucket
    if square_only:  # squash, as the reference does, instead of cropping to the bucket's aspect
        fit = lambda image, size: image if image.size == size else image.resize(size, Image.BICUBIC)
    targets = [fit(s.target, sizes["tgt"]) for s in samples]
    sources = [fit(s.source, sizes["src"]) if s.source is not None else None for s in samples]
    source = pixel_batch(sources) if all(s is not None for s in sources) else None
    region = None
    if regions:  # the shard's mask when it has one, else |source - target|; all of a text-to-image target
        region = torch.from_numpy(np.stack([
            np.ones((bucket[1], bucket[0]), dtype=bool) if s.source is None else
            changed_region(fit(s.source, bucket), t, None if s.mask is None else fit(s.mask, bucket))
            for s, t in zip(samples, targets)]))
    return ImageBatch(keys=[s.key for s in samples], instructions=[s.instruction for s in samples],
                      target=pixel_batch(targets), source=source,
                      source_images=PixelImages(source, sources) if source is not None else [None] * len(samples),
                      region=region)


# What a sample read from the stream came to: None (usable) or the (reason, message) it was skipped for.
Outcome = tuple[str, str] | None


class StreamItem(NamedTuple):
    """What the stream yields: a batch, and the skip counts per reason of the reader that made it (this
    process or DataLoader worker `worker`) as of that batch; `ResumableLoader` keeps the counts."""

    batch: Batch
    worker: int
    skips: dict[str, int]


class BucketStream(IterableDataset):
    """Endless bucketed batches of decoded samples for this rank (and DataLoader worker).

    `decode_threads` > 0 decodes that many batches at once in threads of the process that iterates the
    stream, when that is the training process (in a DataLoader worker, the workers are the parallelism).
    Why threads and not worker processes, measured with `editflow bench data` on 1024-px JPEG pairs: PIL
    releases the GIL while it decodes and resizes, so threads decode in parallel, and a batch made in a
    thread is already where training needs it. A worker process has to hand its batch over: torch puts
    it into newly allocated shared memory (~6 ms of kernel time per pair of 8.4 MB of pixels, the page
    faults of fresh shared memory) and the training process maps it (~2 ms) and makes Qwen's PIL images
    from the pixels again (~4 ms), against ~12.5 ms to decode the pair: 8 workers reach 0.45x the pairs
    per CPU-second of a bare decode loop, threads 0.85x (README, Performance). Reusing shared-memory
    buffers would save only the first of those three costs. Worker processes still pay off where the
    per-sample work is Python that holds the GIL (heavy augmentation); tiny images (64 px) are cheapest
    in the loop's own thread (`decode_threads=0`: handing a batch to a thread costs more than decoding it)."""

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
        min_seen_for_skip_rate: int | None = None,
        square_only: bool = False,
        encoded: bool = False,
        text_key: Callable[[dict, tuple[int, int, bool]], int] | None = None,
        decode_threads: int = 0,
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
        # a second grouping key from (raw sample, bucket): the text bucket (frozen_encoders.TextBucketKey), so that
        # batches need no attention mask
        self.text_key = text_key
        self.decode_threads = decode_threads
        self.regions = regions  # batches carry each sample's changed region (objective.region_weighting)
        self.skip_batches = 0  # set by the loader when resuming
        self.skips = SkipCounter(max_skip_rate, min_seen_for_skip_rate)
        self._fast_forward = False  # while true, shards are read for their json only
        self._read_skips: list[Outcome] = []  # shards found damaged while reading the next batch, not yet counted

    def _shard(self, url: str) -> Iterator[dict]:
        """The samples of one shard; a shard that cannot be read to the end is counted as one skip and the
        samples before the damage are kept."""
        try:
            yield from iter_tar(url, meta_only=lambda: self._fast_forward)
        except SHARD_ERRORS as err:
            if self._fast_forward:  # counted when it was first read, before the resume
                return
            self._read_skips.append(("unreadable_shard", f"shard {url} cannot be read to the end "
                                     f"({type(err).__name__}: {err}); its remaining samples are skipped"))

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
        epoch, produced, visited = 0, False, set()
        while True:
            urls = self._my_shards(shard_set, epoch, worker, num_workers)
            strided = len(shard_set.urls) < readers
            index = 0
            for url in urls:
                for raw in self._shard(url):
                    if not strided or index % readers == me:
                        produced = True
                        yield raw
                    index += 1
            visited.update(urls)
            if not produced and len(visited) == len(set(shard_set.urls)):  # would loop forever
                if index:  # strided: every reader saw `index` samples, none of them this reader's
                    raise DataError(f"shard set {shard_set.name!r} has {index} samples, fewer than the {readers} "
                                    "readers (processes x data.num_workers): some would never get one; use fewer "
                                    "data.num_workers or more data")
                raise DataError(f"shard set {shard_set.name!r}: a full pass over its {len(visited)} shard(s) "
                                f"({shard_set.urls[0]}, ...) yielded no sample; the shards are empty or unreadable "
                                "(`editflow data verify DIR` checks them; convert again or leave the set out)")
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
        pending: dict[tuple, list[dict]] = {}
        for raw in self._mixed(worker, num_workers):
            key = bucket = bucket_of(raw, self.bucket_base, self.square_only)
            if self.text_key is not None:
                key = (*bucket, self.text_key(raw, bucket))
            group = pending.setdefault(key, [])
            group.append(raw)
            if len(group) == self.batch_size:
                yield pending.pop(key)

    def _groups(self, batches: Iterator[list[dict]]) -> Iterator[tuple[list[dict], list[Outcome]]]:
        """The raw batches, each with the damaged shards met while reading it (counted before its samples)."""
        for raws in batches:
            read, self._read_skips = self._read_skips, []
            yield raws, read

    # -- decoding ----------------------------------------------------------------------------
    def _make(self, group: tuple[list[dict], list[Outcome]]) -> tuple[Batch | None, list[Outcome]]:
        """One raw batch -> (its batch of the samples that decode, or None if none does; the outcome of every
        sample read). Reads no state that changes while the stream runs, so threads can run it at once."""
        raws, outcomes = group[0], list(group[1])
        bucket = bucket_of(raws[0], self.bucket_base, self.square_only)
        samples = []
        for raw in raws:
            try:
                samples.append(self._decode_one(refetch(raw) if raw.get("__partial__") else raw, bucket))
                outcomes.append(None)
            except SampleError as err:
                outcomes.append((err.reason, str(err)))
            except SHARD_ERRORS as err:  # the shard was damaged after the fast-forward read its json
                outcomes.append(("unreadable_shard", f"shard {raw['__url__']}, key {raw['__key__']}: cannot be "
                                                     f"read ({type(err).__name__}: {err})"))
        return (self.collate(samples, bucket) if samples else None), outcomes

    def _count(self, outcomes: list[Outcome]) -> None:
        """Counts samples and skips in stream order (past data.max_skip_rate, `skip` raises DataError)."""
        for skipped in outcomes:
            self.skips.seen += 1
            if skipped is not None:
                self.skips.skip(*skipped)

    def _decode_one(self, raw: dict, bucket: tuple):
        reject_duplicate(raw)
        return decode_encoded(raw) if self.encoded else decode_in_bucket(raw, bucket, self.source_pixels)

    def collate(self, samples: list, bucket: tuple[int, int]) -> Batch:
        if self.encoded:
            return collate_encoded(samples)
        return collate_images(samples, bucket[:2], self.source_pixels, self.square_only, self.regions)

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Batches are taken round-robin from the workers: worker w produced batches w, w + n, ...
        skip = max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)
        batches = self._batches_of_raw(worker, num_workers)
        self._fast_forward = True  # replay the already-trained part reading json members only
        for _ in range(skip):
            next(batches)
        self._fast_forward = False
        groups = self._groups(batches)
        # more threads than CPUs only add switching and batches in flight (bench: 8 threads on 2 cores cost
        # ~20 % more CPU time per pair than 2)
        threads = min(self.decode_threads, usable_cpus()) if info is None else 0
        # 2 batches per thread (one being made, one ready), as the DataLoader's prefetch_factor=2 per worker
        made = ordered_map(self._make, groups, threads, ahead=2 * threads) if threads else map(self._make, groups)
        for batch, outcomes in made:
            self._count(outcomes)
            if batch is not None:
                yield StreamItem(batch, worker, dict(self.skips.counts))


class ResumableLoader:
    """A DataLoader over a BucketStream whose position (`state_dict`) is part of the checkpoint.

    `num_workers` > 0 makes the batches in DataLoader worker processes, each decoding one batch at a time
    (the stream's `decode_threads` is then not used); 0 makes them in this process, with the stream's
    decode threads. The worker count shapes the order of the batches, the thread count does not. The
    loader reports what the stream skipped (`skips`), all workers together. `pin_memory` pins the batches
    (their own `pin_memory()`), so that the copies to a CUDA device can overlap the step."""

    def __init__(self, stream: BucketStream, num_workers: int = 0, pin_memory: bool = False):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        if num_workers and stream.decode_threads:
            log.warning("data.num_workers=%d: batches are made in worker processes and data.decode_threads=%d is "
                        "not used; for decoding images, data.num_workers=0 (threads in the training process) "
                        "costs about half the CPU time per sample (README, Performance)", num_workers,
                        stream.decode_threads)
        self.batches_yielded = 0
        self._iterator = None
        self._skips_of_worker: dict[int, dict[str, int]] = {}  # each reader's counts, as of its latest batch

    def _make(self):
        self.stream.skip_batches = self.batches_yielded
        # An own generator: creating the iterator must not draw from the global torch RNG that the
        # training step's noise comes from (it would shift the noise of a resumed run).
        generator = torch.Generator().manual_seed(self.stream.seed)
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, generator=generator,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None,
                            pin_memory=self.pin_memory)
        return iter(loader)

    def __iter__(self):
        return self

    @property
    def skips(self) -> Counter:
        """Samples and shards skipped so far per reason (`unreadable_shard`, `undecodable_image`, ...), as of
        the latest batch: the counts the metrics report as `data/skipped_*`."""
        return sum((Counter(counts) for counts in self._skips_of_worker.values()), Counter())

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._make()
        try:
            item = next(self._iterator)
        except EditflowError as err:  # from a worker: re-raised with its traceback in the message
            message = str(err)
            if message.startswith("Caught "):
                message = message.rstrip().rsplit(f"{type(err).__name__}: ", 1)[-1]
            raise type(err)(message) from None
        self._skips_of_worker[item.worker] = item.skips
        self.batches_yielded += 1
        return item.batch

    def state_dict(self) -> dict:
        return {"batches_yielded": self.batches_yielded, "world_size": self.stream.world_size,
                "rank": self.stream.rank, "seed": self.stream.seed, "num_workers": self.num_workers,
                "sets": [[s.name, len(s.urls), s.weight] for s in self.stream.sets]}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state["world_size"] != mine["world_size"]:
            raise ConfigError(
                f"trainer.resume_data: the checkpoint's data position was saved with world size "
                f"{state['world_size']}, this run has {mine['world_size']}: the exact sample order cannot be "
                "continued. Set trainer.resume_data=false to resume the weights with a fresh data order."
            )
        for field in ("seed", "num_workers", "sets"):
            if state[field] != mine[field]:
                again = f"set data.num_workers={state[field]} to continue it, or " if field == "num_workers" else ""
                raise ConfigError(f"trainer.resume_data: the checkpoint's data stream differs in {field}: saved "
                                  f"{state[field]}, now {mine[field]}; {again}set trainer.resume_data=false to "
                                  "start a fresh data order")
        self.batches_yielded = state["batches_yielded"]
        self._iterator = None
