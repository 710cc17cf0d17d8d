import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from editflow.data.toy import make_edit
from editflow.encoding import pad_states
from editflow.models.packing import image_ids, pack, unpack
from editflow.data.loader import image_tensor
from editflow.pipeline import EditPipeline


def test_pack_unpack_round_trip_is_exact():
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack(latents)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack(tokens, 6, 10), latents)


def test_kontext_ids_mark_the_source_with_index_one():
    target, source = image_ids(4, 6, 0), image_ids(4, 6, 1)
    assert target.shape == (6, 3) and torch.equal(target[:, 1:], source[:, 1:])
    assert (target[:, 0] == 0).all() and (source[:, 0] == 1).all()


def test_tiny_model_uses_the_real_classes(tiny_models):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert isinstance(tiny_models.editor.transformer, FluxTransformer2DModel)
    assert tiny_models.editor.transformer.config.guidance_embeds
    assert isinstance(tiny_models.codec.vae, AutoencoderKL)
    assert tiny_models.codec.latent_channels == 16 and tiny_models.codec.downsample == 8
    assert isinstance(tiny_models.conditioner.model, Qwen2_5_VLForConditionalGeneration)
    assert not any(p.requires_grad for p in tiny_models.conditioner.parameters())


def test_tiny_vae_decodes_toy_images_recognisably(tiny_models):
    edits = [make_edit(i, seed=99) for i in range(8)]
    images = torch.stack([image_tensor(e.target) for e in edits])
    recon = tiny_models.codec.decode(tiny_models.codec.encode(images))
    mae = (recon - images).abs().mean().item() / 2  # on a [0, 1] scale
    assert mae < 0.03, f"tiny VAE reconstruction error {mae:.4f}"


def test_conditioner_drops_template_prefix_and_masks_padding(tiny_models):
    cond = tiny_models.conditioner
    edits = [make_edit(i, seed=1) for i in range(3)]
    states, mask = cond([e.source for e in edits], [e.instruction for e in edits])
    lengths = mask.sum(1)
    assert lengths.min() < states.shape[1]  # the batch really is padded
    image_tokens = (64 // 28 * 28 // 14) ** 2 // 4  # 56x56 after resizing, 14 px patches, 2x2 merge
    for i, e in enumerate(edits):
        expected = image_tokens + 2 + cond.token_count(e.instruction) + 2  # vision start/end, <|im_end|>\n
        assert lengths[i] == expected
        alone, alone_mask = cond([e.source], [e.instruction])
        torch.testing.assert_close(states[i, : lengths[i]], alone[0], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_sample_output(tiny_models):
    editor = tiny_models.editor.eval()
    torch.manual_seed(0)
    short, long = torch.randn(5, 64), torch.randn(9, 64)
    states, mask = pad_states([short, long])
    noisy, source = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma, guidance = torch.tensor([0.3, 0.7]), torch.ones(2)
    with torch.no_grad():
        batched = editor(noisy, source, states, mask, sigma, guidance)
        alone = editor(noisy[:1], source[:1], short[None], torch.ones(1, 5, dtype=torch.bool), sigma[:1], guidance[:1])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)


def test_sampler_matches_diffusers_flux_kontext_pipeline(tiny_models):
    """Our sampler and diffusers' FluxKontextPipeline agree given the same embeddings and generator."""
    pipe = EditPipeline.from_models(tiny_models)
    edit = make_edit(3, seed=8)
    ours = pipe(edit.source, edit.instruction, num_inference_steps=4, guidance_scale=2.5,
                generator=torch.Generator().manual_seed(0), output_type="np")
    prompt_embeds, pooled, _ = pipe.encode([edit.source], [edit.instruction])
    reference = FluxKontextPipeline(
        scheduler=tiny_models.scheduler, vae=tiny_models.codec.vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=tiny_models.editor.transformer,
    )
    theirs = reference(
        image=edit.source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=64, width=64,
        max_area=64 * 64, _auto_resize=False, num_inference_steps=4, guidance_scale=2.5,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_same_seed_same_edit_other_seed_other_edit(tiny_models):
    pipe = EditPipeline.from_models(tiny_models)
    edit = make_edit(0)
    run = lambda seed: pipe(edit.source, edit.instruction, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(seed), output_type="np")
    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))


def test_bad_size_is_refused(tiny_models):
    with pytest.raises(ValueError, match="multiples of 16"):
        EditPipeline.from_models(tiny_models)(make_edit(0).source, "x", height=40, width=64)
