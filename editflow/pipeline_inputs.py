"""`EditPipeline.__call__`'s arguments, checked before anything is encoded: a wrong type or size is a
RequestError (a ValueError) that names the argument, as `editflow edit` names its flags, not an
AttributeError from deep inside PIL or a ZeroDivisionError in the sampler."""

from __future__ import annotations

from PIL import Image

from editflow.edit import RequestError, is_finite, is_int


def _kind(value) -> str:
    return type(value).__name__


def images_of(value, name: str, allow_empty: bool = False) -> list[Image.Image]:
    """`value` (one PIL image or a list/tuple of them) as a list; each must have pixels."""
    if isinstance(value, Image.Image):
        value = [value]
    if not isinstance(value, (list, tuple)) or not (value or allow_empty):
        got = "an empty list" if isinstance(value, (list, tuple)) else _kind(value)
        raise RequestError(f"{name} must be a PIL image or a non-empty list of them, got {got} "
                           "(a file: PIL.Image.open(path); an array: PIL.Image.fromarray(array))")
    for i, image in enumerate(value):
        if not isinstance(image, Image.Image):
            raise RequestError(f"{name}[{i}] must be a PIL image, got {_kind(image)} (a file: PIL.Image.open(path); "
                               "an array: PIL.Image.fromarray(array))")
        if image.width < 1 or image.height < 1:
            raise RequestError(f"{name}[{i}] is {image.width}x{image.height}: an image without pixels")
    return list(value)


def instructions_of(value, count: int) -> list[str]:
    """`value` (a string or a list of them) as one non-empty instruction per image (one is repeated)."""
    texts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if texts is None:
        raise RequestError(f"instruction must be a string or a list of strings, got {_kind(value)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"instruction[{i}] must be a string, got {_kind(text)} {text!r}")
        if not text.strip():  # encode() takes "" for guidance's unconditional branch; an edit needs words
            raise RequestError(f"instruction{f'[{i}]' if len(texts) > 1 else ''} is empty: say what to change")
    if len(texts) == 1 and count > 1:
        texts = texts * count
    if len(texts) != count:
        raise RequestError(f"got {count} images for {len(texts)} instructions")
    return texts


def positive_int(value, name: str) -> None:
    if not (is_int(value) and value >= 1):
        raise RequestError(f"{name} must be a positive integer, got {value!r}")


def finite(value, name: str) -> None:
    """A guidance scale: as `editflow edit` checks it (a nan or inf one samples a black image)."""
    if not is_finite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")


def output_size(source: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """(height, width): the given ones, or the source's rounded down to the model's multiple."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not is_int(value) or value < multiple or value % multiple):
            raise RequestError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    height = height or source.height // multiple * multiple
    width = width or source.width // multiple * multiple
    if not height or not width:
        raise RequestError(f"the image is {source.width}x{source.height}, smaller than this model's size multiple "
                           f"{multiple}: give height and width")
    return height, width


def check_mask(mask, source: tuple[int, int], output: tuple[int, int]) -> None:
    """A PIL image at the source's or the output's (width, height): another shape would be stretched over it."""
    if mask is None:
        return
    if not isinstance(mask, Image.Image):
        raise RequestError(f"mask must be a PIL image (white where editing is allowed), got {_kind(mask)}")
    if mask.size not in (source, output):
        raise RequestError(f"mask is {mask.width}x{mask.height}; it must be the image's size ({source[0]}x{source[1]}) "
                           f"or the output's ({output[0]}x{output[1]})")
