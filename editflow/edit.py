"""`editflow edit`: edit images from the command line (one request, or a jsonl of them).

Every request is checked before the model loads (the type and range of every
option, files exist and decode, sizes, mask, output paths that can be written and
overwrite no input, instruction length) and once more against the loaded model
before anything is sampled: a bad input fails fast with a message that names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from editflow.data.buckets import nearest_bucket
from editflow.data.images import to_gray, to_rgb
from editflow.errors import EditflowError

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class RequestError(EditflowError, ValueError):
    """A request that cannot be run; the message says which input and why."""


# VAE downsampling (8) x FLUX's 2x2 packing: sizes are multiples of 16 (re-checked against the loaded model)
SIZE_MULTIPLE = 16
# Beyond this output size (pixels) FLUX.1-Kontext is far outside what it was trained on and the step's
# memory grows with the square of the token count: refused unless --allow-large.
MAX_OUTPUT_PIXELS = 2048 * 2048
# A source this many times larger than the output is noted: it is scaled down to the output size.
NOTE_DOWNSCALE = 4


@dataclasses.dataclass
class EditRequest:
    images: list[str]
    instruction: str
    out: str
    num_images: int = 1
    size: str = "auto"
    steps: int = 28
    guidance: float | None = None
    text_guidance: float = 1.0
    image_guidance: float = 1.0
    seed: int = 0
    mask: str | None = None
    quality: int = 95


def open_image(path: str, what: str) -> Image.Image:
    """The image at `path`, decoded fully (a truncated file fails here, not halfway through sampling)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes are judged by the caller
            image = Image.open(path)
            image.load()
    except FileNotFoundError:  # a batch file's relative paths too: they are read from where edit runs
        where = "" if os.path.isabs(path) else f" (relative paths are read from the current directory, {os.getcwd()})"
        raise RequestError(f"{what} not found: {path}{where}") from None
    except IsADirectoryError:
        raise RequestError(f"{what} {path} is a directory, not an image") from None
    except UnidentifiedImageError:
        raise RequestError(f"{what} {path}: unsupported or unreadable image format") from None
    except Image.DecompressionBombError as err:
        raise RequestError(f"{what} {path}: {err}; scale it down first") from None
    except OSError as err:
        raise RequestError(f"{what} {path}: cannot read ({err})") from None
    return image


def editable_mask(mask: Image.Image) -> np.ndarray:
    """True where editing is allowed: transparent pixels (alpha 0), or white ones when there is no alpha."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        return np.asarray(mask.convert("RGBA"))[..., 3] == 0
    return np.asarray(to_gray(mask)) >= 128


def parse_size(size: str, source: Image.Image, base: int, multiple: int) -> tuple[int, int]:
    if size == "auto":
        return nearest_bucket(source.width, source.height, base)
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise RequestError(f"--size must be 'auto' or WIDTHxHEIGHT, got {size!r}") from None
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise RequestError(f"--size {width}x{height}: width and height must be positive multiples of {multiple}")
    return width, height


@dataclasses.dataclass
class PreparedRequest:
    request: EditRequest
    source: Image.Image
    references: list[Image.Image]
    size: tuple[int, int]
    editable: np.ndarray | None  # at the source's size
    outputs: list[Path]


def output_paths(out: str, n: int) -> list[Path]:
    """OUT itself for one image; `<stem>-1<ext>` ... `<stem>-N<ext>` for several."""
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]


def check_writable(path: Path) -> None:
    """`path` can be written: not a directory, and a file can be made in its folder (or in the nearest folder
    that exists, under which the missing ones will be made)."""
    if path.is_dir():
        raise RequestError(f"output {path} is a directory; give a file name")
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not folder.is_dir():
        raise RequestError(f"output {path}: {folder} is not a writable directory")
    try:  # tried, not judged by permission bits: root, read-only mounts and /proc make os.access say yes
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".editflow-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RequestError(f"output {path}: {folder} is not a writable directory ({err.strerror or err})") from None


@dataclasses.dataclass
class ModelLimits:
    """What a request is checked against before the model loads (from its config and tokenizer alone)."""
    bucket_base: int
    max_length: int  # Qwen tokens (image + instruction)
    tokenizer: object | None = None  # counts instruction tokens; None when it cannot be loaded cheaply
    allow_large: bool = False

    @classmethod
    def from_config(cls, config, allow_large: bool = False) -> "ModelLimits":
        qwen = config.model.qwen
        try:  # a local directory or the hub cache: fast; anything else is checked once the model has loaded
            from transformers import AutoTokenizer

            from editflow.models.build import relocate_asset

            tokenizer = AutoTokenizer.from_pretrained(relocate_asset(str(qwen.pretrained)), local_files_only=True)
        except Exception:  # noqa: BLE001 - only an early check is lost
            tokenizer = None
        return cls(config.data.bucket_base, qwen.max_length, tokenizer, allow_large)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # json's true is not a count


def is_finite(v) -> bool:
    return is_int(v) or isinstance(v, float) and math.isfinite(v)  # a nan/inf guidance samples a black image


def _is_path(v) -> bool:
    return isinstance(v, str) and bool(v)


# field -> (accepts a value, what it must be): the flags and every batch line are checked alike, up front
FIELD_RULES = {
    "images": (lambda v: isinstance(v, list) and bool(v) and all(map(_is_path, v)),
               "one image file path or a list of them (the first is the source)"),
    "instruction": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "out": (_is_path, "an output file path"),
    "num_images": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "size": (lambda v: isinstance(v, str), "a string: 'auto' or WIDTHxHEIGHT"),
    "steps": (lambda v: is_int(v) and v >= 1, "a positive integer"),
    "guidance": (lambda v: v is None or is_finite(v), "a finite number (or unset: the model's default)"),
    "text_guidance": (is_finite, "a finite number"),
    "image_guidance": (is_finite, "a finite number"),
    "seed": (lambda v: is_int(v) and -2**63 <= v < 2**64, "an integer from -2**63 to 2**64-1"),  # torch's range
    "mask": (lambda v: v is None or _is_path(v), "an image file path (or unset)"),
    "quality": (lambda v: is_int(v) and 1 <= v <= 100, "an integer between 1 and 100"),
}


def _flag(field: str) -> str:
    return "--image" if field == "images" else "--" + field.replace("_", "-")


def check_fields(r: EditRequest, name=_flag) -> None:
    """Every field of `r` has its type and range; `name` says how the user wrote a field (a flag by default)."""
    for field, (accepts, expected) in FIELD_RULES.items():
        value = getattr(r, field)
        if not accepts(value):
            raise RequestError(f"{name(field)} must be {expected}, got {value!r}")


def _check_options(r: EditRequest) -> None:
    check_fields(r)
    if Path(r.out).suffix.lower() not in OUTPUT_FORMATS:
        raise RequestError(f"output {r.out}: unsupported format; use one of {sorted(OUTPUT_FORMATS)}")


def prepare(request: EditRequest, limits: ModelLimits) -> PreparedRequest:
    """Check everything about a request that can be checked before the model loads."""
    _check_options(request)
    images = [open_image(p, "source image" if i == 0 else f"reference image {i}")
              for i, p in enumerate(request.images)]
    source = to_rgb(images[0])
    size = parse_size(request.size, source, limits.bucket_base, SIZE_MULTIPLE)
    if size[0] * size[1] > MAX_OUTPUT_PIXELS and not limits.allow_large:
        raise RequestError(f"--size {size[0]}x{size[1]} is over {MAX_OUTPUT_PIXELS / 1e6:.1f} MP, far beyond what "
                           "the model was trained on (memory grows with the square of the pixels); pass "
                           "--allow-large to run it anyway")
    if limits.tokenizer is not None:
        tokens = len(limits.tokenizer(request.instruction, add_special_tokens=False)["input_ids"])
        if tokens > limits.max_length:
            raise RequestError(f"the instruction is {tokens} tokens, over the text encoder's limit of "
                               f"{limits.max_length}")
    editable = None
    if request.mask:
        mask = open_image(request.mask, "mask")
        if mask.size != source.size:
            raise RequestError(f"mask {request.mask} is {mask.width}x{mask.height} but the image is "
                               f"{source.width}x{source.height}: they must be the same size")
        editable = editable_mask(mask)
    outputs = output_paths(request.out, request.num_images)
    for path in outputs:
        check_writable(path)
    return PreparedRequest(request, source, [to_rgb(im) for im in images[1:]], size, editable, outputs)


def scale_note(prepared: PreparedRequest) -> str | None:
    """What happens to a source much larger than the output, said before it happens."""
    (width, height), source = prepared.size, prepared.source
    if source.width * source.height < NOTE_DOWNSCALE * width * height:
        return None
    how = "--size" if prepared.request.size != "auto" else "--size auto: the bucket nearest its aspect"
    back = (f"; outside the mask the result keeps the source's pixels at {source.width}x{source.height}"
            if prepared.editable is not None else "")
    return (f"note: {prepared.request.images[0]} is {source.width}x{source.height}; it is edited at "
            f"{width}x{height} ({how}){back}. Pass --size WxH (multiples of {SIZE_MULTIPLE}) for another size")


def check_against_model(prepared: PreparedRequest, pipe) -> None:
    """What only the loaded model knows, still before sampling: its size multiple and the conditioning
    length of this image with this instruction at its pixel budget."""
    r, (width, height), multiple = prepared.request, prepared.size, pipe.size_multiple
    if width % multiple or height % multiple:
        raise RequestError(f"--size {width}x{height}: this model needs multiples of {multiple}")
    limit = pipe.conditioner.max_length
    tokens = pipe.conditioner.sequence_length(r.instruction, prepared.size)  # Qwen sees the source at this size
    if tokens > limit:
        raise RequestError(f"the instruction with the source image is {tokens} tokens, over the text encoder's "
                           f"limit of {limit} (model.qwen.max_length); shorten the instruction")


def save_image(image: Image.Image, path: Path, quality: int) -> None:
    """Written under a temporary name and renamed: an interrupted save never leaves a broken file at `path`."""
    fmt = OUTPUT_FORMATS[path.suffix.lower()]
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, path)
    except OSError as err:  # checked up front, but a disk can fill or a folder go away while sampling
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RequestError(f"output {path}: cannot write it ({err.strerror or err})") from None


def run(prepared: PreparedRequest, pipe, default_guidance: float):
    """Samples the request and yields each output path once it is saved (so a later failure loses none)."""
    r = prepared.request
    width, height = prepared.size
    mask_image = None
    if prepared.editable is not None:
        mask_image = Image.fromarray(prepared.editable.astype(np.uint8) * 255, "L").resize((width, height),
                                                                                         Image.NEAREST)
    images = pipe(
        prepared.source, r.instruction, num_inference_steps=r.steps,
        guidance_scale=default_guidance if r.guidance is None else r.guidance, height=height, width=width,
        generator=torch.Generator().manual_seed(r.seed), num_images_per_prompt=r.num_images,
        references=prepared.references, mask=mask_image, text_guidance_scale=r.text_guidance,
        image_guidance_scale=r.image_guidance,
    )
    for image, path in zip(images, prepared.outputs):
        if prepared.editable is not None:  # back to the source's size; outside the mask, the source exactly
            image = image.resize(prepared.source.size, Image.BICUBIC)
            keep = ~prepared.editable[..., None]
            image = Image.fromarray(np.where(keep, np.asarray(prepared.source), np.asarray(image)), "RGB")
        save_image(image, path, r.quality)
        yield path


def read_batch(path: str, defaults: EditRequest) -> list[EditRequest]:
    """Requests from a jsonl: {"image" or "images", "instruction", "out", optional per-request options}."""
    requests = []
    fields = {f.name for f in dataclasses.fields(EditRequest)}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise RequestError(f"batch file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RequestError(f"batch file {path}: cannot read ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key = "images" if item.get("images") else "image"
            images = item.pop("images", None) or item.pop("image")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            raise RequestError(f"{path}:{number}: expected a json object with image/images, instruction, out "
                               f"({err})") from None
        unknown = set(item) - fields
        if unknown:
            raise RequestError(f"{path}:{number}: unknown fields {sorted(unknown)}; known: image, "
                               f"{', '.join(sorted(fields))}")
        item["images"] = [images] if isinstance(images, str) else images
        request = dataclasses.replace(defaults, **item)

        def name(field, given=set(item), key=key):  # as the line writes it; one it leaves to a flag, by the flag
            if field not in given:
                return f'{_flag(field)} (no "{field}" in the line)'
            return f'"{key if field == "images" else field}"'

        try:
            check_fields(request, name)
        except RequestError as err:
            raise RequestError(f"{path}:{number}: {err}") from None
        requests.append(request)
    if not requests:
        raise RequestError(f"batch file {path} holds no requests")
    return requests


def inputs_of(request: EditRequest) -> list[tuple[str, str]]:
    """(what, path) of every file the request reads."""
    named = [("source image", request.images[0]), ("mask", request.mask)]
    return [*named, *((f"reference image {i}", p) for i, p in enumerate(request.images[1:], start=1))]


def prepare_all(requests: list[EditRequest], limits: ModelLimits, batch: bool) -> list[PreparedRequest]:
    """Every request checked, no two writing the same file, and none writing over a file any of them reads."""
    prepared, owners, inputs = [], {}, {}
    for i, request in enumerate(requests, start=1):
        try:
            prepared.append(prepare(request, limits))
        except RequestError as err:
            raise RequestError(f"request {i}: {err}" if batch else str(err)) from None
        for what, path in inputs_of(request):  # resolved: a relative path or a symlink is the same file
            if path:
                inputs.setdefault(Path(path).resolve(), (f"{what} of request {i}" if batch else what, path))
    for i, item in enumerate(prepared, start=1):
        try:
            for path in item.outputs:
                if path.resolve() in inputs:  # the input would be lost, and with rc 0
                    what, given = inputs[path.resolve()]
                    raise RequestError(f"output {path} is the {what} ({given}): it would be overwritten; "
                                       "write the edit to another file")
                if path.resolve() in owners:
                    raise RequestError(f"output {path} is also written by request {owners[path.resolve()]}")
                owners[path.resolve()] = i
        except RequestError as err:
            raise RequestError(f"request {i}: {err}" if batch else str(err)) from None
    return prepared
