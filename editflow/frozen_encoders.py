"""Frozen-encoder outputs for a batch: VAE latents of source and target, Qwen states and mask.

They come from three places, all giving the same tensors: the frozen models
run on the batch's images; a per-key memo in CPU memory (exact: the VAE
posterior mode and Qwen are deterministic, and padding is masked all the way
through, so re-padding a cached sample into another batch changes nothing);
or shards written once by `editflow encode` (pre-encoded data), which lets a
run keep Qwen and the VAE off the accelerator.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import NamedTuple

import torch

from editflow.data.batches import Batch, EncodedBatch, ImageBatch
from editflow.data.buckets import scaled_bucket
from editflow.data.pixels import unit_range
from editflow.data.skips import SkipCounter
from editflow.errors import DataError
from editflow.models.conditioner import QwenVLConditioner
from editflow.models.editor import text_bucket
from editflow.models.vae import LatentCodec

# What Qwen sees for each condition-dropout outcome: (keep the instruction, keep the source image).
DROPS = {None: (True, True), "text": (False, True), "image": (True, False), "both": (False, False)}


def states_field(drop: str | None) -> str:
    """Name of a pre-encoded sample's tensor holding the Qwen states of a dropout outcome."""
    return "states" if drop is None else f"states_drop_{drop}"


def pad_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) rows to (B, L_max, D) with zeros and return the (B, L_max) validity mask."""
    longest = max(r.shape[0] for r in rows)
    states = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        states[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return states, mask


def text_padded(lengths: list[int], multiple: int) -> bool:
    """Whether a batch of conditionings of these lengths needs an attention mask (see editor.visible_text)."""
    return len({text_bucket(n, multiple) for n in lengths}) > 1


class TextBucketKey:
    """The data stream's grouping key: the text bucket (editor.visible_text) of a sample's conditioning, from
    its json alone, so that batches of one key need no attention mask. A pre-encoded sample records its
    length (`text_tokens`); otherwise `length(instruction, source size or None)` counts it
    (QwenVLConditioner.sequence_length: the tokenizer only). Condition dropout, drawn later, changes lengths
    and is not foreseen; a sample the key cannot read gets 0 (it is decoded, and rejected, later)."""

    def __init__(self, multiple: int, length: Callable[[str, tuple[int, int] | None], int] | None = None,
                 source_pixels: int | None = None):
        self.multiple, self.length, self.source_pixels = multiple, length, source_pixels

    def __call__(self, raw: dict, bucket: tuple[int, int, bool]) -> int:
        try:
            meta = json.loads(raw["json"])
            length = meta.get("text_tokens")
            if length is None and self.length is not None:
                width, height, text_to_image = bucket
                size = scaled_bucket((width, height), self.source_pixels) if self.source_pixels else (width, height)
                length = self.length(meta["instruction"].strip(), None if text_to_image else size)
            return text_bucket(int(length), self.multiple) if length else 0
        except (KeyError, ValueError, TypeError, AttributeError):  # bad metadata: decoded (and rejected) later
            return 0


def draw_drops(n: int, p_text: float, p_image: float, p_both: float) -> list[str | None]:
    """Per sample, which condition is dropped (None, "text", "image" or "both"); torch's global RNG."""
    if not (p_text or p_image or p_both):
        return [None] * n
    return ["text" if u < p_text else "image" if u < p_text + p_image else "both" if u < p_text + p_image + p_both
            else None for u in torch.rand(n).tolist()]


def drop_inputs(instruction: str, image, drop: str | None) -> tuple[str, object]:
    """The (instruction, image) Qwen reads when `drop` is dropped."""
    keep_text, keep_image = DROPS[drop]
    return (instruction if keep_text else ""), (image if keep_image else None)


def condition_dropout(batch: Batch, p_text: float, p_image: float, p_both: float) -> Batch:
    """Classifier-free guidance training: per sample, Qwen sees the source image without the instruction
    (p_text), the instruction without the image (p_image), or neither (p_both) — the inputs of the
    two-scale sampler's unconditional branches. Returns a new batch (`batch` itself when nothing is dropped) in
    which a dropped sample's key names what was dropped; an image batch holds what Qwen then reads, a
    pre-encoded one each sample's outcome (`drops`), which picks its stored states."""
    drops = draw_drops(len(batch), p_text, p_image, p_both)
    if not any(drops):
        return batch
    keys = [k if d is None else f"{k}#drop-{d}" for k, d in zip(batch.keys, drops)]
    if isinstance(batch, EncodedBatch):
        return dataclasses.replace(batch, keys=keys, drops=drops)
    inputs = [drop_inputs(t, im, d) for t, im, d in zip(batch.instructions, batch.source_images, drops)]
    return dataclasses.replace(batch, keys=keys, instructions=[t for t, _ in inputs],
                               source_images=[im for _, im in inputs])


class Encoded(NamedTuple):
    """A batch as the model takes it, in fp32 on the training device."""

    target: torch.Tensor  # target latents (B, C, h, w)
    source: torch.Tensor | None  # source latents, None for text-to-image
    states: torch.Tensor  # Qwen states, padded (B, L, D)
    mask: torch.Tensor  # (B, L) True for real tokens
    padded: bool  # whether the batch needs an attention mask (known on the CPU: the step need not ask the GPU)
    kept: list[int]  # the batch's samples these rows are (the encoders skip those they refuse)


class FrozenEncoder:
    """With `skips`, a sample the encoders refuse (conditioning over model.qwen.max_length at the configured
    pixel budget, an image Qwen's processor cannot take, ...: a ValueError) is skipped and counted as
    `unencodable`, as `editflow encode` does; without, the error is raised."""

    def __init__(self, codec: LatentCodec, conditioner: QwenVLConditioner, cache: bool = False,
                 text_pad_multiple: int = 1, skips: SkipCounter | None = None):
        self.codec = codec
        self.conditioner = conditioner
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.text_pad_multiple = text_pad_multiple  # model.text_pad_multiple: which batches need a mask
        self.skips = skips

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor | None) -> torch.Tensor | None:
        """Normalised VAE latents in the VAE's dtype of a uint8 (B, 3, H, W) batch, scaled to [-1, 1] on the
        VAE's device (None stays None: text-to-image has no source)."""
        if pixels is None:
            return None
        return self.codec.encode(unit_range(pixels.to(self.codec.device)))

    @torch.no_grad()
    def states(self, images: list, instructions: list[str]) -> list[torch.Tensor]:
        """Qwen states per sample, unpadded (L_i, D), in Qwen's dtype."""
        states, mask = self.conditioner.encode(images, instructions)  # mask on the CPU: slicing needs no sync
        return [states[j, : int(length)] for j, length in enumerate(mask.sum(1))]

    def _encode(self, batch: ImageBatch, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pick = torch.tensor(indices)
        target = self.latents(batch.target[pick])
        source = self.latents(None if batch.source is None else batch.source[pick])
        states = self.states([batch.source_images[i] for i in indices], [batch.instructions[i] for i in indices])
        return [(target[j], None if source is None else source[j], states[j]) for j in range(len(indices))]

    def _encode_or_skip(self, batch: ImageBatch, indices: list[int]) -> dict[int, tuple]:
        """Rows of the samples at `indices` that encode; a refused batch is retried sample by sample to find
        (and count) the ones at fault."""
        try:
            rows = dict(zip(indices, self._encode(batch, indices)))
        except ValueError as err:
            if self.skips is None:
                raise
            if len(indices) > 1:
                return {i: row for j in indices for i, row in self._encode_or_skip(batch, [j]).items()}
            self.skips.skip("unencodable", f"sample {batch.keys[indices[0]]}: {err}")
            return {}
        if self.skips is not None:
            self.skips.seen += len(indices)
        return rows

    @staticmethod
    def _stored(batch: EncodedBatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows of a pre-encoded batch, with the states of each sample's dropout outcome."""
        drops = batch.drops or [None] * len(batch)
        rows = []
        for sample, drop in zip(batch.samples, drops):
            field = states_field(drop)
            if field not in sample.tensors:
                raise KeyError(f"shard {sample.url}, key {sample.key}: no {field} tensor; the shards were encoded "
                               f"without the condition dropout this run trains with (re-run `editflow encode` with "
                               f"the run's objective.drop_* settings)")
            rows.append((sample.tensors["target"], sample.tensors.get("source"), sample.tensors[field]))
        return rows

    def __call__(self, batch: Batch, device) -> Encoded | None:
        """The model inputs of a batch (`Encoded`); skipped samples leave it (`kept` says which stayed), None
        when none is left."""
        keys = batch.keys
        if isinstance(batch, EncodedBatch):
            kept, rows = list(range(len(keys))), self._stored(batch)
        elif self.cache is None:
            encoded = self._encode_or_skip(batch, list(range(len(keys))))
            kept, rows = list(encoded), list(encoded.values())
        else:
            missing = [i for i, k in enumerate(keys) if k not in self.cache]
            encoded = self._encode_or_skip(batch, missing) if missing else {}
            for i, row in encoded.items():
                self.cache[keys[i]] = tuple(None if t is None else t.cpu() for t in row)
            kept = [i for i, k in enumerate(keys) if k in self.cache]
            rows = [self.cache[keys[i]] for i in kept]
        if not rows:
            return None
        to = lambda t: t.to(device, non_blocking=True).float()
        states, mask = pad_states([r[2] for r in rows])
        target = to(torch.stack([r[0] for r in rows]))
        source = None if rows[0][1] is None else to(torch.stack([r[1] for r in rows]))
        padded = text_padded([r[2].shape[0] for r in rows], self.text_pad_multiple)
        return Encoded(target, source, to(states), mask.to(device), padded, kept)


def calibration_states(sets: list, conditioner: QwenVLConditioner | None, count: int = 16
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen states (padded, with their mask) of the first `count` usable training samples, for calibrating a
    fresh connector's output scale: stored states of pre-encoded sets, or the conditioner run on the images.
    Samples and shards that training would skip are skipped here too."""
    from editflow.data.preencoded import decode_encoded
    from editflow.data.samples import SampleError, decode_sample
    from editflow.data.shards import SHARD_ERRORS, iter_tar

    def states_of(raw: dict) -> torch.Tensor:
        if sets[0].encoding is not None:
            return decode_encoded(raw).tensors["states"]
        sample = decode_sample(raw)
        states, mask = conditioner.encode([sample.source], [sample.instruction])
        return states[0, : int(mask.sum())]

    urls, rows = [u for s in sets for u in s.urls[:2]], []
    for url in urls:
        if len(rows) == count:
            break
        try:
            for raw in iter_tar(url):
                if len(rows) == count:
                    break
                try:
                    rows.append(states_of(raw).float())
                except (SampleError, ValueError):  # undecodable, or refused by the encoder (over max_length)
                    continue
        except SHARD_ERRORS:
            continue
    if not rows:
        raise DataError(f"no training sample could be encoded to calibrate the connector (read {urls[:3]}...)")
    return pad_states(rows)
