"""`editflow data convert`: validated records -> WebDataset shards, resumable and parallel.

Records are numbered in the reader's deterministic order and shard `i` holds
records `[i*N, (i+1)*N)` that pass validation. So a rerun after a crash skips
the shards the manifest lists and rewrites only the others: no duplicates.
Rejects of each shard are written next to it and merged into `rejects.jsonl`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageFile
from tqdm import tqdm

from editflow.data.buckets import nearest_bucket
from editflow.data.formats import READERS, BadRecord, Record, read_checksums
from editflow.data.images import to_rgb
from editflow.data.shards import read_manifest, sha256_file, write_manifest, write_shard

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, not a silently grey image


@dataclasses.dataclass
class Validation:
    min_side: int = 256
    max_aspect_change: float = 0.25  # |source AR / target AR - 1| allowed, on a log scale
    max_instruction_chars: int = 2000
    bucket_base: int = 1024


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_16bit_png(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16  # IHDR bit depth


def load_image(path: str, role: str, checksums: dict[str, str], rules: Validation) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes to store, extension, (w, h)); original bytes when already an 8-bit RGB JPEG/PNG/WEBP."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Reject("missing_file", f"{role} image not found: {path}") from None
    except OSError as err:
        raise Reject("unreadable_file", f"{role} image {path}: {err}") from None
    expected = checksums.get(str(Path(path).resolve()))
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise Reject("checksum_mismatch", f"{role} image {path}: sha256 differs from checksum.sha256")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully: truncated files fail here
    except Exception as err:
        raise Reject("undecodable_image", f"{role} image {path}: {err}") from None
    if min(image.size) < rules.min_side:
        raise Reject("too_small", f"{role} image {path} is {image.width}x{image.height}, short side < {rules.min_side}")
    if image.format in KEEP_FORMATS and image.mode == "RGB" and not _is_16bit_png(data):
        return data, KEEP_FORMATS[image.format], image.size
    rgb = to_rgb(image)
    buffer = io.BytesIO()
    if image.format == "JPEG":
        rgb.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg", rgb.size
    rgb.save(buffer, format="PNG")
    return buffer.getvalue(), "png", rgb.size


def build_sample(record: Record, checksums: dict[str, str], rules: Validation) -> dict:
    """A validated webdataset sample, or Reject saying why not."""
    instruction = record.instruction.strip()
    if not instruction:
        raise Reject("empty_instruction", "instruction is empty")
    if len(instruction) > rules.max_instruction_chars:
        raise Reject("instruction_too_long", f"instruction has {len(instruction)} characters > {rules.max_instruction_chars}")
    tgt, tgt_ext, tgt_size = load_image(record.target, "target", checksums, rules)
    sample = {"__key__": record.key, f"tgt.{tgt_ext}": tgt}
    meta = dict(record.meta, instruction=instruction, target_size=list(tgt_size),
                text_to_image=record.source is None, origin=record.location,
                bucket=list(nearest_bucket(*tgt_size, base=rules.bucket_base)))
    if record.source is not None:
        src, src_ext, src_size = load_image(record.source, "source", checksums, rules)
        change = abs(math.log((src_size[0] / src_size[1]) / (tgt_size[0] / tgt_size[1])))
        if change > math.log1p(rules.max_aspect_change):
            raise Reject("aspect_mismatch", f"source {src_size[0]}x{src_size[1]} and target "
                                            f"{tgt_size[0]}x{tgt_size[1]} aspect ratios differ")
        sample[f"src.{src_ext}"] = src
        meta["source_size"] = list(src_size)
    for i, ref in enumerate(record.references):
        data, ext, _ = load_image(ref, f"reference {i}", checksums, rules)
        sample[f"ref{i}.{ext}"] = data
    meta.setdefault("task", meta.get("task") or ("text_to_image" if record.source is None else None))
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
    return sample


def _reject_row(location: str, key: str | None, reason: str, detail: str) -> dict:
    return {"location": location, "key": key, "reason": reason, "detail": detail}


def convert_shard(job: tuple) -> dict:
    """Worker: validate one shard's records, write its rejects part and the shard (both atomically)."""
    out, index, items, checksums, rules = job
    out = Path(out)
    rejects, samples, buckets = [], [], Counter()
    for item in items:
        if isinstance(item, BadRecord):
            rejects.append(_reject_row(item.location, item.key, item.reason, item.detail))
            continue
        try:
            sample = build_sample(item, checksums, rules)
        except Reject as err:
            rejects.append(_reject_row(item.location, item.key, err.reason, err.detail))
            continue
        samples.append(sample)
        buckets["x".join(map(str, json.loads(sample["json"])["bucket"]))] += 1
    parts = out / "rejects"
    parts.mkdir(exist_ok=True)
    tmp = parts / f"shard-{index:06d}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    os.replace(tmp, parts / f"shard-{index:06d}.jsonl")
    entry = write_shard(out / f"shard-{index:06d}.tar", samples)
    entry.update(index=index, rejected=len(rejects), reject_reasons=dict(Counter(r["reason"] for r in rejects)),
                 buckets=dict(buckets))
    return entry


def inputs_fingerprint(inputs: list[Path]) -> str:
    """Changes when an input file is added, removed or modified (size, mtime) between runs."""
    digest = hashlib.sha256()
    for path in inputs:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            digest.update(f"{f.resolve()}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return digest.hexdigest()


def convert(
    fmt: str,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    samples_per_shard: int = 1000,
    workers: int = 1,
    rules: Validation | None = None,
    progress: bool = True,
    **reader_options,
) -> dict:
    """Convert `inputs` of format `fmt` into shards under `out`; returns the manifest."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(READERS)}")
    rules = rules or Validation()
    inputs = [Path(p) for p in inputs]
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"format": fmt, "inputs": [str(p.resolve()) for p in inputs], "samples_per_shard": samples_per_shard,
              "fingerprint": inputs_fingerprint(inputs), "validation": dataclasses.asdict(rules),
              "reader_options": {k: str(v) for k, v in reader_options.items() if v is not None}}
    manifest = read_manifest(out)
    if manifest.get("params", params) != params:
        raise ValueError(f"{out} was converted from other inputs or options ({manifest['params']}); "
                         "the inputs changed since, or use a new --out")
    done = {e["index"]: e for e in manifest["shards"] if (out / e["file"]).exists()}

    checksums: dict[str, str] = {}
    if fmt == "gpt-image-edit":
        for path in inputs:
            root = path if path.is_dir() else (path.parent.parent if path.parent.name == "metadata" else path.parent)
            if (root / "checksum.sha256").exists():
                checksums.update(read_checksums(root / "checksum.sha256"))
    records = READERS[fmt](inputs, **{k: (Path(v) if k == "image_root" and v else v) for k, v in reader_options.items()
                                      if v is not None})
    chunks = (list(c) for c in iter(lambda: list(itertools.islice(records, samples_per_shard)), []))
    jobs = ((str(out), i, chunk, checksums, rules) for i, chunk in enumerate(chunks))

    shards = dict(done)
    bar = tqdm(desc=f"convert {fmt} -> {out}", unit="record", disable=not progress)
    pending = []

    def record_done(entry: dict) -> None:
        shards[entry["index"]] = entry
        bar.update(entry["count"] + entry["rejected"])
        write_manifest(out, {"params": params, "shards": [shards[i] for i in sorted(shards)]})

    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for job in jobs:
            if job[1] in done:
                bar.update(done[job[1]]["count"] + done[job[1]]["rejected"])
                continue
            pending.append(pool.submit(convert_shard, job))
            while len(pending) >= 2 * max(1, workers):  # bounded memory: records are read lazily
                for future in [f for f in pending if f.done()] or [pending[0]]:
                    record_done(future.result())
                    pending.remove(future)
        for future in pending:
            record_done(future.result())
    bar.close()
    return finalize(out, params, shards)


def finalize(out: Path, params: dict, shards: dict[int, dict]) -> dict:
    ordered = [shards[i] for i in sorted(shards)]
    reasons, buckets = Counter(), Counter()
    for e in ordered:
        reasons.update(e["reject_reasons"])
        buckets.update(e["buckets"])
    with open(out / "rejects.jsonl.tmp", "w") as merged:  # rejects of every shard, in record order
        for e in ordered:
            part = out / "rejects" / f"shard-{e['index']:06d}.jsonl"
            if part.exists():
                merged.write(part.read_text())
    os.replace(out / "rejects.jsonl.tmp", out / "rejects.jsonl")
    manifest = {"params": params, "shards": ordered, "num_samples": sum(e["count"] for e in ordered),
                "num_rejected": sum(reasons.values()), "reject_reasons": dict(reasons),
                "buckets": dict(sorted(buckets.items())), "bucket_base": params["validation"]["bucket_base"]}
    write_manifest(out, manifest)
    return manifest


def verify(directory: str | os.PathLike, progress: bool = True) -> list[str]:
    """Problems found: shards missing, with a wrong sha256, or a wrong sample count. Empty when all is well."""
    import tarfile

    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["shards"]:
        return [f"{directory}: no manifest.json or it lists no shards"]
    problems = []
    for entry in tqdm(manifest["shards"], desc=f"verify {directory}", unit="shard", disable=not progress):
        path = directory / entry["file"]
        if not path.exists():
            problems.append(f"{entry['file']}: missing")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 mismatch (corrupted or modified)")
            continue
        with tarfile.open(path) as tar:
            keys = {m.name.split("/")[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
        if len(keys) != entry["count"]:
            problems.append(f"{entry['file']}: {len(keys)} samples, manifest says {entry['count']}")
    return problems
