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

from editflow.models.connector import Connector
from editflow.models.packing import image_ids, pack, text_ids, unpack


def attention_mask(text_mask: torch.Tensor, image_tokens: int, padded: bool | None = None) -> torch.Tensor | None:
    """Boolean (B, 1, 1, L + N) key mask for FLUX's joint attention, or None when nothing is padded.

    Padded text tokens are hidden from every query, so a sample's output does
    not depend on how long the other instructions in its batch are. `padded`, when the caller knows it
    (the trainer does, from the CPU-side lengths), saves reading the mask back from the GPU every step.
    """
    if padded is None:
        padded = not bool(text_mask.all())
    if not padded:
        return None  # no padding: keep the unmasked (fastest) attention kernels
    image = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]


class KontextEditor(nn.Module):
    def __init__(self, transformer: FluxTransformer2DModel, connector: Connector,
                 attention_backend: tuple[str, str] = ("native", "native")):
        super().__init__()
        self.transformer = transformer
        self.connector = connector
        # diffusers attention kernels for (unpadded, padded) batches; see build.attention_backends
        self.attention_backend = attention_backend
        self._active_backend = "native" if attention_backend == ("native", "native") else None

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def condition(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen states -> (prompt_embeds, pooled_prompt_embeds) in FLUX's input space."""
        return self.connector(states.to(self.connector.mlp[0].weight.dtype), mask)

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
        """Training entry point (what DDP/DeepSpeed wrap): Qwen states -> connector -> transformer."""
        prompt_embeds, pooled = self.condition(states, mask)
        return self.denoise(noisy, sources, prompt_embeds, pooled, mask, sigma, guidance, padded)

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
        mask = attention_mask(text_mask, hidden.shape[1], padded)
        self._use_attention_backend(self.attention_backend[mask is not None])
        out = self._transformer(hidden, prompt_embeds, pooled, sigma, guidance, ids, noisy.device, mask)
        return unpack(out[:, :target_len], h, w)

    def _use_attention_backend(self, name: str) -> None:
        # Set on the attention modules, not in a context: it must persist until the backward pass, where
        # gradient checkpointing recomputes the blocks with the same kernel.
        if name != self._active_backend:
            self.transformer.set_attention_backend(name)
            self._active_backend = name

    def _transformer(self, hidden, prompt_embeds, pooled, sigma, guidance, ids, device, mask) -> torch.Tensor:
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigma.to(dtype),
            guidance=guidance.to(dtype) if self.guidance_embeds else None,
            img_ids=torch.cat(ids, dim=0),
            txt_ids=text_ids(prompt_embeds.shape[1], device),
            joint_attention_kwargs={"attention_mask": mask} if mask is not None else None,
            return_dict=False,
        )[0]
