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


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> dict:
    """Write `samples` (webdataset dicts with `__key__` and `ext -> bytes`) to `path` atomically.

    Returns the manifest entry: file name, sample count, sha256 and size.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream)
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
    os.replace(tmp, path)
    return {"file": path.name, "count": count, "sha256": sha256_file(path), "bytes": path.stat().st_size}


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
    return [str(directory / entry["file"]) for entry in manifest["shards"]]
