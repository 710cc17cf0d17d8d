"""Frozen-encoder outputs for a batch: VAE latents of source and target, Qwen states and mask.

They come from three places, all giving the same tensors: the frozen models
run on the batch's images; a per-key memo in CPU memory (exact: the VAE
posterior mode and Qwen are deterministic, and padding is masked all the way
through, so re-padding a cached sample into another batch changes nothing);
or shards written once by `editflow encode` (pre-encoded data), which lets a
run keep Qwen and the VAE off the accelerator.
"""

from __future__ import annotations

import torch

from editflow.data.loader import unit_range
from editflow.models.conditioner import QwenVLConditioner
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


def condition_dropout(batch: dict, p_text: float, p_image: float, p_both: float) -> dict:
    """Classifier-free guidance training: per sample, Qwen sees the source image without the instruction
    (p_text), the instruction without the image (p_image), or neither (p_both) — the inputs of the
    two-scale sampler's unconditional branches. The outcome is recorded in `batch["drop"]`."""
    drops = draw_drops(len(batch["key"]), p_text, p_image, p_both)
    if not any(drops):
        return batch
    out = {**batch, "drop": drops, "key": [k if d is None else f"{k}#drop-{d}" for k, d in zip(batch["key"], drops)]}
    if "source_images" in batch:  # raw images (pre-encoded batches pick stored states instead)
        inputs = [drop_inputs(t, im, d) for t, im, d in zip(batch["instruction"], batch["source_images"], drops)]
        out["instruction"] = [t for t, _ in inputs]
        out["source_images"] = [im for _, im in inputs]
    return out


class FrozenEncoder:
    def __init__(self, codec: LatentCodec, conditioner: QwenVLConditioner, cache: bool = False):
        self.codec = codec
        self.conditioner = conditioner
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = {} if cache else None

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

    def _encode(self, batch: dict, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        pick = torch.tensor(indices)
        target = self.latents(batch["target"][pick])
        source = self.latents(None if batch["source"] is None else batch["source"][pick])
        states = self.states([batch["source_images"][i] for i in indices], [batch["instruction"][i] for i in indices])
        return [(target[j], None if source is None else source[j], states[j]) for j in range(len(indices))]

    @staticmethod
    def _stored(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows of a pre-encoded batch, with the states of each sample's dropout outcome."""
        drops = batch.get("drop") or [None] * len(batch["encoded"])
        rows = []
        for sample, drop in zip(batch["encoded"], drops):
            field = states_field(drop)
            if field not in sample.tensors:
                raise KeyError(f"shard {sample.url}, key {sample.key}: no {field} tensor; the shards were encoded "
                               f"without the condition dropout this run trains with (re-run `editflow encode` with "
                               f"the run's objective.drop_* settings)")
            rows.append((sample.tensors["target"], sample.tensors.get("source"), sample.tensors[field]))
        return rows

    def __call__(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, bool]:
        """(target latents, source latents or None for text-to-image, Qwen states, mask) in fp32 on `device`,
        and whether any row is padded (known here on the CPU, so the step need not ask the GPU)."""
        keys = batch["key"]
        if "encoded" in batch:
            rows = self._stored(batch)
        elif self.cache is None:
            rows = self._encode(batch, list(range(len(keys))))
        else:
            missing = [i for i, k in enumerate(keys) if k not in self.cache]
            if missing:
                for i, row in zip(missing, self._encode(batch, missing)):
                    self.cache[keys[i]] = tuple(None if t is None else t.cpu() for t in row)
            rows = [self.cache[k] for k in keys]
        to = lambda t: t.to(device, non_blocking=True).float()
        states, mask = pad_states([r[2] for r in rows])
        target = to(torch.stack([r[0] for r in rows]))
        source = None if rows[0][1] is None else to(torch.stack([r[1] for r in rows]))
        padded = len({r[2].shape[0] for r in rows}) > 1
        return target, source, to(states), mask.to(device), padded
