"""WebDataset shard files: atomic writing and the manifest that lists them.

A shard is written under a temporary name and renamed only once complete, so a
crash never leaves a half-written file under a shard's name. `manifest.json`
lists every finished shard with its sample count and sha256; readers and
`editflow data verify` trust only what it lists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds
from PIL import Image

MANIFEST = "manifest.json"


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
