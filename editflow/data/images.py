"""One way to turn any image file into 8-bit RGB, shared by convert, the training loader, edit and eval.

PIL's own `convert("RGB")` clips 16-bit samples (a 16-bit PNG reads as nearly white), drops alpha onto
black and leaves float images black; every reader goes through `to_rgb` instead, so a file looks the same
wherever it is read.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


# What non-image bytes under an image name usually are, by how they start.
_LOOKALIKES = (
    (b"version https://git-lfs", "a Git LFS pointer, not the image: fetch the LFS objects (`git lfs pull`, or "
                                 "download the dataset with `hf download`)"),
    (b"<!doctype html", "an HTML page (a failed or redirected download?)"),
    (b"<html", "an HTML page (a failed or redirected download?)"),
    (b"{", "JSON text"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "gzip-compressed data"),
)


def not_an_image(data: bytes) -> str:
    """Why PIL cannot identify `data`: what it looks like instead, and its first bytes (PIL's own message
    names only an in-memory buffer, `<_io.BytesIO object at 0x...>`)."""
    head = data[:32]
    for prefix, what in _LOOKALIKES:
        if head.lstrip().lower().startswith(prefix.lower()):
            return f"not an image file: {what}"
    return f"not an image file PIL can read ({len(data)} bytes, starting {head[:16]!r})"


def _gray_to_rgb(array: np.ndarray, peak: float) -> Image.Image:
    return Image.fromarray(np.clip(array / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency composited on white, 16-bit and 32-bit integer samples scaled
    (not clipped), float samples read as [0, 1], palette and CMYK through PIL's conversions."""
    if image.mode in SIXTEEN_BIT or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(array, 65535.0 if image.mode in SIXTEEN_BIT or array.max() > 255 else 255.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(array, 1.0 if array.max() <= 1.0 else 255.0)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ALPHA:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit "L" (masks), with the same scaling as `to_rgb`."""
    return image if image.mode == "L" else to_rgb(image).convert("L")
