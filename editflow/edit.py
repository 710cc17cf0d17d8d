"""`editflow edit`: edit images from the command line (one request, or a jsonl of them).

Every request is validated before anything is sampled: a bad file, size, mask
or instruction fails fast with a message that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from editflow.data.buckets import nearest_bucket

OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class RequestError(ValueError):
    """A request that cannot be run; the message says which input and why."""


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
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise RequestError(f"{what} not found: {path}") from None
    except UnidentifiedImageError:
        raise RequestError(f"{what} {path}: unsupported or unreadable image format") from None
    except OSError as err:
        raise RequestError(f"{what} {path}: cannot read ({err})") from None
    return image


def editable_mask(mask: Image.Image) -> np.ndarray:
    """True where editing is allowed: transparent pixels (alpha 0), or white ones when there is no alpha."""
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        return np.asarray(mask.convert("RGBA"))[..., 3] == 0
    return np.asarray(mask.convert("L")) >= 128


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


def prepare(request: EditRequest, pipe, bucket_base: int) -> PreparedRequest:
    """Check everything about a request that can be checked without sampling."""
    if not request.images:
        raise RequestError("give at least one --image (the source)")
    if Path(request.out).suffix.lower() not in OUTPUT_FORMATS:
        raise RequestError(f"output {request.out}: unsupported format; use one of {sorted(OUTPUT_FORMATS)}")
    if request.num_images < 1:
        raise RequestError("--num-images must be at least 1")
    if not request.instruction.strip():
        raise RequestError("the instruction is empty")
    images = [open_image(p, "source image" if i == 0 else f"reference image {i}")
              for i, p in enumerate(request.images)]
    source = images[0].convert("RGB")
    size = parse_size(request.size, source, bucket_base, pipe.size_multiple)
    limit = pipe.conditioner.max_length
    tokens = pipe.conditioner.token_count(request.instruction)
    if tokens > limit:
        raise RequestError(f"the instruction is {tokens} tokens, over the text encoder's limit of {limit}")
    editable = None
    if request.mask:
        mask = open_image(request.mask, "mask")
        if mask.size != source.size:
            raise RequestError(f"mask {request.mask} is {mask.width}x{mask.height} but the image is "
                               f"{source.width}x{source.height}: they must be the same size")
        editable = editable_mask(mask)
    return PreparedRequest(request, source, [im.convert("RGB") for im in images[1:]], size, editable,
                           output_paths(request.out, request.num_images))


def run(prepared: PreparedRequest, pipe, default_guidance: float) -> list[Path]:
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
    written = []
    for image, path in zip(images, prepared.outputs):
        if prepared.editable is not None:  # back to the source's size; outside the mask, the source exactly
            image = image.resize(prepared.source.size, Image.BICUBIC)
            keep = ~prepared.editable[..., None]
            image = Image.fromarray(np.where(keep, np.asarray(prepared.source), np.asarray(image)), "RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = OUTPUT_FORMATS[path.suffix.lower()]
        options = {"quality": r.quality} if fmt in ("JPEG", "WEBP") else {}
        image.save(path, format=fmt, **options)
        written.append(path)
    return written


def read_batch(path: str, defaults: EditRequest) -> list[EditRequest]:
    """Requests from a jsonl: {"image" or "images", "instruction", "out", optional per-request options}."""
    requests = []
    fields = {f.name for f in dataclasses.fields(EditRequest)}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise RequestError(f"batch file not found: {path}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            images = item.pop("images", None) or [item.pop("image")]
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise RequestError(f"{path}:{number}: expected a json object with image/images, instruction, out "
                               f"({err})") from None
        unknown = set(item) - fields
        if unknown:
            raise RequestError(f"{path}:{number}: unknown fields {sorted(unknown)}")
        requests.append(dataclasses.replace(defaults, images=[images] if isinstance(images, str) else images, **item))
    return requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run directory, a checkpoint, or an export")
    parser.add_argument("--image", action="append", default=[],
                        help="source image; repeat for extra reference images (the first is the source)")
    parser.add_argument("--instruction", default="")
    parser.add_argument("--out", default="", help="output file (.png .jpg .webp); N variants: <stem>-1<ext> ...")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--size", default="auto", help="auto (bucket nearest the source aspect) or WxH")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=None, help="Kontext distilled guidance (default: "
                        "the model's objective.sample_guidance)")
    parser.add_argument("--text-guidance", type=float, default=1.0, help="classifier-free guidance on the text")
    parser.add_argument("--image-guidance", type=float, default=1.0, help="classifier-free guidance on the image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask", help="PNG: transparent (or, without alpha, white) pixels may change")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    parser.add_argument("--batch", help="jsonl of requests; the flags above are their defaults")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    defaults = EditRequest(args.image, args.instruction, args.out, args.num_images, args.size, args.steps,
                           args.guidance, args.text_guidance, args.image_guidance, args.seed, args.mask, args.quality)
    from editflow.pipeline import EditPipeline

    try:
        requests = read_batch(args.batch, defaults) if args.batch else [defaults]
        if not args.batch and not args.out:
            raise RequestError("give --out (or --batch)")
        pipe = EditPipeline.from_pretrained(args.model, device=args.device)
        base = int(pipe.config.data.get("bucket_base", 1024))
        prepared = []
        for i, request in enumerate(requests):
            try:
                prepared.append(prepare(request, pipe, base))
            except RequestError as err:
                raise RequestError(f"request {i + 1}: {err}" if args.batch else str(err)) from None
    except (RequestError, FileNotFoundError) as err:
        print(f"editflow edit: error: {err}", file=sys.stderr)
        sys.exit(2)
    for item in tqdm(prepared, desc="edit", unit="request", disable=len(prepared) == 1):
        for path in run(item, pipe, pipe.guidance):
            print(path)


if __name__ == "__main__":
    main()
