"""Frozen Qwen2.5-VL that reads (source image, instruction) and returns hidden states + padding mask.

The chat template's fixed prefix (system prompt, `<|im_start|>user\\n`) is the
same for every sample and carries no information: it is dropped. What remains
is the image tokens, the instruction and the closing tokens, right-padded, with
a mask that marks the real ones; the mask travels all the way into FLUX's
attention so padding never changes a sample's result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor


class EditProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor (it needs torchvision, which editflow does not require)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(path: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None) -> EditProcessor:
    """Tokenizer and image processor saved separately (the default processor class needs torchvision)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    sizes = {k: v for k, v in {"min_pixels": min_pixels, "max_pixels": max_pixels}.items() if v}
    image_processor = Qwen2VLImageProcessor.from_pretrained(path, **sizes)
    return EditProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


class QwenVLConditioner(nn.Module):
    """Frozen Qwen2.5-VL. `forward(images, instructions) -> (states (B, L, D), mask (B, L) bool)`."""

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: EditProcessor,
        hidden_layer: int = -1,
        max_length: int = 512,
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.hidden_layer = hidden_layer
        self.max_length = max_length
        self.hidden_size = model.config.text_config.hidden_size
        self.prefix_ids = self._template_prefix_ids()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        hidden_layer: int = -1,
        max_length: int = 512,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        attn_implementation: str | None = None,
    ) -> "QwenVLConditioner":
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)
        return cls(model, load_processor(path, min_pixels, max_pixels), hidden_layer, max_length)

    def _messages(self, instruction: str, with_image: bool = True) -> list[dict]:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": instruction}]
        return [{"role": "user", "content": content}]

    def _template_prefix_ids(self) -> list[int]:
        """Token ids of the template before the user's content: the same for every sample."""
        empty = self.processor.apply_chat_template([{"role": "user", "content": []}], tokenize=False)
        prefix = empty[: empty.rindex(self.processor.tokenizer.eos_token or "<|im_end|>")]
        return self.processor.tokenizer(prefix, add_special_tokens=False)["input_ids"]

    def token_count(self, instruction: str) -> int:
        """Tokens an instruction adds (without the image), for validating input length before sampling."""
        return len(self.processor.tokenizer(instruction, add_special_tokens=False)["input_ids"])

    def conditioning_length(self, image: Image.Image | None, instruction: str) -> int:
        """Tokens Qwen reads for (image, instruction) once the template prefix is dropped, without running it:
        what `encode` holds against max_length (the image's share depends on its size and the pixel budget)."""
        text = self.processor.apply_chat_template(self._messages(instruction, image is not None), tokenize=False)
        inputs = self.processor(text=[text], images=None if image is None else [image], return_tensors="pt")
        return inputs["input_ids"].shape[1] - len(self.prefix_ids)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def forward(
        self, images: Sequence[Image.Image | None], instructions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images may be None (text-to-image, or the image dropped for guidance): Qwen then reads text only."""
        states, mask = self.encode(images, instructions)
        return states, mask.to(self.device)

    @torch.no_grad()
    def encode(
        self, images: Sequence[Image.Image | None], instructions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(states on the model's device, right-padding mask on the CPU): the lengths are known without
        reading anything back from the accelerator."""
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images for {len(instructions)} instructions")
        texts = [self.processor.apply_chat_template(self._messages(t, im is not None), tokenize=False)
                 for im, t in zip(images, instructions)]
        present = [im for im in images if im is not None]
        inputs = self.processor(text=texts, images=present or None, return_tensors="pt", padding=True,
                                padding_side="right")
        n = len(self.prefix_ids)
        if not torch.equal(inputs["input_ids"][:, :n], torch.tensor(self.prefix_ids).expand(len(texts), n)):
            raise RuntimeError("Qwen chat template prefix differs between samples; cannot drop it")
        mask = inputs["attention_mask"][:, n:].bool()
        if mask.shape[1] > self.max_length:
            raise ValueError(
                f"conditioning is {mask.shape[1]} tokens (image + instruction), over max_length={self.max_length}"
            )
        out = self.model(**inputs.to(self.device), output_hidden_states=True, use_cache=False)
        return out.hidden_states[self.hidden_layer][:, n:], mask
