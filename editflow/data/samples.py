"""Decode one shard sample: `{key}.src.<ext>`, `{key}.tgt.<ext>`, `{key}.json` (+ optional `{key}.mask.png`)."""

from __future__ import annotations

import dataclasses
import io
import json

from PIL import Image, UnidentifiedImageError

from editflow.data.images import not_an_image, to_gray, to_rgb

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class SampleError(ValueError):
    """A sample that cannot be used; the message names shard, key and field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class EditSample:
    key: str
    source: Image.Image | None  # None for a text-to-image sample
    target: Image.Image
    instruction: str
    meta: dict
    mask: Image.Image | None = None  # ground-truth changed region, when the data has one (toy)


def _where(raw: dict) -> str:
    return f"shard {raw.get('__url__', '?')}, key {raw.get('__key__', '?')}"


def _image(raw: dict, role: str, required: bool = True, draft: tuple[int, int] | None = None) -> Image.Image | None:
    for ext in IMAGE_EXTS:
        data = raw.get(f"{role}.{ext}")
        if data is not None:
            try:
                image = Image.open(io.BytesIO(data))
                if draft:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale while both sides still cover `draft`
                    image.draft(image.mode, draft)
                image.load()
            except UnidentifiedImageError as err:
                why = not_an_image(data)
                raise SampleError("undecodable_image", f"{_where(raw)}, field {role}.{ext}: {why}") from err
            except Exception as err:
                raise SampleError("undecodable_image", f"{_where(raw)}, field {role}.{ext}: cannot decode ({err})") from err
            return to_rgb(image) if role != "mask" else to_gray(image)
    if required:
        raise SampleError("missing_field", f"{_where(raw)}: no {role}.{{{','.join(IMAGE_EXTS)}}} field")
    return None


def reject_duplicate(raw: dict) -> None:
    """Two records written under one key arrive as one sample with repeated fields (see `iter_tar`)."""
    if "__duplicate__" in raw:
        raise SampleError("duplicate_key", f"{_where(raw)}: two records share this key (field "
                                           f"{raw['__duplicate__']} repeats); convert the data again")


def decode_sample(raw: dict, draft: dict[str, tuple[int, int]] | None = None) -> EditSample:
    """A raw webdataset dict (bytes per extension) -> EditSample, or SampleError saying what is wrong.

    `draft` maps a role ("src", "tgt") to the (width, height) its image is resized to next: a JPEG at least
    twice that size is decoded straight at a reduced scale (libjpeg's DCT scaling), which is several times
    faster than decoding it whole and gives the resize less to do."""
    reject_duplicate(raw)
    draft = draft or {}
    if "json" not in raw:
        raise SampleError("missing_field", f"{_where(raw)}: no json field")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError("bad_json", f"{_where(raw)}, field json: {err}") from err
    instruction = meta.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise SampleError("empty_instruction", f"{_where(raw)}, field json.instruction: missing or empty")
    text_to_image = bool(meta.get("text_to_image"))
    return EditSample(
        key=raw["__key__"],
        source=_image(raw, "src", required=not text_to_image, draft=draft.get("src")),
        target=_image(raw, "tgt", draft=draft.get("tgt")),
        instruction=instruction.strip(),
        meta=meta,
        mask=_image(raw, "mask", required=False),
    )
