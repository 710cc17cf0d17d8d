"""Aspect-ratio buckets: every sample is resized and cropped to one of a few (width, height) shapes.

For base 1024 the set is FLUX.1-Kontext's preferred resolutions plus 1536x1024
and 1024x1536 (GPT-IMAGE-EDIT-1.5M's native sizes). Other bases scale that set
and round to multiples of 16 (8x VAE x 2x2 packing). All samples of a batch
come from one bucket, so nothing is padded.
"""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import Image

# diffusers' PREFERRED_KONTEXT_RESOLUTIONS as (width, height), ~1024^2 pixels each.
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)
GPT_IMAGE_EDIT_RESOLUTIONS = ((1024, 1024), (1536, 1024), (1024, 1536))
MULTIPLE = 16


def _round(x: float, multiple: int = MULTIPLE) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


@lru_cache(maxsize=None)
def bucket_set(base: int = 1024) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets for a base resolution, sorted by aspect ratio then area."""
    if base % MULTIPLE:
        raise ValueError(f"bucket base must be a multiple of {MULTIPLE}, got {base}")
    scale = base / 1024
    shapes = {(_round(w * scale), _round(h * scale)) for w, h in KONTEXT_RESOLUTIONS + GPT_IMAGE_EDIT_RESOLUTIONS}
    return tuple(sorted(shapes, key=lambda s: (s[0] / s[1], s[0] * s[1])))


def nearest_bucket(width: int, height: int, base: int = 1024) -> tuple[int, int]:
    """The bucket closest in aspect ratio (log scale); among equally close ones the largest that does
    not upscale the image, or the smallest if all would."""
    buckets = bucket_set(base)
    log_ar = math.log(width / height)
    best = min(abs(log_ar - math.log(w / h)) for w, h in buckets)
    candidates = [b for b in buckets if abs(abs(log_ar - math.log(b[0] / b[1])) - best) < 1e-9]
    fitting = [b for b in candidates if b[0] * b[1] <= width * height]
    return max(fitting, key=lambda b: b[0] * b[1]) if fitting else min(candidates, key=lambda b: b[0] * b[1])


def resize_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket (keeping aspect), then centre-crop to exactly `bucket`."""
    w, h = bucket
    if image.size == bucket:
        return image
    scale = max(w / image.width, h / image.height)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                           Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def scaled_bucket(bucket: tuple[int, int], pixels: int) -> tuple[int, int]:
    """The bucket's aspect at about `pixels` pixels (e.g. a smaller Kontext source), multiples of 16."""
    w, h = bucket
    scale = math.sqrt(pixels / (w * h))
    return _round(w * scale), _round(h * scale)
