"""The dataset layouts `editflow data convert` reads: where their metadata is and what a record holds.

`find_inputs` turns the command line's inputs into metadata files (each with its format's field reader
and a resolver for the image names it holds) and archive sets; `read_records` turns metadata files into
`Record`s (image references, instruction, metadata) or `BadRecord`s (rejects: what is wrong, where), in a
deterministic order, with unique keys. An image reference is a path on disk, or `archive:member` when
the image is still inside a downloaded archive (its bytes arrive in `Record.blobs`, see archives.py).
"""

from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from editflow.data.archives import ArchiveSet, MemberIndex, archive_sets, is_archive, member_name
from editflow.data.errors import DataError
from editflow.data.keys import KeyRegistry
from editflow.data.metadata import iter_records

IMAGE_PLACEHOLDER = re.compile(r"<image>")
JSON_SUFFIXES = (".json", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Folders that hold images only: not walked when looking for metadata (a release has ~3M files in them).
IMAGE_FOLDERS = {"input", "output", "images", "image"}


@dataclasses.dataclass(slots=True)
class Record:
    file: str  # metadata file (a path, or `archive:member`)
    number: int  # the record's number in it, from 1 (metadata.py)
    target: str
    instruction: str
    source: str | None = None  # None: text-to-image
    references: list[str] = dataclasses.field(default_factory=list)  # further input images
    meta: dict = dataclasses.field(default_factory=dict)
    key: str = ""
    members: dict[str, int] = dataclasses.field(default_factory=dict)  # ref -> archive member, for refs in archives
    blobs: dict[str, bytes] = dataclasses.field(default_factory=dict)  # their bytes, once read

    @property
    def location(self) -> str:
        return f"{self.file}:{self.number}"

    @property
    def images(self) -> list[str]:
        return [i for i in (self.source, self.target, *self.references) if i]


@dataclasses.dataclass(slots=True)
class BadRecord:
    file: str
    number: int
    reason: str
    detail: str
    key: str | None = None
    images: list[str] = dataclasses.field(default_factory=list)
    members: dict = dataclasses.field(default_factory=dict)  # none: a reject needs nothing from an archive

    @property
    def location(self) -> str:
        return f"{self.file}:{self.number}"


class Bad(Exception):
    """A record that cannot become a sample: (reason, detail)."""

    def __init__(self, reason: str, detail: str, images: list[str] | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.images = reason, detail, images or []


@dataclasses.dataclass
class Fields:
    """What a format's reader takes from one raw record; image names as written in the metadata."""

    target: str
    instruction: str
    sources: list[str] = dataclasses.field(default_factory=list)  # first: the source; the rest: references
    id: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def clean_instruction(text: str) -> str:
    return " ".join(IMAGE_PLACEHOLDER.sub(" ", text).split())


def _present(raw: dict, names: tuple[str, ...]) -> tuple[str, object] | tuple[None, None]:
    for name in names:
        if raw.get(name) not in (None, "", []):
            return name, raw[name]
    return None, None


def _text(raw: dict, names: tuple[str, ...]) -> str | None:
    field, value = _present(raw, names)
    if field is not None and not isinstance(value, str):
        raise Bad("bad_field", f"field {field!r} is a JSON {type(value).__name__}, expected text")
    return value


def _image_names(raw: dict, names: tuple[str, ...]) -> list[str]:
    field, value = _present(raw, names)
    if field is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise Bad("bad_field", f"field {field!r} must be an image path or a list of them, got {value!r:.80}")
    return values


def _record_id(raw: dict, names: tuple[str, ...]) -> str | None:
    field, value = _present(raw, names)
    if field is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Bad("bad_field", f"field {field!r} (the id) is a JSON {type(value).__name__}, expected text or a number")
    return str(value)


def _require(**values) -> None:
    missing = [name for name, value in values.items() if value in (None, "", [])]
    if missing:
        raise Bad("missing_field", "no " + " and no ".join(missing))


# --------------------------------------------------------------------------- record schemas
GPT_INPUT = ("input", "source", "input_image", "src")
GPT_OUTPUT = ("output", "target", "output_image", "edited", "tgt")


def gpt_image_edit_fields(raw: dict) -> Fields:
    """GPT-IMAGE-EDIT-1.5M: `id`, `input`, `output`, `instruction`, `dataset_source`, `task`, ... (and the
    guide's `source`/`target` spelling)."""
    sources, targets = _image_names(raw, GPT_INPUT), _image_names(raw, GPT_OUTPUT)
    instruction = _text(raw, ("instruction",))
    _require(**{"'input' field": sources, "'output' field": targets, "'instruction' field": instruction})
    if len(targets) > 1:
        raise Bad("bad_field", f"{len(targets)} output images, expected one")
    used = {*GPT_INPUT, *GPT_OUTPUT, "instruction"}
    meta = {k: v for k, v in raw.items() if k not in used}
    if raw.get("dataset_source"):
        meta["dataset"] = raw["dataset_source"]
    return Fields(targets[0], instruction, sources, _record_id(raw, ("id", "key")), meta)


def llava_edit_fields(raw: dict) -> Fields:
    """UniWorld / GPT-Image-Edit training json: `{"image": [src, ..., tgt], "conversations": [...]}`; the
    instruction is the last human turn, as the reference code reads it."""
    images = _image_names(raw, ("image", "images"))
    turns = raw.get("conversations")
    if turns is not None and not (isinstance(turns, list) and all(isinstance(t, dict) for t in turns)):
        raise Bad("bad_field", "field 'conversations' must be a list of {from, value} turns")
    human = [t.get("value") for t in turns or [] if t.get("from") in ("human", "user")]
    if human and not isinstance(human[-1], str):
        raise Bad("bad_field", "the last human turn's 'value' is not text")
    _require(**{"'image' field": images, "human turn in 'conversations'": human})
    meta = {k: v for k, v in raw.items() if k not in ("image", "images", "conversations") and
            isinstance(v, (str, int, float, bool))}
    return Fields(images[-1], human[-1], images[:-1], _record_id(raw, ("id",)), meta)


def sharegpt4o_fields(raw: dict) -> Fields:
    """ShareGPT-4o-Image: `input_prompt`, `output_image`, `input_image` (a list; absent or empty: text-to-image)."""
    prompt = _text(raw, ("input_prompt", "prompt", "instruction", "text"))
    outputs = _image_names(raw, ("output_image", "output_images", "image", "target"))
    sources = _image_names(raw, ("input_image", "input_images", "source_image", "source"))
    _require(**{"'input_prompt' field": prompt, "'output_image' field": outputs})
    if len(outputs) > 1:
        raise Bad("bad_field", f"{len(outputs)} output images, expected one")
    meta = {"task": "text_and_image_to_image" if sources else "text_to_image"}
    meta.update({k: raw[k] for k in ("output_image_resolution", "input_image_resolution") if k in raw})
    return Fields(outputs[0], prompt, sources, _record_id(raw, ("id",)), meta)


def user_fields(source_key: str = "source", target_key: str = "target", instruction_key: str = "instruction",
                id_key: str = "id", source_required: bool = False) -> Callable[[dict], Fields]:
    """Records with the user's own field names (`--source-key` ...); every other field is kept as metadata. A
    record without the source field is text-to-image, unless `source_required` (an explicit --source-key)."""

    def fields(raw: dict) -> Fields:
        if source_required and source_key not in raw:  # a misspelt key would make every record text-to-image
            raise Bad("missing_field", f"no field {source_key!r} (--source-key); the record has "
                                       f"{', '.join(map(repr, raw)) or 'no fields'}")
        target, sources = _image_names(raw, (target_key,)), _image_names(raw, (source_key,))
        instruction = _text(raw, (instruction_key,))
        _require(**{f"{target_key!r} field": target, f"{instruction_key!r} field": instruction})
        if len(target) > 1:
            raise Bad("bad_field", f"field {target_key!r} names {len(target)} images, expected one")
        meta = {k: v for k, v in raw.items() if k not in (source_key, target_key, instruction_key)}
        return Fields(target[0], instruction, sources, _record_id(raw, (id_key,)), meta)

    return fields


# --------------------------------------------------------------------------- image names -> references
@dataclasses.dataclass
class Resolver:
    """Finds an image named in a metadata file: on disk below `bases` (or the doubled `<base>/<base name>/`
    folder the release's extraction command makes), else among archive members below `prefix`, in the
    archives whose file name starts with `prefer` first."""

    bases: list[Path]
    prefix: str = ""
    prefer: str = ""
    index: MemberIndex | None = None

    def __call__(self, name: str, role: str) -> tuple[str, int | None]:
        """(reference, archive member number or None)."""
        path = Path(name)
        candidates = [path] if path.is_absolute() else [b / path for b in self.bases]
        if len(candidates) == 1 and self.index is None:
            return str(candidates[0]), None  # nothing to choose: the worker's read reports a missing file
        if not path.is_absolute():
            candidates += [b / b.name / path for b in self.bases]
        for candidate in candidates:
            if os.path.lexists(candidate):  # a broken link too: the read will name it
                return str(candidate), None
        tried = f"no file {' or '.join(str(c) for c in candidates)}" if candidates else ""
        if self.index is not None and not path.is_absolute():
            member = member_name(posixpath.join(self.prefix, name))
            order = sorted(range(len(self.index.archives)),
                           key=lambda a: not Path(self.index.archives[a].name).name.startswith(self.prefer or "\0"))
            number = self.index.find(member, order)
            if number is not None:
                archive = next(self.index.archives[a].name for a in order if member in self.index.lookup[a])
                return f"{archive}:{member}", number
            names = ", ".join(Path(a.name).name for a in self.index.archives)
            tried += f"{', ' if tried else ''}no member {member} in {names}"
        raise Bad("missing_file", f"{role} image {name!r} not found: {tried}", [str(c) for c in candidates[:1]])


# --------------------------------------------------------------------------- finding the metadata
@dataclasses.dataclass
class MetadataFile:
    name: str  # a path, or `archive:member`
    open: Callable[[], BinaryIO]
    fields: Callable[[dict], Fields]
    resolve: Resolver
    dataset: str  # default `dataset` of its samples, and the stem of keys made for records without an id


@dataclasses.dataclass
class Inputs:
    metadata: list[MetadataFile]
    archives: list[ArchiveSet]
    checksum_files: list[Path]
    # for formats whose metadata ships inside archives: which members are metadata, and how to read one
    embedded: Callable[[str], bool] | None = None
    embedded_file: Callable[[MemberIndex, int, str, bytes], MetadataFile] | None = None
    files: list[Path] = dataclasses.field(default_factory=list)  # every input file, for the fingerprint


def absolute(path: Path) -> Path:
    """An absolute path without resolving links (a hub cache links files to blobs named by hash)."""
    return Path(os.path.abspath(path))


def walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Files below `root` in sorted order, following links once, skipping hidden, image-only and `exclude`."""
    seen = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in IMAGE_FOLDERS and
                         (exclude is None or os.path.realpath(os.path.join(folder, d)) != str(exclude)))
        yield from (Path(folder) / f for f in sorted(files) if not f.startswith("."))


def _archive_files(item: Path) -> list[Path]:
    """An archive, a part of a split one (-> all its parts) or `X.tar.gz` given for its parts."""
    if item.is_file() and is_archive(item):
        base = re.sub(r"\.part(\d+|[a-z]+)$", "", item.name, flags=re.IGNORECASE)
        parts = [p for p in item.parent.glob(f"{glob_escape(base)}.part*") if is_archive(p)]
        return parts if parts and item in parts else [item]
    if not item.exists() and is_archive(item):
        return [p for p in item.parent.glob(f"{glob_escape(item.name)}.part*") if is_archive(p)]
    return []


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _describe(folder: Path, files: list[Path]) -> str:
    jsons = [f for f in files if f.suffix.lower() in JSON_SUFFIXES]
    images = sum(f.suffix.lower() in IMAGE_SUFFIXES for f in files)
    archives = sum(is_archive(f) for f in files)
    seen = f"{len(jsons)} .json/.jsonl files ({', '.join(str(f.relative_to(folder)) for f in jsons[:3])}" \
           f"{', ...' if len(jsons) > 3 else ''}), " if jsons else "no .json/.jsonl files, "
    return seen + f"{images} images outside input/output/images folders, {archives} archives"


def _open(path: Path) -> Callable[[], BinaryIO]:
    return lambda: open(path, "rb")


def find_gpt_image_edit(items: list[Path], exclude: Path | None, image_root: Path | None = None, **_) -> Inputs:
    """GPT-IMAGE-EDIT-1.5M: every `<task>/metadata/*.json(l)` below the inputs at any depth (dataset root, one
    source, one task, the doubled `<source>/<source>/` layout, the guide's `metadata/*.jsonl` + `images/`),
    image paths relative to the task folder; or the downloaded `.tar.gz.partNNN` archives, read in place."""
    metadata_paths, archive_paths = [], []
    for item in items:
        archives = _archive_files(item)
        if archives:
            archive_paths += archives
        elif item.is_file():
            metadata_paths.append(item)
        elif item.is_dir():
            files = list(walk(item, exclude))
            found = [f for f in files if f.suffix.lower() in JSON_SUFFIXES and f.parent.name == "metadata"]
            archives = [f for f in files if is_archive(f)]
            if found and archives:
                raise DataError(f"{item} holds both extracted metadata ({found[0]}, ...) and archives "
                                f"({archives[0]}, ...): pass the extracted folder or the archives' folder, not a "
                                "folder holding both (each record would be converted twice).")
            if not found and not archives:
                raise DataError(f"{item}: no GPT-IMAGE-EDIT-1.5M metadata (<task>/metadata/*.json or "
                                f"metadata/*.jsonl) and no downloaded archives (*.tar.gz.partNNN, *.tar) below it; "
                                f"found {_describe(item, files)}. Pass the dataset root, a source or task folder, "
                                "or the folder of the downloaded archives (or use --format jsonl/llava-edit for "
                                "other layouts).")
            metadata_paths += found
            archive_paths += archives
        else:
            raise DataError(f"input not found: {item}")

    def task_folder(meta: Path) -> Path:
        return meta.parent.parent if meta.parent.name == "metadata" else meta.parent

    files = []
    for path in dict.fromkeys(map(absolute, metadata_paths)):  # a file reached twice is read once
        task = task_folder(path)
        bases = [image_root] if image_root else [task, task / "images"]
        files.append(MetadataFile(str(path), _open(path), gpt_image_edit_fields, Resolver(bases), path.stem))
    checksums = sorted({p for p in (task_folder(Path(f.name)) / "checksum.sha256" for f in files) if p.exists()})

    def embedded(name: str) -> bool:
        return name.lower().endswith(JSON_SUFFIXES) and posixpath.basename(posixpath.dirname(name)) == "metadata"

    def embedded_file(index: MemberIndex, archive: int, name: str, data: bytes) -> MetadataFile:
        task = posixpath.dirname(posixpath.dirname(name))
        return MetadataFile(f"{index.archives[archive].name}:{name}", lambda: io.BytesIO(data), gpt_image_edit_fields,
                            Resolver([], task, Path(index.archives[archive].name).name, index),
                            posixpath.splitext(posixpath.basename(name))[0])

    return Inputs(files, archive_sets(archive_paths), checksums, embedded, embedded_file,
                  [Path(f.name) for f in files] + archive_paths)


def find_llava_edit(items: list[Path], exclude: Path | None, image_root: Path | None = None, **_) -> Inputs:
    """UniWorld / GPT-Image-Edit training data: a data list (`data.txt`: lines `image_root,json_file,need_weight`,
    each json with its own image root), or json files whose images are relative to --image-root or the json."""
    files, lists = [], []
    for item in items:
        jsons = [f for f in walk(item, exclude) if f.suffix.lower() in JSON_SUFFIXES] if item.is_dir() else \
            [item] if item.suffix.lower() in JSON_SUFFIXES else []
        if item.is_file() and not jsons:
            lists.append(item)
            files += _data_list(item, image_root)
        elif not item.exists():
            raise DataError(f"input not found: {item}")
        elif not jsons:
            raise DataError(f"{item}: no .json/.jsonl files below it; pass a data list (data.txt) or the json files.")
        for path in jsons:
            files.append(MetadataFile(str(path), _open(path), llava_edit_fields,
                                      Resolver([image_root or path.parent]), path.stem))
    return Inputs(files, [], [], files=lists + [Path(f.name) for f in files])


def _data_list(path: Path, image_root: Path | None) -> list[MetadataFile]:
    """Lines `image_root,json_file[,need_weight]`; relative paths against the list's folder, then the working
    directory (where the reference code runs). Every line is checked before anything is converted."""
    files = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) not in (2, 3) or not all(fields[:2]):
            raise DataError(f"{path}:{number}: expected `image_root,json_file,need_weight`, got {line!r:.120}. "
                            "(This data list format cannot hold paths containing commas.)")
        root, json_file = _locate(fields[0], path.parent), _locate(fields[1], path.parent)
        if not json_file.is_file():
            raise DataError(f"{path}:{number}: json file {fields[1]} not found (looked for {json_file}"
                            f"{'' if Path(fields[1]).is_absolute() else ' and in the working directory'}).")
        if image_root is None and not root.is_dir():
            raise DataError(f"{path}:{number}: image root {fields[0]} is not a folder (looked for {root}); "
                            "extract the images there or pass --image-root.")
        files.append(MetadataFile(str(json_file), _open(json_file), llava_edit_fields,
                                  Resolver([image_root or root]), json_file.stem))
    if not files:
        raise DataError(f"{path}: no `image_root,json_file,need_weight` lines.")
    return files


def _locate(text: str, folder: Path) -> Path:
    given = Path(text).expanduser()
    options = [given] if given.is_absolute() else [folder / given, Path.cwd() / given]
    return next((p for p in options if p.exists()), options[0])


def find_sharegpt4o(items: list[Path], exclude: Path | None, image_root: Path | None = None, **_) -> Inputs:
    """ShareGPT-4o-Image: `text_to_image.json` and `text_and_image_to_image.json` (image paths relative to the
    json's folder) with their images extracted or still in the `*_part_<k>.tar` archives beside them."""
    jsons, archive_paths = [], []
    for item in items:
        archives = _archive_files(item)
        if archives:
            archive_paths += archives
        elif item.is_dir():
            files = list(walk(item, exclude))
            jsons += [f for f in files if f.suffix.lower() in JSON_SUFFIXES]
            archive_paths += [f for f in files if is_archive(f)]
            if not any(f.suffix.lower() in JSON_SUFFIXES for f in files):
                raise DataError(f"{item}: no ShareGPT-4o-Image json (text_to_image.json, "
                                f"text_and_image_to_image.json) below it; found {_describe(item, files)}.")
        elif item.is_file():
            jsons.append(item)
            archive_paths += [f for f in sorted(item.parent.iterdir()) if f.is_file() and is_archive(f)]
        else:
            raise DataError(f"input not found: {item}")
    files = [MetadataFile(str(p), _open(p), sharegpt4o_fields, Resolver([image_root or p.parent], prefer=p.stem),
                          "sharegpt4o") for p in dict.fromkeys(map(absolute, jsons))]
    return Inputs(files, archive_sets(archive_paths), [], files=[Path(f.name) for f in files] + archive_paths)


def find_user_jsonl(items: list[Path], exclude: Path | None, image_root: Path | None = None,
                    dataset: str | None = None, source_required: bool = False, **keys) -> Inputs:
    """Your own records (--source-key ... name the fields); images relative to --image-root or the file."""
    fields = user_fields(**{k: v for k, v in keys.items() if k.endswith("_key") and v},
                         source_required=source_required)
    paths, archive_paths = [], []
    for item in items:
        archives = _archive_files(item)
        if archives:
            archive_paths += archives
        elif item.is_dir():
            paths += [f for f in walk(item, exclude) if f.suffix.lower() in JSON_SUFFIXES]
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"input not found: {item}")
    files = [MetadataFile(str(p), _open(p), fields, Resolver([image_root or p.parent]), dataset or p.stem)
             for p in dict.fromkeys(map(absolute, paths))]
    if not files:
        raise DataError(f"no .json/.jsonl files in {', '.join(map(str, items))}.")
    return Inputs(files, archive_sets(archive_paths), [], files=paths + archive_paths)


FINDERS = {"gpt-image-edit": find_gpt_image_edit, "llava-edit": find_llava_edit, "sharegpt4o": find_sharegpt4o,
           "jsonl": find_user_jsonl}


def find_inputs(fmt: str, items: list[Path], exclude: Path | None = None, **options) -> Inputs:
    if fmt not in FINDERS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(sorted(FINDERS))}.")
    return FINDERS[fmt](items, exclude, **options)


# --------------------------------------------------------------------------- records
def read_records(files: list[MetadataFile], registry: KeyRegistry) -> Iterator[Record | BadRecord]:
    """Every record of `files` in order, with its images resolved and its key assigned; rejects as BadRecord."""
    for meta_file in files:
        for number, raw, problem in iter_records(meta_file.name, meta_file.open):
            if problem:
                yield BadRecord(meta_file.name, number, *problem)
                continue
            try:
                record, record_id = _record(meta_file, number, raw)
            except Bad as bad:
                yield BadRecord(meta_file.name, number, bad.reason, bad.detail, images=bad.images)
                continue
            record.key, problem = registry.assign(record_id, meta_file.dataset, meta_file.name, number,
                                                  (record.images, record.instruction))
            yield BadRecord(meta_file.name, number, *problem, record.key, record.images) if problem else record


def _record(meta_file: MetadataFile, number: int, raw: dict) -> tuple[Record, str | None]:
    fields = meta_file.fields(raw)
    members: dict[str, int] = {}

    def ref(name: str, role: str) -> str:
        found, member = meta_file.resolve(name, role)
        if member is not None:
            members[found] = member
        return found

    target = ref(fields.target, "target")
    sources = [ref(name, "source" if i == 0 else f"reference {i}") for i, name in enumerate(fields.sources)]
    meta = dict(fields.meta)
    meta.setdefault("dataset", meta_file.dataset)
    if fields.id is not None:
        meta["id"] = fields.id
    record = Record(meta_file.name, number, target, clean_instruction(fields.instruction),
                    sources[0] if sources else None, sources[1:], meta, members=members)
    return record, fields.id


def read_checksums(path: Path) -> dict[str, str]:
    """`sha256sum` output (`HASH  relative/path`, optionally `*path`) -> {resolved path: hash}."""
    table = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            table[str((path.parent / parts[1].lstrip("*")).resolve())] = parts[0].lower()
    return table
