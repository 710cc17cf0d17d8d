"""Small helpers shared by the data paths: image tensors and in-order reading of shards."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from editflow.data.images import to_rgb
from editflow.data.samples import EditSample, decode_sample
from editflow.errors import DataError

# What reading a damaged, truncated or vanished shard raises (zlib/gzip errors are OSError or EOFError).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode, read as `to_rgb` reads it) -> (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def iter_tar(url: str, meta_only=lambda: False) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts; while `meta_only()` is true, non-json members are skipped
    unread (tarfile seeks over them) and the sample is marked `__partial__`. A member that repeats one of
    its sample's fields (two records written under one key) marks the sample `__duplicate__`. A shard cut
    short raises tarfile.ReadError (tarfile itself stops silently when the cut falls between members)."""
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
            if ext in current:
                current["__duplicate__"] = ext
            if ext == "json" or not meta_only():
                current[ext] = tar.extractfile(member).read()
            else:
                current["__partial__"] = True
        tar.fileobj.seek(tar.offset)  # where tarfile stopped: a complete archive has its end blocks there
        if tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise tarfile.ReadError(f"no end-of-archive blocks at byte {tar.offset}: the file is cut short or "
                                    "damaged there")
        if current is not None:
            yield current


def read_samples(urls: list[str], limit: int | None = None) -> list[EditSample]:
    """Every sample of `urls` in order (evaluation and previews); a bad sample or a shard that cannot be read
    to the end is an error naming it, not a skip (a score must cover the whole set)."""
    samples: list[EditSample] = []
    for url in urls:
        done = len(samples)
        try:
            for raw in iter_tar(url):
                if limit is not None and len(samples) >= limit:
                    return samples
                samples.append(decode_sample(raw))
        except SHARD_ERRORS as err:
            raise DataError(f"shard {url} cannot be read to the end (after {len(samples) - done} samples: "
                            f"{type(err).__name__}: {err}); it is truncated or corrupt: copy it again (`editflow "
                            "data verify DIR` checks a shard directory against its manifest)") from None
    return samples
