"""Instructions longer than the text encoder's budget, counted while converting so users see them before
training (online training skips such samples; `editflow encode` does too).

Qwen reads the chat template, the source image and the instruction, and conditioning longer than
`model.qwen.max_length` tokens is refused. The budget left for an instruction is therefore
`max_length` minus what the template and an image at `model.qwen.max_pixels` take (the released images
are all larger than that, so they are resized to it); text-to-image records carry no image and get more.
`--max-instruction-tokens N` sets one budget for both instead.
"""

from __future__ import annotations

import dataclasses
import os

from editflow.data.errors import DataError

# Aspect ratios the image budget is checked at: the largest count wins (smart_resize rounds per side).
_ASPECTS = ((1, 1), (3, 2), (2, 3), (4, 3), (3, 4), (16, 9), (9, 16))
_TOKENIZERS: dict = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # conversion forks workers after loading it
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


@dataclasses.dataclass
class TokenBudget:
    tokenizer: str  # local path or hub id
    with_image: int  # most instruction tokens for a record with a source image
    text_only: int  # ... for a text-to-image record
    origin: str  # how the budget was set, for the report

    def count(self, instruction: str) -> int:
        return len(_tokenizer(self.tokenizer)(instruction, add_special_tokens=False)["input_ids"])

    def limit(self, has_image: bool) -> int:
        return self.with_image if has_image else self.text_only


def _template_tokens(tokenizer, with_image: bool) -> int:
    """Tokens of the conditioning with an empty instruction, minus the fixed template prefix that the
    conditioner drops (as `QwenVLConditioner` builds it: an image part, then the text)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": ""}]
    full = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    empty = tokenizer.apply_chat_template([{"role": "user", "content": []}], tokenize=False)
    prefix = empty[: empty.rindex(tokenizer.eos_token or "<|im_end|>")]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return count(full) - count(prefix)


def budget_from_model(overrides: list[str], explicit: int | None = None) -> TokenBudget:
    """The budget of the model config these Hydra overrides compose (default `model=kontext_qwen25vl_7b`).

    Raises DataError, saying what to do, when the tokenizer or image processor cannot be loaded."""
    from editflow.config import compose
    from editflow.models.build import relocate_asset

    if not any(o.lstrip("+~").split("=")[0] in ("model", "experiment") for o in overrides):
        overrides = ["model=kontext_qwen25vl_7b", *overrides]
    qwen = compose(overrides).model.qwen
    path = relocate_asset(str(qwen.pretrained))
    try:
        tokenizer = _tokenizer(path)
        if explicit is not None:
            return TokenBudget(path, explicit, explicit, f"--max-instruction-tokens {explicit}")
        from transformers import Qwen2VLImageProcessor

        sizes = {k: qwen[k] for k in ("min_pixels", "max_pixels") if qwen[k]}
        processor = Qwen2VLImageProcessor.from_pretrained(path, **sizes)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot count instruction tokens: the tokenizer of model.qwen.pretrained={path!r} does not "
                        f"load ({type(err).__name__}: {str(err).splitlines()[0]}). Point it at a local copy (add "
                        "`model.qwen.pretrained=/path/to/Qwen2.5-VL-7B-Instruct` to the command), download it, or "
                        "pass --max-instruction-tokens 0 to skip the count.") from None
    image = max(processor.get_number_of_image_patches(8192 * h // max(w, h), 8192 * w // max(w, h), {})
                for w, h in _ASPECTS) // processor.merge_size ** 2
    with_image = qwen.max_length - _template_tokens(tokenizer, True) + 1 - image  # +1: the one <|image_pad|>
    text_only = qwen.max_length - _template_tokens(tokenizer, False)
    return TokenBudget(path, with_image, text_only,
                       f"model.qwen.max_length={qwen.max_length} minus the template and an image at "
                       f"max_pixels={processor.size['longest_edge']} ({image} tokens)")
