"""WebDataset shard files: atomic writing, the manifest that lists them, and reading them in order.

A shard is written under a temporary name and renamed only once complete, so a
crash never leaves a half-written file under a shard's name. `manifest.json`
lists every finished shard with its sample count and sha256; readers and
`editflow data verify` trust only what it lists. Reading (`iter_tar`) tells a
damaged shard from a complete one, also when it was cut between two members.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from editflow.data.samples import EditSample, decode_sample
from editflow.errors import DataError

MANIFEST = "manifest.json"
# What reading a damaged, truncated or vanished shard raises (zlib/gzip errors are OSError or EOFError).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _HashingFile(io.RawIOBase):
    """A file being written that hashes what goes through it, so a shard's sha256 needs no second read."""

    def __init__(self, path: Path):
        super().__init__()
        self.file, self.digest, self.size = open(path, "wb"), hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


class ShardWriter:
    """One shard written sample by sample under a temporary name, renamed by `close()` when complete."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = _HashingFile(self.tmp)
        self._tar = wds.TarWriter(self._file)
        self.count = 0

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.count += 1

    def close(self) -> dict:
        """Finish the shard; returns its manifest entry: file name, sample count, sha256 and size."""
        self._tar.close()
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "count": self.count, "sha256": self._file.digest.hexdigest(),
                "bytes": self._file.size}


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> dict:
    """Write `samples` (webdataset dicts with `__key__` and `ext -> bytes`) to `path` atomically.

    Returns the manifest entry: file name, sample count, sha256 and size.
    """
    writer = ShardWriter(path)
    for sample in samples:
        writer.write(sample)
    return writer.close()


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return {"shards": []}
    with open(path) as f:
        return json.load(f)


def listed_sha256(urls: list[str]) -> list[str | None]:
    """Each shard's sha256 as its directory's manifest lists it (convert and encode write one), or None (not a
    local file, or not listed): what identifies a shard wherever it is mounted, with no hashing here (shards
    can be gigabytes). Each directory's manifest is read once."""
    listings: dict[str, dict] = {}
    digests = []
    for url in urls:
        directory = os.path.dirname(url)
        if directory not in listings:
            listings[directory] = {e.get("file"): e.get("sha256") for e in read_manifest(directory).get("shards", [])}
        digests.append(listings[directory].get(os.path.basename(url)) if os.path.isfile(url) else None)
    return digests


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Replace the manifest atomically: readers see the old or the new one, never a mix."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def shard_urls(directory: str | os.PathLike) -> list[str]:
    """Paths of the finished shards of a directory, in manifest order."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["shards"]:
        raise FileNotFoundError(f"{directory}: no {MANIFEST} listing finished shards")
    if manifest.get("num_samples") == 0:
        raise ValueError(f"{directory}: {MANIFEST} lists 0 samples (the conversion rejected every record; see "
                         f"{Path(directory) / 'rejects.jsonl'}): nothing to read")
    return [str(directory / entry["file"]) for entry in manifest["shards"]]


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
            if len(samples) == done and os.path.isfile(url) and not tarfile.is_tarfile(url):
                raise DataError(f"{url} is not a tar shard; give a shard directory from `editflow data convert` "
                                "(or `editflow data toy`), not the metadata or images it was made from") from None
            raise DataError(f"shard {url} cannot be read to the end (after {len(samples) - done} samples: "
                            f"{type(err).__name__}: {err}); it is truncated or corrupt: copy it again (`editflow "
                            "data verify DIR` checks a shard directory against its manifest)") from None
    return samples
