"""Inference: edit images with a trained editor (Euler sampler with FLUX's resolution shift)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from editflow.data.images import to_gray, to_rgb
from editflow.data.pixels import image_tensor
from editflow.flow import resolution_mu
from editflow import checkpoint as ckpt
from editflow import pipeline_inputs as inputs
from editflow.config import saved_config
from editflow.config_schema import TransformerConfig, VaeConfig
from editflow.model_paths import EXPORT_FILE, LORA_FILE, read_export, resolve_checkpoint
from editflow.models.build import Models, build_models
from editflow.models.conditioner import QwenVLConditioner
from editflow.models.editor import KontextEditor
from editflow.models.vae import LatentCodec


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to the nearest uint8)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


def sample_guidance(config) -> float:
    """The distilled-guidance value a model samples with unless told otherwise: `objective.sample_guidance` of
    the config it was trained with (one default for editflow edit/eval, EditPipeline and exports)."""
    return float(config.objective.sample_guidance)


class EditPipeline:
    """`pipe(image, instruction, ...)` -> edited images, like diffusers' FluxKontextPipeline."""

    def __init__(
        self,
        editor: KontextEditor,
        conditioner: QwenVLConditioner,
        codec: LatentCodec,
        scheduler: FlowMatchEulerDiscreteScheduler,
        guidance: float,
    ):
        self.editor = editor
        self.conditioner = conditioner
        self.codec = codec
        self.scheduler = scheduler
        self.guidance = guidance  # Kontext's distilled guidance when a call gives none (see sample_guidance)

    @classmethod
    def from_models(cls, models: Models, guidance: float) -> "EditPipeline":
        return cls(models.editor, models.conditioner, models.codec, models.scheduler, guidance)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "EditPipeline":
        """Load an export (`editflow export`), a run directory (its newest checkpoint) or a checkpoint."""
        path = Path(path)
        if (path / EXPORT_FILE).exists():
            export = read_export(path)
            config = saved_config(export["config"], str(path / EXPORT_FILE))
            # The export's own transformer and VAE replace whatever the training config pointed at; a LoRA
            # export without transformer/ sits on the base model its config names (e.g. the hub's Kontext).
            if (path / "transformer").is_dir():
                config.model.transformer = TransformerConfig(pretrained=str(path), subfolder="transformer")
            config.model.vae = VaeConfig(pretrained=str(path), subfolder="vae")
            models = build_models(config.model, seed=config.trainer.seed, lora_adapter=False)
            if export.get("kind") == "lora":
                models.editor.transformer.load_lora_adapter(str(path), weight_name=LORA_FILE, prefix="transformer",
                                                            adapter_name="default")
            models.editor.connector.load_state_dict(load_file(path / "connector" / "model.safetensors"))
        else:
            checkpoint = resolve_checkpoint(path)
            config = ckpt.load_config(checkpoint)
            # the training seed: a LoRA checkpoint holds only adapters, its base is rebuilt the same way
            models = build_models(config.model, seed=config.trainer.seed)
            ckpt.load_model_weights(models.editor, checkpoint, ckpt.inference_weights(checkpoint))
        pipe = cls.from_models(models.to(device), sample_guidance(config))
        pipe.editor.eval()
        pipe.config = config
        return pipe

    def to_diffusers(self):
        """diffusers' FluxKontextPipeline on the same transformer, VAE and scheduler config.

        Give it `encode()`'s prompt_embeds and pooled_prompt_embeds (its own text encoders are empty)."""
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config), vae=self.codec.vae,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            transformer=self.editor.transformer,
        )

    @property
    def device(self) -> torch.device:
        return next(self.editor.parameters()).device

    @property
    def size_multiple(self) -> int:
        return self.codec.downsample * 2  # VAE downsampling x 2x2 packing

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image | None], instructions: Sequence[str]):
        """(prompt_embeds, pooled_prompt_embeds, mask) for FLUX, from the source images and instructions; mask:
        the text tokens FLUX attends to (prompt_embeds of one sample, or of samples sharing their text bucket,
        are exactly what diffusers' FluxKontextPipeline needs as prompt_embeds).

        An image may be None and an instruction empty: the unconditional inputs of classifier-free guidance.
        """
        prompt_embeds, pooled, mask = self._encode(images, instructions)
        return prompt_embeds, pooled, mask.to(self.device)

    def _encode(self, images, instructions):
        states, mask = self.conditioner.encode(images, instructions)  # mask on the CPU
        return self.editor.condition(states.to(self.device), mask)  # FLUX's text mask stays on the CPU

    def _conditioning(self, images, instructions, text_scale: float, image_scale: float):
        """Conditioning for every guidance branch, concatenated along the batch: [full, image-only, none]; and
        whether any text token is hidden (read on the CPU, so the sampler's steps never wait for the GPU)."""
        blank = [""] * len(instructions)
        branches = [self._encode(images, instructions)]
        if text_scale != 1.0 or image_scale != 1.0:
            branches.append(self._encode(images, blank))  # the source image, no instruction
        if image_scale != 1.0:
            branches.append(self._encode([None] * len(images), blank))  # neither
        longest = max(b[0].shape[1] for b in branches)
        embeds, pooled, masks = [], [], []
        for pe, po, m in branches:  # pad to a common length; the mask hides the padding from attention
            pad = longest - pe.shape[1]
            embeds.append(torch.nn.functional.pad(pe, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(m, (0, pad), value=False))
            pooled.append(po)
        mask = torch.cat(masks)
        return torch.cat(embeds), torch.cat(pooled), mask.to(self.device), len(branches), not bool(mask.all())

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        instruction: str | Sequence[str],
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        references: Sequence[Image.Image] = (),
        mask: Image.Image | None = None,
        text_guidance_scale: float = 1.0,
        image_guidance_scale: float = 1.0,
    ):
        """Edit `image` (one or a batch) following `instruction`.

        guidance_scale: Kontext's distilled-guidance value (default: the model's `objective.sample_guidance`,
        `self.guidance`). text/image_guidance_scale: two-scale
        classifier-free guidance (1.0 disables it) over the instruction and the image Qwen sees.
        references: extra reference images (position ids 2, 3, ...). mask: "L" image at the output
        size, white where editing is allowed; outside it the sample is pinned to the source.
        """
        guidance_scale = self.guidance if guidance_scale is None else guidance_scale
        images = inputs.images_of(image, "image")
        instructions = inputs.instructions_of(instruction, len(images))
        references = inputs.images_of(references, "references", allow_empty=True)
        inputs.positive_int(num_inference_steps, "num_inference_steps")
        inputs.positive_int(num_images_per_prompt, "num_images_per_prompt")
        for name, scale in (("guidance_scale", guidance_scale), ("text_guidance_scale", text_guidance_scale),
                            ("image_guidance_scale", image_guidance_scale)):
            inputs.finite(scale, name)
        height, width = inputs.output_size(images[0], height, width, self.size_multiple)
        inputs.check_mask(mask, images[0].size, (width, height))

        def fit(im: Image.Image) -> Image.Image:  # any mode, read the way convert and the loader read it
            im = to_rgb(im)
            return im if im.size == (width, height) else im.resize((width, height), Image.BICUBIC)

        sources = [fit(im) for im in images for _ in range(num_images_per_prompt)]
        instructions = [t for t in instructions for _ in range(num_images_per_prompt)]
        prompt_embeds, pooled, text_mask, branches, padded = self._conditioning(
            sources, instructions, text_guidance_scale, image_guidance_scale)
        # .to(device): the codec may live elsewhere (host memory, when training on pre-encoded data)
        source_latents = self.codec.encode(torch.stack([image_tensor(s) for s in sources])).to(self.device)
        reference_latents = [self.codec.encode(image_tensor(fit(r))[None]).to(self.device).expand_as(source_latents)
                             for r in references]
        shape = (len(sources), self.codec.latent_channels, height // self.codec.downsample,
                 width // self.codec.downsample)
        # Noise drawn on the CPU generator like diffusers' randn_tensor, so pipelines agree seed for seed.
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        keep = None
        if mask is not None:
            editable = image_tensor(to_gray(mask).resize((width, height), Image.NEAREST))[:1] > 0
            # A latent cell is editable when any of its pixels is (max-pool), so edits reach the mask's edge.
            keep = 1.0 - torch.nn.functional.max_pool2d(editable[None].float(), self.codec.downsample).to(self.device)
        latents = self.sample(
            noise, [source_latents, *reference_latents], prompt_embeds, pooled, text_mask, num_inference_steps,
            guidance_scale, branches, text_guidance_scale, image_guidance_scale, keep, padded,
        )
        if output_type == "latent":
            return latents
        decoded = self.codec.decode(latents)
        if output_type == "pt":
            return decoded
        if output_type == "np":
            return ((decoded.float().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).cpu().numpy()
        return tensor_to_pil(decoded)

    def sample(self, noise, sources, prompt_embeds, pooled, text_mask, steps: int, guidance_scale: float,
               branches: int = 1, text_scale: float = 1.0, image_scale: float = 1.0, keep=None,
               padded: bool | None = None):
        """Euler integration from noise (sigma=1) towards data with the shifted FLUX schedule.

        padded: whether text_mask hides any token (None: read from it once, a host sync).
        With `keep` (1 where the source must stay), those latents are replaced after every step by the
        source noised to the current sigma, so the edit blends into an unchanged surrounding.
        """
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        target_tokens = noise.shape[2] * noise.shape[3] // 4
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=resolution_mu(target_tokens),
                                device=self.device)
        scheduler.set_begin_index(0)
        batch = noise.shape[0]
        if padded is None:
            padded = not bool(text_mask.all())
        guidance = torch.full((batch * branches,), guidance_scale, device=self.device)
        repeat = lambda x: x.repeat(branches, 1, 1, 1)
        latents = noise
        for i, t in enumerate(scheduler.timesteps):
            sigma = (t / 1000).expand(batch * branches)
            v = self.editor.denoise(repeat(latents), [repeat(s) for s in sources], prompt_embeds, pooled,
                                    text_mask, sigma, guidance, padded).float()
            if branches == 2:  # text guidance only
                full, image_only = v.chunk(2)
                v = image_only + text_scale * (full - image_only)
            elif branches == 3:  # InstructPix2Pix-style two-scale guidance
                full, image_only, none = v.chunk(3)
                v = none + image_scale * (image_only - none) + text_scale * (full - image_only)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if keep is not None:
                next_sigma = float(scheduler.sigmas[i + 1])
                pinned = (1 - next_sigma) * sources[0] + next_sigma * noise
                latents = keep * pinned + (1 - keep) * latents
        return latents
