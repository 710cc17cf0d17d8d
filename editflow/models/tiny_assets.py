"""Build the shipped tiny assets: offline Qwen2.5-VL (tokenizer, image processor, random weights) and a trained VAE.

    python -m editflow.models.tiny_assets --out editflow/assets/tiny [--vae-steps 3000]

Nothing can be downloaded here, so the tiny model is made from the real classes
with small configs. The VAE is *trained* on toy scenes so decoded samples are
real pictures; its latent statistics set `shift_factor`/`scaling_factor` the way
the real Flux VAE's were chosen (latents of zero mean and unit variance).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's template, reduced to what editflow renders (a user turn of images and text).
# Like the real one it begins with a fixed system prompt, which the conditioner drops.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 3 blocks, 2 downsamples: 4x (FLUX's VAE is 8x). At 64 px an 8x VAE leaves 8x8 latents, two latent pixels
# per toy object, and its reconstruction error alone (0.013 mae) exceeded copy-the-source's on the small
# edits; at 4x the error floor is a fraction of the smallest edit's. Narrow first block: encoding cost.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=16,  # like FLUX's
    norm_num_groups=4,  # 4+ channels per group: flat colours survive normalisation
    sample_size=64,
    use_quant_conv=False,  # FLUX's VAE has neither quant conv
    use_post_quant_conv=False,
)


def _tokenizer_corpus() -> list[str]:
    """English covering the toy instructions plus generic edit vocabulary."""
    from editflow.data.toy import generate

    generic = [
        "Make the sky look like sunset and add a few clouds.",
        "Replace the cat with a dog, keep everything else the same.",
        "Change the style of the photo to a watercolor painting.",
        "Remove the person on the left and fill in the background.",
        "Turn the car red, increase the brightness, and add snow on the ground.",
        "Please put a hat on the man and make him smile.",
    ]
    return [edit.instruction for edit in generate(3000, seed=12345)] + generic * 20


def build_tokenizer(out: Path, vocab_size: int = 1024):
    """A byte-level BPE (any string encodes) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def build_qwen(out: Path, seed: int = 0) -> None:
    """Tokenizer + PIL image processor + a randomly initialised tiny Qwen2_5_VLForConditionalGeneration."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    # Toy images are 64 px; keep Qwen's vision input small but allow larger sources.
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224).save_pretrained(out)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)


def _toy_image_batches(batch_size: int, size: int, seed: int, crop: int | None = None):
    """Batches of toy sources and targets in [-1, 1]; random `crop` x `crop` windows when given (4x cheaper steps)."""
    from editflow.data.toy import make_edit

    rng = np.random.default_rng(seed)
    index = 0
    while True:
        images = []
        while len(images) < batch_size:
            edit = make_edit(index, seed=seed, size=size)
            images += [edit.source, edit.target]
            index += 1
        array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
        if crop:
            y, x = rng.integers(0, size - crop + 1, size=2)
            array = array[:, y : y + crop, x : x + crop]
        yield torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _fit(vae, batches, steps: int, lr: float, log_every: int, phase: str) -> None:
    """L1 + MSE reconstruction with a small KL, AdamW with warmup and cosine decay."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    vae.train()
    start = time.time()
    for step in range(1, steps + 1):
        x = next(batches)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            mae = ((recon - x).abs().mean() * 127.5).item()
            print(f"vae {phase} step {step}/{steps} loss {loss.item():.4f} mae {mae:.2f}/255 kl {kl.item():.3f} "
                  f"({time.time() - start:.0f}s)", flush=True)


def train_vae(
    out: Path,
    crop_steps: int = 2000,
    full_steps: int = 2500,
    seed: int = 0,
    init: Path | None = None,
    log_every: int = 100,
):
    """Train the tiny AutoencoderKL on toy scenes and save it with fitted shift/scale.

    Phase 1 trains on random 32 px crops (4x cheaper steps); phase 2 fine-tunes on
    whole 64 px images, whose normalisation statistics differ from crops'.
    `init` starts from saved weights and skips phase 1.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    if init is None:
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        _fit(vae, _toy_image_batches(32, 64, seed=seed + 777, crop=32), crop_steps, 1e-3, log_every, "crops")
    else:
        vae = AutoencoderKL.from_pretrained(init)
    _fit(vae, _toy_image_batches(16, 64, seed=seed + 555), full_steps, 3e-4, log_every, "full")
    vae.eval()
    full_images = _toy_image_batches(32, 64, seed=seed + 999)
    with torch.no_grad():  # latent statistics on fresh full images -> shift and scale, as for the real VAE
        latents = torch.cat([vae.encode(next(full_images)).latent_dist.mode() for _ in range(8)])
    shift = latents.mean().item()
    scale = 1.0 / (latents - shift).std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    vae.save_pretrained(out)
    print(f"saved tiny VAE to {out}: shift_factor={shift:.4f} scaling_factor={scale:.4f}")


def build_base_text_encoders(out: Path, pooled_dim: int = 64, seed: int = 0) -> None:
    """The tiny base's CLIP in FLUX.1-Kontext's layout (`text_encoder/`, `tokenizer/`): the connector's pooled
    vector starts at its pooled embedding of the empty prompt, as it starts at CLIP-L's for the real base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tokenizer_corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bpe.token_to_id(bos)), (eos, bpe.token_to_id(eos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=eos,
                                        model_max_length=77)
    tokenizer.save_pretrained(out / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=pooled_dim, intermediate_size=2 * pooled_dim,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(out / "text_encoder")


README = """Tiny assets for tests and the toy default, built by `python -m editflow.models.tiny_assets`.

- qwen/: offline byte-level BPE tokenizer with Qwen's special tokens and chat template, PIL image
  processor, randomly initialised tiny Qwen2_5_VLForConditionalGeneration (seed 0).
- vae/: AutoencoderKL (3 blocks = 4x, 16 latent channels, no quant convs) trained on toy scenes:
  {crop} steps on 32 px crops, then {full} steps on whole 64 px images, one thread, seed 0.
  Reconstruction error on held-out toy images is checked by tests/test_models.py.
- base/: the tiny base's CLIP text encoder + tokenizer (FLUX.1-Kontext layout), for the connector's
  pooled start (the pooled embedding of the empty prompt).
- base/transformer/, base/connector/: the tiny pretrained editor the toy default fine-tunes, written by
  `--base-from RUN` from a run of `experiment=toy_base` (or of `experiment=toy_base_refine` continuing one,
  possibly from a transformer grown by `python -m editflow.models.deepen`).
"""


def save_base(run: Path, out: Path) -> None:
    """The tiny pretrained editor the toy default fine-tunes (`base/transformer/` in diffusers' layout,
    `base/connector/`), from a run of `experiment=toy_base`: its newest checkpoint's EMA weights, through
    `editflow export`."""
    import shutil
    import tempfile

    from editflow.export import export

    with tempfile.TemporaryDirectory() as tmp:
        exported = export(run, Path(tmp) / "export")
        for part in ("transformer", "connector"):
            target = out / "base" / part
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(exported / part, target)
    config = out / "base" / "transformer" / "config.json"
    settings = json.loads(config.read_text())
    settings.pop("_name_or_path", None)  # the build machine's path of the run's start: nothing to another machine
    config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    print(f"saved the tiny base (transformer/, connector/) from {run} to {out / 'base'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "tiny")
    parser.add_argument("--vae-crop-steps", type=int, default=2000)
    parser.add_argument("--vae-full-steps", type=int, default=2500)
    parser.add_argument("--vae-init", type=Path, default=None, help="start from these VAE weights (skips crop phase)")
    parser.add_argument("--skip-vae", action="store_true", help="rebuild only the Qwen and CLIP assets")
    parser.add_argument("--base-from", type=Path, default=None, metavar="RUN",
                        help="only write base/transformer/ and base/connector/ from this run (experiment=toy_base or toy_base_refine)")
    args = parser.parse_args(argv)
    if args.base_from:
        save_base(args.base_from, args.out)
        return
    torch.set_num_threads(1)  # one thread sums in one order: the same weights on every run (same torch build)
    build_qwen(args.out / "qwen")
    build_base_text_encoders(args.out / "base")
    if not args.skip_vae:
        train_vae(args.out / "vae", args.vae_crop_steps, args.vae_full_steps, init=args.vae_init)
        crop = f"started from {args.vae_init}, no" if args.vae_init else args.vae_crop_steps
        (args.out / "README.md").write_text(README.format(crop=crop, full=args.vae_full_steps))
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
