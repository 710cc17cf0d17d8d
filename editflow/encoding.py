"""Frozen-encoder outputs for a batch: VAE latents of source and target, Qwen states and mask.

`FrozenEncoder` can memoise them per sample key in CPU memory. That is exact,
not an approximation: the VAE (posterior mode) and Qwen are frozen and
deterministic, and padding is masked all the way through, so re-padding a
cached sample into another batch gives the same result. It makes every epoch
after the first cost only the trainable transformer (the toy default's case).
"""

from __future__ import annotations

import torch

from editflow.models.conditioner import QwenVLConditioner
from editflow.models.vae import LatentCodec


def pad_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) rows to (B, L_max, D) with zeros and return the (B, L_max) validity mask."""
    longest = max(r.shape[0] for r in rows)
    states = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        states[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = True
    return states, mask


def condition_dropout(batch: dict, p_text: float, p_image: float, p_both: float) -> dict:
    """Classifier-free guidance training: per sample, Qwen sees the source image without the instruction
    (p_text), the instruction without the image (p_image), or neither (p_both) — the inputs of the
    two-scale sampler's unconditional branches. Draws from torch's global RNG (restored on resume)."""
    if not (p_text or p_image or p_both):
        return batch
    keys, instructions, images = list(batch["key"]), list(batch["instruction"]), list(batch["source_images"])
    for i, u in enumerate(torch.rand(len(keys)).tolist()):
        drop = "text" if u < p_text else "image" if u < p_text + p_image else \
            "both" if u < p_text + p_image + p_both else None
        if drop is None:
            continue
        keys[i] = f"{keys[i]}#drop-{drop}"  # a separate entry in the encoding cache
        if drop in ("text", "both"):
            instructions[i] = ""
        if drop in ("image", "both"):
            images[i] = None
    return {**batch, "key": keys, "instruction": instructions, "source_images": images}


class FrozenEncoder:
    def __init__(self, codec: LatentCodec, conditioner: QwenVLConditioner, cache: bool = False):
        self.codec = codec
        self.conditioner = conditioner
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @torch.no_grad()
    def _encode(self, batch: dict, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        device = self.codec.device
        pick = torch.tensor(indices)
        target = self.codec.encode(batch["target"][pick].to(device)).float()
        source = None if batch["source"] is None else self.codec.encode(batch["source"][pick].to(device)).float()
        states, mask = self.conditioner([batch["source_images"][i] for i in indices],
                                        [batch["instruction"][i] for i in indices])
        return [(target[j], None if source is None else source[j], states[j, mask[j]].float())
                for j in range(len(indices))]

    def __call__(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, bool]:
        """(target latents, source latents or None for text-to-image, Qwen states, mask) on `device`, and
        whether any row is padded (known here on the CPU, so the step need not ask the GPU)."""
        keys = batch["key"]
        if self.cache is None:
            rows = self._encode(batch, list(range(len(keys))))
        else:
            missing = [i for i, k in enumerate(keys) if k not in self.cache]
            if missing:
                for i, row in zip(missing, self._encode(batch, missing)):
                    self.cache[keys[i]] = tuple(None if t is None else t.cpu() for t in row)
            rows = [self.cache[k] for k in keys]
        states, mask = pad_states([r[2] for r in rows])
        target = torch.stack([r[0] for r in rows])
        source = None if rows[0][1] is None else torch.stack([r[1] for r in rows]).to(device)
        padded = len({r[2].shape[0] for r in rows}) > 1
        return target.to(device), source, states.to(device), mask.to(device), padded
