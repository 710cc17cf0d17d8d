"""The trainable editor: connector + FLUX.1-Kontext transformer, in latent space.

`KontextEditor.forward` takes unpacked latents and does the Kontext layout:
noisy target tokens first, source (context) tokens after them with position
ids whose first coordinate is 1, text tokens in front; the prediction is
sliced back to the target tokens and unpacked.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from editflow.models import attention
from editflow.models.attention import AttentionPlan
from editflow.models.connector import Connector
from editflow.models.packing import image_ids, pack, text_ids, unpack


def text_bucket(length, multiple: int):
    """The number of text tokens FLUX sees for a conditioning of `length` tokens (an int or a tensor of them):
    `length` rounded up to `multiple`."""
    return -(-length // multiple) * multiple


def visible_text(mask: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, T') bool: the text tokens FLUX attends to, for a right-padded (B, T) mask of real tokens.

    Each sample's conditioning is padded with visible tokens to `text_bucket(length, multiple)` (like FLUX's
    own T5 padding, which is not masked): that depends on the sample alone, so its output does not depend on
    the batch, and a batch whose samples share the bucket needs no attention mask. Padding beyond a sample's
    bucket (up to the longest in the batch) is hidden. T' = T rounded up to `multiple`.
    """
    if multiple <= 1:
        return mask.bool()
    counts = mask.sum(1, keepdim=True)
    width = text_bucket(mask.shape[1], multiple)
    return torch.arange(width, device=mask.device) < text_bucket(counts, multiple)


class KontextEditor(nn.Module):
    def __init__(self, transformer: FluxTransformer2DModel, connector: Connector,
                 attention_backend: AttentionPlan | None = None, text_pad_multiple: int = 1):
        super().__init__()
        self.transformer = transformer
        self.connector = connector
        # the attention kernels of padded and unpadded batches (models/attention.py)
        self.attention_backend = attention_backend or attention.attention_plan("native")
        attention.install(transformer, self.attention_backend)
        self.text_pad_multiple = text_pad_multiple  # see visible_text

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def condition(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Qwen states (B, T, D) and their right-padded mask -> (prompt_embeds, pooled_prompt_embeds, text_mask)
        in FLUX's input space; text_mask (B, T') marks the text tokens FLUX attends to (see `visible_text`)
        and stays on the device of `mask`, so a caller holding it on the CPU reads it without a sync."""
        weight = self.connector.mlp[0].weight
        prompt_embeds, pooled = self.connector(states.to(weight.dtype), mask.to(weight.device))
        text_mask = visible_text(mask, self.text_pad_multiple)
        prompt_embeds = nn.functional.pad(prompt_embeds, (0, 0, 0, text_mask.shape[1] - prompt_embeds.shape[1]))
        return prompt_embeds, pooled, text_mask

    def forward(
        self,
        noisy: torch.Tensor,
        sources: list[torch.Tensor] | torch.Tensor | None,
        states: torch.Tensor,
        mask: torch.Tensor,
        sigma: torch.Tensor,
        guidance: torch.Tensor | None = None,
        padded: bool | None = None,
    ) -> torch.Tensor:
        """Training entry point (what DDP/DeepSpeed wrap): Qwen states -> connector -> transformer.

        padded: whether some sample's visible text is shorter than the batch's (known on the CPU from the
        lengths, see frozen_encoders.FrozenEncoder); None reads it from `mask` (a host sync)."""
        prompt_embeds, pooled, text_mask = self.condition(states, mask)
        return self.denoise(noisy, sources, prompt_embeds, pooled, text_mask, sigma, guidance, padded)

    def denoise(
        self,
        noisy: torch.Tensor,
        sources: list[torch.Tensor] | torch.Tensor | None,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        text_mask: torch.Tensor,
        sigma: torch.Tensor,
        guidance: torch.Tensor | None = None,
        padded: bool | None = None,
    ) -> torch.Tensor:
        """Velocity for the noisy target latents (B, C, h, w), given FLUX-space conditioning.

        sources: the source latents (B, C, h', w') or a list of them (source
        first, extra references after, position index 1, 2, ...).
        text_mask: (B, T) True where FLUX attends to a text token; padded: whether any is False (None: read
        from text_mask, a host sync).
        sigma: (B,) in [0, 1]; guidance: (B,) raw distilled-guidance values.
        """
        if sources is None:  # text-to-image: target tokens only
            sources = []
        elif isinstance(sources, torch.Tensor):
            sources = [sources]
        b, _, h, w = noisy.shape
        dtype = self.transformer.dtype
        tokens = [pack(noisy)] + [pack(s) for s in sources]
        ids = [image_ids(h, w, 0, noisy.device)] + [
            image_ids(s.shape[2], s.shape[3], i + 1, noisy.device) for i, s in enumerate(sources)
        ]
        hidden = torch.cat(tokens, dim=1).to(dtype)
        target_len = tokens[0].shape[1]
        if self.guidance_embeds and guidance is None:
            raise ValueError("this transformer has guidance_embeds=True: pass a guidance value")
        if padded is None:
            padded = not bool(text_mask.all())
        layout = self.attention_backend.layout(text_mask, hidden.shape[1], padded)
        if layout is not None:
            prompt_embeds = layout.arrange_text(prompt_embeds)
        out = self._transformer(hidden, prompt_embeds, pooled, sigma, guidance, ids, noisy.device, layout)
        return unpack(out[:, :target_len], h, w)

    def _transformer(self, hidden, prompt_embeds, pooled, sigma, guidance, ids, device, layout) -> torch.Tensor:
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma.to(dtype),
            guidance=guidance.to(dtype) if self.guidance_embeds else None,
            img_ids=torch.cat(ids, dim=0),
            txt_ids=text_ids(prompt_embeds.shape[1], device),
            joint_attention_kwargs={"attention_mask": layout} if layout is not None else None,
            return_dict=False,
        )[0]
