"""`editflow data convert`: dataset records -> validated WebDataset shards, resumable and parallel.

Records are numbered in a deterministic order and shard `i` holds records `[i*N, (i+1)*N)` that pass
validation, so a rerun after a crash skips the shards the manifest lists and rewrites only the others:
no duplicates, nothing finished is redone. Rejects of each shard are written next to it and merged into
`rejects.jsonl`. Two ways to run, one result:

- images on disk: records are read lazily and each worker validates and writes whole shards;
- images (also) inside downloaded archives: archives.py reads them in place, records come out in the
  order the archives complete them, workers validate small batches and send back only what they
  changed, and this process writes the shards from the bytes it already holds (each image crosses a
  process boundary once, and memory stays bounded by the in-flight batches plus the hold budget).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from editflow.data.archives import Assembly, Timeline, completion_order, index_archives, peak_hold
from editflow.data.buckets import nearest_bucket
from editflow.data.errors import DataError
from editflow.data.formats import BadRecord, Inputs, Record, find_inputs, read_checksums, read_records
from editflow.data.images import not_an_image, to_rgb
from editflow.data.keys import KeyRegistry
from editflow.data.metadata import iter_records
from editflow.data.shards import ShardWriter, read_manifest, sha256_file, write_manifest, write_shard
from editflow.data.tokens import TokenBudget

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, not a silently grey image
SCRATCH = ".scratch"  # inside --out: members held beyond the memory budget while reading archives
BATCH = 8  # records per job when images come from archives


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


def read_bytes(ref: str, role: str, blobs: dict[str, bytes], checksums: dict[str, str]) -> bytes:
    """The bytes of an image reference (archive member or file), or Reject naming the file and what is wrong."""
    if ref in blobs:
        data = blobs[ref]
    else:
        path = Path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if path.is_symlink():
                raise Reject("missing_file", f"{role} image {ref} is a link to {os.readlink(path)}, which does "
                                             "not exist") from None
            raise Reject("missing_file", f"{role} image not found: {ref}") from None
        except IsADirectoryError:
            raise Reject("unreadable_file", f"{role} image {ref} is a folder, not an image file") from None
        except OSError as err:
            raise Reject("unreadable_file", f"{role} image {ref}: {err.strerror or err}") from None
        expected = checksums.get(str(path.resolve()))
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise Reject("checksum_mismatch", f"{role} image {ref}: sha256 differs from checksum.sha256")
    if not data:
        raise Reject("empty_file", f"{role} image {ref} is empty (0 bytes)")
    return data


def load_image(ref: str, role: str, blobs: dict[str, bytes], checksums: dict[str, str],
               rules: Validation) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes to store, extension, (w, h)); the original bytes when already an 8-bit RGB JPEG/PNG/WEBP."""
    data = read_bytes(ref, role, blobs, checksums)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode fully: truncated files fail here
    except Image.DecompressionBombError as err:
        raise Reject("too_large", f"{role} image {ref}: {err}") from None
    except UnidentifiedImageError:
        raise Reject("undecodable_image", f"{role} image {ref}: {not_an_image(data)}") from None
    except Exception as err:
        raise Reject("undecodable_image", f"{role} image {ref}: {err}") from None
    if min(image.size) < rules.min_side:
        raise Reject("too_small", f"{role} image {ref} is {image.width}x{image.height}, short side < {rules.min_side}")
    # A camera JPEG rotated by its EXIF tag: store the pixels the way viewers show them, since the
    # training decoder ignores EXIF and source and target would otherwise disagree.
    rotated = image.getexif().get(0x0112, 1) not in (0, 1)
    if image.format in KEEP_FORMATS and image.mode == "RGB" and not _is_16bit_png(data) and not rotated:
        return data, KEEP_FORMATS[image.format], image.size
    rgb = to_rgb(ImageOps.exif_transpose(image) if rotated else image)
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
        raise Reject("instruction_too_long", f"instruction has {len(instruction)} characters > "
                                             f"{rules.max_instruction_chars} (--max-instruction-chars)")
    tgt, tgt_ext, tgt_size = load_image(record.target, "target", record.blobs, checksums, rules)
    sample = {"__key__": record.key, f"tgt.{tgt_ext}": tgt}
    meta = dict(record.meta, instruction=instruction, target_size=list(tgt_size),
                text_to_image=record.source is None, origin=record.location,
                bucket=list(nearest_bucket(*tgt_size, base=rules.bucket_base)))
    if record.source is not None:
        src, src_ext, src_size = load_image(record.source, "source", record.blobs, checksums, rules)
        change = abs(math.log((src_size[0] / src_size[1]) / (tgt_size[0] / tgt_size[1])))
        if change > math.log1p(rules.max_aspect_change):
            raise Reject("aspect_mismatch", f"source {record.source} is {src_size[0]}x{src_size[1]} and target "
                                            f"{record.target} is {tgt_size[0]}x{tgt_size[1]}: aspect ratios differ by "
                                            f"{math.expm1(change):.0%} (> --max-aspect-change "
                                            f"{rules.max_aspect_change})")
        sample[f"src.{src_ext}"] = src
        meta["source_size"] = list(src_size)
    for i, ref in enumerate(record.references):
        data, ext, _ = load_image(ref, f"reference {i + 1}", record.blobs, checksums, rules)
        sample[f"ref{i}.{ext}"] = data
    meta["task"] = meta.get("task") or ("text_to_image" if record.source is None else None)
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return sample


# --------------------------------------------------------------------------- one record, in a worker
@dataclasses.dataclass
class Outcome:
    sample: dict | None = None
    reject: dict | None = None
    tokens: tuple[str, int, int] | None = None  # (location, tokens, budget) when over the token budget


def _reject_row(item: Record | BadRecord, reason: str, detail: str) -> dict:
    return {"location": item.location, "key": item.key or None, "reason": reason, "detail": detail,
            "images": item.images}


def validate(item: Record | BadRecord, checksums: dict[str, str], rules: Validation,
             budget: TokenBudget | None) -> Outcome:
    if isinstance(item, BadRecord):
        return Outcome(reject=_reject_row(item, item.reason, item.detail))
    try:
        sample = build_sample(item, checksums, rules)
    except Reject as err:
        return Outcome(reject=_reject_row(item, err.reason, err.detail))
    tokens = None
    if budget is not None:
        count, limit = budget.count(item.instruction), budget.limit(item.source is not None)
        tokens = (item.location, count, limit) if count > limit else None
    return Outcome(sample, tokens=tokens)


class ShardTally:
    """Rejects, buckets and over-long instructions of one shard, for its manifest entry."""

    EXAMPLES = 3

    def __init__(self) -> None:
        self.rejects: list[dict] = []
        self.buckets: Counter = Counter()
        self.over_budget: list[tuple[str, int, int]] = []
        self.text_to_image = 0  # samples without a source image

    def add(self, outcome: Outcome) -> dict | None:
        """The sample to write, if any."""
        if outcome.reject is not None:
            self.rejects.append(outcome.reject)
            return None
        if outcome.tokens is not None:
            self.over_budget.append(outcome.tokens)
        meta = json.loads(outcome.sample["json"])
        self.buckets["x".join(map(str, meta["bucket"]))] += 1
        self.text_to_image += meta["text_to_image"]
        return outcome.sample

    def entry(self, out: Path, index: int, shard: dict) -> dict:
        """Write the shard's rejects part (atomically) and complete its manifest entry."""
        parts = out / "rejects"
        parts.mkdir(exist_ok=True)
        tmp = parts / f"shard-{index:06d}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rejects), encoding="utf-8",
                       errors="surrogateescape")
        os.replace(tmp, parts / f"shard-{index:06d}.jsonl")
        return dict(shard, index=index, rejected=len(self.rejects), buckets=dict(self.buckets),
                    reject_reasons=dict(Counter(r["reason"] for r in self.rejects)),
                    over_token_budget=len(self.over_budget), token_examples=self.over_budget[: self.EXAMPLES],
                    text_to_image=self.text_to_image)


def convert_shard(job: tuple) -> dict:
    """Worker (images on disk): validate one shard's records, write its rejects part and the shard."""
    out, index, items, checksums, rules, budget = job
    out, tally = Path(out), ShardTally()
    samples = [s for s in (tally.add(validate(i, checksums, rules, budget)) for i in items) if s is not None]
    return tally.entry(out, index, write_shard(out / f"shard-{index:06d}.tar", samples))


def validate_batch(job: tuple) -> list[Outcome]:
    """Worker (images from archives): validate records; image bytes kept as they came back as their
    reference only, since the main process holds them already."""
    items, checksums, rules, budget = job
    outcomes = []
    for item in items:
        outcome = validate(item, checksums, rules, budget)
        if outcome.sample is not None:
            originals = {id(data): ref for ref, data in item.blobs.items()}
            outcome.sample = {k: ("blob", originals[id(v)]) if id(v) in originals else v
                              for k, v in outcome.sample.items()}
        outcomes.append(outcome)
    return outcomes


def _exit_with_parent() -> None:
    """Pool initializer: a worker exits as soon as the process that started it is gone, so kill -9 of the
    conversion leaves no worker blocked forever on the job pipe."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; workers follow it out

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# --------------------------------------------------------------------------- the conversion
class _Pool:
    """Worker processes that die with this one; on an error or Ctrl-C pending jobs are cancelled, not awaited."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_exit_with_parent)

    def __enter__(self) -> ProcessPoolExecutor:
        return self.pool

    def __exit__(self, kind, error, trace) -> None:
        self.pool.shutdown(wait=kind is None, cancel_futures=kind is not None)
        if isinstance(error, BrokenProcessPool):
            raise DataError("a conversion worker died (killed, or out of memory on a huge image?); finished "
                            "shards are kept: rerun the same command to resume.") from None


def inputs_fingerprint(files: list[Path]) -> str:
    """Changes when an input file is added, removed or modified (size, mtime) between runs."""
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        st = path.stat()
        digest.update(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def convert(
    fmt: str,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    samples_per_shard: int = 1000,
    workers: int = 1,
    rules: Validation | None = None,
    progress: bool = True,
    memory_budget: int = 2 << 30,
    tokens: TokenBudget | None = None,
    **reader_options,
) -> dict:
    """Convert `inputs` of format `fmt` into shards under `out`; returns the manifest.

    Raises DataError (one paragraph: what, where, what to do) for bad input found up front, and when no
    sample at all could be written."""
    rules = rules or Validation()
    out = Path(out)
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard {samples_per_shard}: must be at least 1.")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the shards.")
    options = {k: v for k, v in reader_options.items() if v is not None}
    if "image_root" in options:
        options["image_root"] = Path(options["image_root"])
        if not options["image_root"].is_dir():
            raise DataError(f"--image-root {options['image_root']} is not a folder.")
    found = find_inputs(fmt, [Path(p) for p in inputs], out.resolve(), **options)
    out.mkdir(parents=True, exist_ok=True)
    params = {"format": fmt, "inputs": [str(Path(p).resolve()) for p in inputs], "samples_per_shard": samples_per_shard,
              "fingerprint": inputs_fingerprint(found.files), "validation": dataclasses.asdict(rules),
              "reader_options": {k: str(v) for k, v in options.items()}}
    manifest = read_manifest(out)
    if manifest.get("params", params) != params:
        changed = sorted(k for k in params if manifest["params"].get(k) != params[k])
        raise DataError(f"{out} holds shards converted from other inputs or options (differing: {', '.join(changed)}); "
                        "a rerun resumes only the same conversion: use a new --out, or delete this one to start over.")
    done = {e["index"]: e for e in manifest["shards"] if (out / e["file"]).exists()}
    checksums: dict[str, str] = {}
    for path in found.checksum_files:
        checksums.update(read_checksums(path))
    shutil.rmtree(out / SCRATCH, ignore_errors=True)  # left by a killed run

    shards = dict(done)

    def shard_done(entry: dict) -> None:
        shards[entry["index"]] = entry
        write_manifest(out, {"params": params, "shards": [shards[i] for i in sorted(shards)]})

    job = _Job(found, out, samples_per_shard, workers, checksums, rules, tokens, set(done), shard_done, progress)
    try:
        stats = job.from_archives(memory_budget) if found.archives else job.from_disk()
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DataError(f"disk full while writing to {out} ({err}); finished shards are kept: free space and rerun "
                        "the same command to resume.") from None
    manifest = finalize(out, params, shards, dict(stats, token_budget=dataclasses.asdict(tokens) if tokens else None))
    if manifest["num_samples"] == 0:
        raise DataError(why_empty(out, manifest))
    return manifest


@dataclasses.dataclass
class _Job:
    found: Inputs
    out: Path
    per_shard: int
    workers: int
    checksums: dict[str, str]
    rules: Validation
    tokens: TokenBudget | None
    done: set[int]  # shards finished by an earlier run
    shard_done: Callable[[dict], None]
    progress: bool

    def from_disk(self) -> dict:
        """Images on disk: records read lazily, whole shards validated and written by the workers."""
        # a first pass over the metadata: the total for the ETA, and an unreadable file fails before any image
        total = sum(1 for f in self.found.metadata for _ in iter_records(f.name, f.open))
        registry = KeyRegistry()
        records = read_records(self.found.metadata, registry)
        chunks = iter(lambda: list(itertools.islice(records, self.per_shard)), [])
        bar = tqdm(total=total, unit="record", desc=f"convert -> {self.out}", disable=not self.progress)
        start, written, pending = time.time(), 0, collections.deque()

        def finish(entry: dict) -> None:
            nonlocal written
            self.shard_done(entry)
            written += entry["bytes"]
            bar.set_postfix_str(f"{written / max(time.time() - start, 1e-9) / 2**20:.1f} MB/s written", refresh=False)
            bar.update(entry["count"] + entry["rejected"])

        with bar, _Pool(self.workers) as pool:
            for index, chunk in enumerate(chunks):
                if index in self.done:
                    bar.update(len(chunk))
                    continue
                job = (str(self.out), index, chunk, self.checksums, self.rules, self.tokens)
                pending.append(pool.submit(convert_shard, job))
                while len(pending) >= 2 * self.workers or (pending and pending[0].done()):
                    finish(pending.popleft().result())
            while pending:
                finish(pending.popleft().result())
        return {"ids_reused": registry.ids_reused}

    def from_archives(self, budget: int) -> dict:
        """Images (also) in archives: read 1 indexes them, read 2 assembles records as they complete."""
        found, per_shard = self.found, self.per_shard
        size = sum(a.size for a in found.archives)
        names = ", ".join(Path(a.name).name for a in found.archives)
        with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"read 1/2 (index) {names}",
                  disable=not self.progress) as bar:
            index = index_archives(found.archives, found.embedded or (lambda name: False), bar.update)
        metadata = found.metadata + [found.embedded_file(index, *m) for m in index.metadata] \
            if found.embedded_file else list(found.metadata)
        if not metadata:
            raise DataError(f"no metadata in {names}: no <task>/metadata/*.json member in the archives (are these "
                            "the dataset's image archives? for ShareGPT-4o-Image use --format sharegpt4o).")
        for meta_file in metadata:
            meta_file.resolve.index = index
        registry = KeyRegistry()
        members_of = lambda r: r.members.values()  # noqa: E731
        ordered = completion_order(list(read_records(metadata, registry)), members_of)
        positions = [p for p in range(len(ordered)) if p // per_shard not in self.done]
        timeline = Timeline.of([ordered[p] for p in positions], members_of)
        peak_memory, peak_disk = peak_hold(index, timeline, budget)
        self._check_space(peak_disk, sum(index.sizes[m] for m in timeline.release), budget)
        if self.progress:
            size_of = lambda n: tqdm.format_sizeof(n, "B", 1024)  # noqa: E731
            tqdm.write(f"{len(positions)} records to convert; read 2/2 will hold at most {size_of(peak_memory)} of "
                       f"images in memory and {size_of(peak_disk)} in {self.out / SCRATCH}", file=sys.stderr)
        used = {m for record in ordered for m in record.members.values()}
        unused = [n for m, n in enumerate(index.names) if m not in used and not (found.embedded and found.embedded(n))]
        assembly = Assembly(index, timeline, budget, self.out / SCRATCH)
        last_of_shard = lambda s: min((s + 1) * per_shard, len(ordered)) - 1  # noqa: E731
        writers: dict[int, tuple[ShardWriter, ShardTally]] = {}
        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"read 2/2 (convert) {names}",
                   disable=not self.progress)
        start, converted = time.time(), 0

        def attach(record, member_bytes):
            record.blobs = {ref: member_bytes(m) for ref, m in record.members.items()}
            return record

        def write(future, batch) -> None:
            nonlocal converted
            for (position, record), outcome in zip(batch, future.result()):
                shard = position // per_shard
                if shard not in writers:
                    writers[shard] = (ShardWriter(self.out / f"shard-{shard:06d}.tar"), ShardTally())
                writer, tally = writers[shard]
                sample = tally.add(outcome)
                if sample is not None:
                    writer.write({k: record.blobs[v[1]] if isinstance(v, tuple) else v for k, v in sample.items()})
                record.blobs = {}
                if position == last_of_shard(shard):
                    self.shard_done(tally.entry(self.out, shard, writer.close()))
                    del writers[shard]
            converted += len(batch)
            bar.set_postfix_str(f"{converted} records, {converted / max(time.time() - start, 1e-9):.1f} records/s",
                                refresh=False)

        # records first: zip then exhausts the read, which ends it (scratch removed, peaks known)
        stream = ((p, r) for r, p in zip(assembly.records(attach, bar.update), positions))
        with bar, _Pool(self.workers) as pool:
            inflight = collections.deque()
            for batch in _batches(stream, per_shard):
                job = ([record for _, record in batch], self.checksums, self.rules, self.tokens)
                inflight.append((pool.submit(validate_batch, job), batch))
                while len(inflight) > 2 * self.workers or (inflight and inflight[0][0].done()):
                    write(*inflight.popleft())
            while inflight:
                write(*inflight.popleft())
        return {"ids_reused": registry.ids_reused,
                "archives": {"files": [a.name for a in found.archives], "bytes": size, "members": len(index.names),
                             "unused_members": len(unused), "unused_example": unused[0] if unused else None,
                             "memory_budget": budget, "peak_memory": assembly.peak_memory,
                             "peak_scratch": assembly.peak_disk, "predicted_peaks": [peak_memory, peak_disk]}}

    def _check_space(self, scratch: int, shards: int, budget: int) -> None:
        free = shutil.disk_usage(self.out).free
        if scratch > free:
            raise DataError(f"reading the archives in this member order needs {scratch / 2**30:.1f} GiB of scratch "
                            f"space in {self.out / SCRATCH} beyond the --memory-budget of {budget / 2**30:.1f} GiB, "
                            f"but only {free / 2**30:.1f} GiB is free there: free space, or raise --memory-budget.")
        if scratch + shards > free:
            tqdm.write(f"warning: the shards will take about {shards / 2**30:.1f} GiB (plus up to "
                       f"{scratch / 2**30:.1f} GiB of scratch) but {self.out} has {free / 2**30:.1f} GiB free; the "
                       "conversion stops when the disk is full (finished shards are kept).", file=sys.stderr)


def _batches(stream, per_shard: int):
    """Consecutive (position, record) pairs in groups of at most BATCH, never spanning two shards."""
    batch = []
    for position, record in stream:
        if batch and (len(batch) == BATCH or position // per_shard != batch[0][0] // per_shard):
            yield batch
            batch = []
        batch.append((position, record))
    if batch:
        yield batch


def finalize(out: Path, params: dict, shards: dict[int, dict], stats: dict) -> dict:
    ordered = [shards[i] for i in sorted(shards)]
    reasons, buckets = Counter(), Counter()
    for e in ordered:
        reasons.update(e["reject_reasons"])
        buckets.update(e["buckets"])
    with open(out / "rejects.jsonl.tmp", "wb") as merged:  # rejects of every shard, in record order
        for e in ordered:
            part = out / "rejects" / f"shard-{e['index']:06d}.jsonl"
            if part.exists():
                merged.write(part.read_bytes())
    os.replace(out / "rejects.jsonl.tmp", out / "rejects.jsonl")
    examples = [x for e in ordered for x in e.get("token_examples", [])][: ShardTally.EXAMPLES]
    manifest = {"params": params, "shards": ordered, "num_samples": sum(e["count"] for e in ordered),
                "num_rejected": sum(reasons.values()), "reject_reasons": dict(reasons),
                "buckets": dict(sorted(buckets.items())), "bucket_base": params["validation"]["bucket_base"],
                "over_token_budget": sum(e.get("over_token_budget", 0) for e in ordered),
                "text_to_image": sum(e.get("text_to_image", 0) for e in ordered),  # 0 for shards of older versions
                "token_examples": examples, **stats}
    write_manifest(out, manifest)
    return manifest


HINTS = {
    "missing_file": "the images are not where the metadata says. If they are still inside the downloaded archives "
                    "(.tar, .tar.gz.partNNN), pass the folder holding the archives (convert reads them in place); if "
                    "the paths are relative to another folder, pass --image-root.",
    "bad_json": "the metadata files are not JSON records of this format: check --format.",
    "missing_field": "the records lack the fields this format reads: check --format (for --format jsonl, name the "
                     "fields with --source-key/--target-key/--instruction-key).",
    "bad_field": "the records' fields have other types than this format expects: check --format.",
    "too_small": "every image is smaller than --min-side: lower it.",
    "aspect_mismatch": "source and target differ in shape: raise --max-aspect-change, or check the pairing.",
    "undecodable_image": "the image files are corrupt or not images.",
}


def why_empty(out: Path, manifest: dict) -> str:
    """The one-paragraph failure of a conversion that wrote no sample: what happened and the likely cause."""
    if not manifest["num_rejected"]:
        return (f"{out}: 0 samples written: the inputs hold no records (the metadata files are empty). Check the "
                "inputs and --format.")
    reasons = sorted(manifest["reject_reasons"].items(), key=lambda kv: -kv[1])
    with open(out / "rejects.jsonl", encoding="utf-8") as rows:
        first = next(r for r in map(json.loads, rows) if r["reason"] == reasons[0][0])
    return (f"{out}: 0 samples written: all {manifest['num_rejected']} records were rejected "
            f"({', '.join(f'{n} {r}' for r, n in reasons)}). For example {first['location']}: {first['detail']}. "
            f"Likely cause: {HINTS.get(reasons[0][0], 'see the reasons above.')} Every reject is listed in "
            f"{out / 'rejects.jsonl'}.")


def verify(directory: str | os.PathLike, progress: bool = True) -> list[str]:
    """Problems found: no samples, shards missing or not listed, a wrong sha256 or sample count. Empty when all
    is well."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}"]
    try:
        manifest = read_manifest(directory)
        for entry in manifest["shards"]:  # the fields read below
            entry["file"], entry["count"], entry["sha256"]
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # not JSON, or not a manifest's shape
        return [f"{directory / 'manifest.json'}: not a shard manifest ({type(err).__name__}: {err}): it is damaged; "
                "convert into a fresh folder"]
    if not manifest["shards"]:
        return [f"{directory}: no manifest.json, or it lists no shards (not a finished conversion)"]
    problems = []
    if sum(e["count"] for e in manifest["shards"]) == 0:
        rejects = directory / "rejects.jsonl"
        problems.append(f"{directory}: the manifest lists 0 samples: the conversion rejected every record"
                        f"{f' (see {rejects})' if rejects.exists() else ''}; there is nothing to train on")
    listed = {e["file"] for e in manifest["shards"]}
    for extra in sorted(p.name for p in directory.glob("*.tar") if p.name not in listed):
        problems.append(f"{extra}: a shard file not listed in manifest.json (from another conversion, or copied in); "
                        "loaders would ignore it: remove it, or convert into a fresh folder")
    for entry in tqdm(manifest["shards"], desc=f"verify {directory}", unit="shard", disable=not progress):
        path = directory / entry["file"]
        if not path.exists():
            problems.append(f"{entry['file']}: missing")
            continue
        if entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:  # told without hashing
            problems.append(f"{entry['file']}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                            "(truncated or overwritten: copy it again)")
            continue
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 mismatch (corrupted or modified)")
            continue
        with tarfile.open(path) as tar:
            keys = {m.name.split("/")[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile()}
        if len(keys) != entry["count"]:
            problems.append(f"{entry['file']}: {len(keys)} samples, manifest says {entry['count']}")
    return problems
