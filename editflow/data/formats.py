"""Readers for the dataset layouts `editflow data convert` understands.

Each reader yields, in a deterministic order, either a `Record` (paths of the
images, the instruction, metadata) or a `BadRecord` (a line that cannot even be
parsed), both with their location (file and line) so rejects can be traced.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

IMAGE_PLACEHOLDER = re.compile(r"<image>")


@dataclasses.dataclass
class Record:
    location: str  # "metadata/omniedit.jsonl:17"
    key: str
    target: str
    instruction: str
    source: str | None = None  # None: text-to-image
    references: list[str] = dataclasses.field(default_factory=list)  # extra reference images
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BadRecord:
    location: str
    key: str | None
    reason: str
    detail: str


def safe_key(text: str) -> str:
    """WebDataset splits file names at the first dot: keys keep only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "sample"


def clean_instruction(text: str) -> str:
    return " ".join(IMAGE_PLACEHOLDER.sub(" ", text or "").split())


def iter_json_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line or index, record, error) for a .jsonl file (one record a line) or a .json list."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, None, f"malformed json: {err}"
                    continue
                yield (number, record, None) if isinstance(record, dict) else (number, None, "record is not an object")
    else:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for index, record in enumerate(records):
            yield (index, record, None) if isinstance(record, dict) else (index, None, "record is not an object")


def _resolve(root: Path, name: str, also: tuple[str, ...] = ()) -> str:
    """Path of an image given relative to `root` (or one of its sub-folders `also`); absolute paths kept."""
    path = Path(name)
    if path.is_absolute():
        return str(path)
    for base in (root, *[root / a for a in also]):
        if (base / path).exists():
            return str(base / path)
    return str(root / path)  # missing: validation rejects it, naming this path


def _first(record: dict, names: tuple[str, ...]):
    for name in names:
        value = record.get(name)
        if value not in (None, "", []):
            return value
    return None


# --------------------------------------------------------------------------- GPT-IMAGE-EDIT-1.5M
def read_checksums(path: Path) -> dict[str, str]:
    """`sha256sum` output (`HASH  relative/path`, optionally `*path`) -> {resolved path: hash}."""
    table = {}
    for line in path.read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            table[str((path.parent / parts[1].lstrip("*")).resolve())] = parts[0].lower()
    return table


def gpt_image_edit(inputs: list[Path], **_) -> Iterator[Record | BadRecord]:
    """Dataset roots (with `metadata/*.jsonl`) or metadata files; origins omniedit, hqedit, ultraedit."""
    for item in inputs:
        if item.is_dir():
            root, files = item, sorted((item / "metadata").glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"{item}: no metadata/*.jsonl (expected the GPT-IMAGE-EDIT-1.5M layout)")
        else:
            root = item.parent.parent if item.parent.name == "metadata" else item.parent
            files = [item]
        for meta_file in files:
            origin = meta_file.stem
            for line, record, error in iter_json_records(meta_file):
                location = f"{meta_file}:{line}"
                if error:
                    yield BadRecord(location, None, "bad_json", error)
                    continue
                key = safe_key(record.get("id") or record.get("key") or f"{origin}_{line:09d}")
                source = _first(record, ("source", "input", "input_image", "src"))
                target = _first(record, ("target", "output", "output_image", "edited", "tgt"))
                instruction = record.get("instruction")
                if not target or not source or instruction is None:
                    missing = [n for n, v in (("source/input", source), ("target/output", target),
                                              ("instruction", instruction)) if v in (None, "")]
                    yield BadRecord(location, key, "missing_field", f"no {', '.join(missing)}")
                    continue
                meta = {k: v for k, v in record.items() if k not in ("source", "input", "target", "output", "instruction")}
                meta.setdefault("dataset", record.get("dataset_source") or origin)
                yield Record(location, key, _resolve(root, target, ("images",)), clean_instruction(instruction),
                             _resolve(root, source, ("images",)), meta=meta)


# --------------------------------------------------------------------------- llava-style edit json
def llava_edit(inputs: list[Path], image_root: Path | None = None, **_) -> Iterator[Record | BadRecord]:
    """`{"image": [src, ..., tgt], "conversations": [{"from": "human", "value": "...<image>..."}, ...]}`."""
    for path in inputs:
        root = image_root or path.parent
        for index, record, error in iter_json_records(path):
            location = f"{path}:{index}"
            if error:
                yield BadRecord(location, None, "bad_json", error)
                continue
            key = safe_key(record.get("id") or f"{path.stem}_{index:09d}")
            images = record.get("image") or record.get("images") or []
            images = [images] if isinstance(images, str) else list(images)
            human = next((t.get("value", "") for t in record.get("conversations", []) if t.get("from") == "human"), None)
            if not images or human is None:
                yield BadRecord(location, key, "missing_field", "needs image list and a human turn")
                continue
            meta = {"dataset": record.get("dataset") or path.stem}
            paths = [_resolve(root, p) for p in images]
            yield Record(location, key, paths[-1], clean_instruction(human), paths[0] if len(paths) > 1 else None,
                         references=paths[1:-1], meta=meta)


# --------------------------------------------------------------------------- ShareGPT-4o-Image
SHAREGPT_PROMPT = ("input_prompt", "prompt", "instruction", "text")
SHAREGPT_INPUT = ("input_image", "input_images", "source_image", "source")
SHAREGPT_OUTPUT = ("output_image", "output_images", "image", "target")


def sharegpt4o(inputs: list[Path], image_root: Path | None = None, **_) -> Iterator[Record | BadRecord]:
    """ShareGPT-4o-Image's text-to-image and text-and-image-to-image json files."""
    for path in inputs:
        files = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            root = image_root or file.parent
            for index, record, error in iter_json_records(file):
                location = f"{file}:{index}"
                if error:
                    yield BadRecord(location, None, "bad_json", error)
                    continue
                key = safe_key(record.get("id") or f"{file.stem}_{index:09d}")
                prompt, inputs_, output = (_first(record, SHAREGPT_PROMPT), _first(record, SHAREGPT_INPUT),
                                           _first(record, SHAREGPT_OUTPUT))
                if not prompt or not output:
                    yield BadRecord(location, key, "missing_field", "needs a prompt and an output image")
                    continue
                output = output[0] if isinstance(output, list) else output
                sources = [inputs_] if isinstance(inputs_, str) else list(inputs_ or [])
                task = "text_and_image_to_image" if sources else "text_to_image"
                yield Record(location, key, _resolve(root, output), clean_instruction(prompt),
                             _resolve(root, sources[0]) if sources else None,
                             references=[_resolve(root, s) for s in sources[1:]],
                             meta={"dataset": "sharegpt4o", "task": task})


# --------------------------------------------------------------------------- the user's own jsonl
def user_jsonl(
    inputs: list[Path], image_root: Path | None = None, source_key: str = "source", target_key: str = "target",
    instruction_key: str = "instruction", id_key: str = "id", dataset: str | None = None, **_,
) -> Iterator[Record | BadRecord]:
    """Any jsonl/json of records with configurable key names; images relative to --image-root or the file."""
    for path in inputs:
        root = image_root or path.parent
        for line, record, error in iter_json_records(path):
            location = f"{path}:{line}"
            if error:
                yield BadRecord(location, None, "bad_json", error)
                continue
            key = safe_key(record.get(id_key) or f"{path.stem}_{line:09d}")
            target, instruction = record.get(target_key), record.get(instruction_key)
            if not target or instruction is None:
                yield BadRecord(location, key, "missing_field", f"needs {target_key!r} and {instruction_key!r}")
                continue
            source = record.get(source_key)
            meta = {k: v for k, v in record.items() if k not in (source_key, target_key, instruction_key)}
            meta.setdefault("dataset", dataset or path.stem)
            yield Record(location, key, _resolve(root, target), clean_instruction(str(instruction)),
                         _resolve(root, source) if source else None, meta=meta)


READERS = {"gpt-image-edit": gpt_image_edit, "llava-edit": llava_edit, "sharegpt4o": sharegpt4o, "jsonl": user_jsonl}
