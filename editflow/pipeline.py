"""Inference: edit images with a trained editor (Euler sampler with FLUX's resolution shift)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from editflow.data.loader import image_tensor
from editflow.flow import resolution_mu
from editflow.models.build import Models
from editflow.models.conditioner import QwenVLConditioner
from editflow.models.editor import KontextEditor
from editflow.models.vae import LatentCodec


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to the nearest uint8)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


class EditPipeline:
    """`pipe(image, instruction, ...)` -> edited images, like diffusers' FluxKontextPipeline."""

    def __init__(
        self,
        editor: KontextEditor,
        conditioner: QwenVLConditioner,
        codec: LatentCodec,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        self.editor = editor
        self.conditioner = conditioner
        self.codec = codec
        self.scheduler = scheduler

    @classmethod
    def from_models(cls, models: Models) -> "EditPipeline":
        return cls(models.editor, models.conditioner, models.codec, models.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.editor.parameters()).device

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample * 2  # VAE downsampling x 2x2 packing

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], instructions: Sequence[str]):
        """(prompt_embeds, pooled_prompt_embeds, mask) for FLUX, from the source images and instructions."""
        states, mask = self.conditioner(images, instructions)
        prompt_embeds, pooled = self.editor.condition(states.to(self.device), mask.to(self.device))
        return prompt_embeds, pooled, mask.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        instruction: str | Sequence[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ):
        images = [image] if isinstance(image, Image.Image) else list(image)
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if len(instructions) == 1 and len(images) > 1:
            instructions = instructions * len(images)
        m = self.size_multiple
        height = height or images[0].height // m * m
        width = width or images[0].width // m * m
        if height % m or width % m:
            raise ValueError(f"height and width must be multiples of {m}, got {width}x{height}")
        sources = [im.convert("RGB").resize((width, height), Image.BICUBIC) if im.size != (width, height) else im
                   for im in images]
        prompt_embeds, pooled, mask = self.encode(sources, instructions)
        source_latents = self.codec.encode(torch.stack([image_tensor(s) for s in sources]).to(self.device))
        shape = (len(sources), self.codec.latent_channels, height // self.codec.downsample, width // self.codec.downsample)
        # Noise drawn on the CPU generator like diffusers' randn_tensor, so pipelines agree seed for seed.
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        latents = self.sample(latents, source_latents, prompt_embeds, pooled, mask, num_inference_steps, guidance_scale)
        if output_type == "latent":
            return latents
        decoded = self.codec.decode(latents)
        if output_type == "pt":
            return decoded
        if output_type == "np":
            return ((decoded.float().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).cpu().numpy()
        return tensor_to_pil(decoded)

    def sample(self, latents, source_latents, prompt_embeds, pooled, mask, steps: int, guidance_scale: float):
        """Euler integration from noise (sigma=1) towards data with the shifted FLUX schedule."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        target_tokens = latents.shape[2] * latents.shape[3] // 4
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=resolution_mu(target_tokens),
                                device=self.device)
        scheduler.set_begin_index(0)
        batch = latents.shape[0]
        guidance = torch.full((batch,), guidance_scale, device=self.device)
        for t in scheduler.timesteps:
            sigma = (t / 1000).expand(batch)
            v = self.editor.denoise(latents, source_latents, prompt_embeds, pooled, mask, sigma, guidance)
            latents = scheduler.step(v.float(), t, latents, return_dict=False)[0]
        return latents
