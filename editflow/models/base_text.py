"""What FLUX.1-Kontext's own text encoders feed it, measured once from the base model's folders.

The connector replaces CLIP and T5 and starts where they were (models/connector.py): its pooled vector at
CLIP's pooled embedding of the empty prompt, its tokens at T5's RMS. Both are computed here with
diffusers' own FluxKontextPipeline prompt encoders (so the numbers are exactly what the pipeline feeds),
from `text_encoder`/`tokenizer` (CLIP) and `text_encoder_2`/`tokenizer_2` (T5) under the base's folder.
"""

from __future__ import annotations

import os

import torch

# Edit instructions of the kinds the connector will see, for T5's token statistics.
T5_PROBE_PROMPTS = (
    "make the car red",
    "remove the person on the left and fill in the background",
    "add a small wooden boat on the lake",
    "turn the photo into a watercolor painting",
    "replace the sky with a dramatic sunset and keep everything else unchanged",
    "change the text on the sign to 'OPEN'",
    "move the cat to the right side of the sofa",
    "make it look like winter, with snow on the roofs",
)


def _load(cls, path: str, subfolder: str, what: str, **kwargs):
    from editflow.models.build import relocate_asset

    path = relocate_asset(path)
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        where = "local directory" if os.path.isdir(path) else "hub id (offline machines need a local directory)"
        raise FileNotFoundError(
            f"model.connector.text_encoders: cannot load the base's {what} from {where} {path!r} subfolder "
            f"{subfolder!r}: {err}. Point it at a FLUX.1-Kontext folder with text_encoder/, tokenizer/ (and "
            "text_encoder_2/, tokenizer_2/ for token_std=from_base), or set model.connector.token_std to a number"
        ) from err


def _pipeline(**modules):
    from diffusers import FluxKontextPipeline

    parts = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 transformer=None)
    parts.update(modules)
    return FluxKontextPipeline(**parts)


@torch.no_grad()
def empty_prompt_pooled(path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(pooled_dim,) CLIP pooled embedding of "" as FluxKontextPipeline computes it, in float32."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = _load(AutoTokenizer, path, "tokenizer", "CLIP tokenizer")
    encoder = _load(CLIPTextModel, path, "text_encoder", "CLIP text encoder", dtype=dtype).eval()
    pooled = _pipeline(text_encoder=encoder, tokenizer=tokenizer)._get_clip_prompt_embeds([""], device="cpu")
    return pooled[0].float()


@torch.no_grad()
def t5_token_rms(path: str, dtype: torch.dtype = torch.float32, prompts=T5_PROBE_PROMPTS) -> float:
    """RMS of T5's output over the real (non-padding) tokens of edit-style prompts."""
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = _load(AutoTokenizer, path, "tokenizer_2", "T5 tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # T5-XXL: seconds on a GPU, minutes on a CPU
    encoder = _load(T5EncoderModel, path, "text_encoder_2", "T5 encoder", dtype=dtype).eval().to(device)
    embeds = _pipeline(text_encoder_2=encoder, tokenizer_2=tokenizer)._get_t5_prompt_embeds(
        list(prompts), device=device, dtype=encoder.dtype)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    real = torch.cat([embeds[i, :n] for i, n in enumerate(lengths)]).float()
    return float(real.pow(2).mean().sqrt())
