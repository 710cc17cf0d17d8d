import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from editflow.data.pixels import image_tensor
from editflow.data.toy import make_edit
from editflow.frozen_encoders import pad_states
from editflow.models.packing import image_ids, pack, unpack
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
    # FLUX's 16 latent channels; 4x (not FLUX's 8x) keeps toy objects more than two latent pixels wide
    assert tiny_models.codec.latent_channels == 16 and tiny_models.codec.downsample == 4
    assert isinstance(tiny_models.conditioner.model, Qwen2_5_VLForConditionalGeneration)
    assert not any(p.requires_grad for p in tiny_models.conditioner.parameters())


def test_tiny_vae_decodes_toy_images_recognisably(tiny_models):
    edits = [make_edit(i, seed=99) for i in range(8)]
    images = torch.stack([image_tensor(e.target) for e in edits])
    recon = tiny_models.codec.decode(tiny_models.codec.encode(images))
    mae = (recon - images).abs().mean().item() / 2  # on a [0, 1] scale
    assert mae < 0.03, f"tiny VAE reconstruction error {mae:.4f}"


def test_tiny_vae_floor_is_below_copying_the_source_on_small_edits(tiny_models):
    """A perfect latent must beat copy-the-source, or the default run could not: on `add`, the smallest
    edits, the VAE's own reconstruction error has to stay below the copy's (0.013 at 64 px)."""
    from editflow.data.samples import EditSample
    from editflow.evaluation import edit_scores
    from editflow.pipeline import tensor_to_pil

    edits = [e for e in (make_edit(i, seed=7) for i in range(120)) if e.meta["task"] == "add"][:16]
    images = torch.stack([image_tensor(e.target) for e in edits])
    with torch.no_grad():
        decoded = tensor_to_pil(tiny_models.codec.decode(tiny_models.codec.encode(images)))
    samples = [EditSample(e.key, e.source, e.target, e.instruction, e.meta, e.mask) for e in edits]
    floor = np.mean([edit_scores(d, s)["mae"] for d, s in zip(decoded, samples)])
    copy = np.mean([edit_scores(s.source, s)["mae"] for s in samples])
    assert floor < 0.9 * copy, f"VAE floor {floor:.4f} vs copy-the-source {copy:.4f} on add edits"


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


def _padding_gap(editor) -> float:
    """Largest difference between a sample's output in a padded batch and alone."""
    torch.manual_seed(0)
    short, long = torch.randn(5, 64), torch.randn(20, 64)  # other text buckets for text_pad_multiple <= 16
    states, mask = pad_states([short, long])
    noisy, source = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma, guidance = torch.tensor([0.3, 0.7]), torch.ones(2)
    with torch.no_grad():
        batched = editor(noisy, source, states, mask, sigma, guidance)
        alone = editor(noisy[:1], source[:1], short[None], torch.ones(1, 5, dtype=torch.bool), sigma[:1], guidance[:1])
    return (batched[:1] - alone).abs().max().item()


def test_padding_does_not_change_a_sample_output(tiny_models):
    assert _padding_gap(tiny_models.editor.eval()) < 1e-5


def test_sampler_matches_diffusers_flux_kontext_pipeline(tiny_models):
    """Our sampler and diffusers' FluxKontextPipeline agree given the same embeddings and generator."""
    pipe = EditPipeline.from_models(tiny_models, guidance=1.0)
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
    pipe = EditPipeline.from_models(tiny_models, guidance=1.0)
    edit = make_edit(0)
    run = lambda seed: pipe(edit.source, edit.instruction, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(seed), output_type="np")
    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))


def test_bad_size_is_refused(tiny_models):
    pipe = EditPipeline.from_models(tiny_models, guidance=1.0)
    assert pipe.size_multiple == 2 * tiny_models.codec.downsample  # 2x2 latent patches per token
    with pytest.raises(ValueError, match=f"height must be a positive multiple of {pipe.size_multiple}, got 36"):
        pipe(make_edit(0).source, "x", height=36, width=64)


def test_token_refiner_keeps_padding_invisible(tiny_model_cfg):
    from omegaconf import OmegaConf

    from editflow.models.build import build_models

    cfg = OmegaConf.merge(tiny_model_cfg, {"connector": {"refiner_layers": 2, "refiner_heads": 4}})
    models = build_models(cfg, seed=0)
    assert len(models.editor.connector.refiner) == 2
    assert _padding_gap(models.editor.eval()) < 1e-5


def test_real_configs_have_the_published_parameter_counts():
    """FLUX.1-Kontext-dev's transformer and Qwen2.5-VL-7B-Instruct, instantiated on the meta device."""
    import json

    from diffusers import FluxTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from editflow.models.build import asset_path
    from editflow.models.connector import Connector

    with torch.device("meta"):
        flux = FluxTransformer2DModel.from_config(json.load(open(asset_path("configs/flux1-kontext-dev-transformer.json"))))
        qwen = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(**json.load(open(asset_path("configs/qwen2.5-vl-7b-instruct.json")))))
        connector = Connector(qwen.config.text_config.hidden_size, flux.config.joint_attention_dim,
                              flux.config.pooled_projection_dim, hidden_dim=4096)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert abs(count(flux) / 1e9 - 11.9) < 0.05 and abs(count(qwen) / 1e9 - 8.29) < 0.05
    assert connector.mlp[0].weight.shape == (4096, 3584) and connector.mlp[2].weight.shape == (4096, 4096)


def test_loading_errors_name_the_component_and_path(tmp_path):
    from omegaconf import OmegaConf

    from editflow.errors import ConfigError
    from editflow.models.build import build_codec, build_transformer

    with pytest.raises(ConfigError, match=r"model.transformer.pretrained=.*FLUX transformer from local directory .*empty.* subfolder 'transformer'"):
        (tmp_path / "empty").mkdir()
        build_transformer(OmegaConf.create({"pretrained": str(tmp_path / "empty"), "subfolder": "transformer"}),
                          torch.float32)
    with pytest.raises(ConfigError, match=r"model.vae.pretrained=.*VAE from hub id .*offline machines need a local directory"):
        build_codec(OmegaConf.create({"pretrained": "black-forest-labs/FLUX.1-Kontext-dev", "subfolder": "vae"}),
                    torch.float32)


@pytest.mark.parametrize("backend", ["native", "_native_flash", "_native_cudnn", "_native_efficient", "flash",
                                     "_flash_3", "flash_varlen", "sage", "no_such_kernel"])
def test_every_attention_backend_trains_or_is_refused_by_name(tiny_model_cfg, backend):
    """On this machine each backend either runs a padded and an unpadded training step, or is refused
    with a message naming model.attention_backend (not offered, missing package, wrong device)."""
    from omegaconf import OmegaConf

    from editflow.models.attention import check_attention_backend
    from editflow.models.build import build_models

    cfg = OmegaConf.merge(tiny_model_cfg, {"attention_backend": backend})
    try:
        models = build_models(cfg, seed=0, training=True)
        check_attention_backend(models.editor, "cpu", torch.float32)
    except (ValueError, ImportError, RuntimeError) as err:
        assert f"model.attention_backend={backend!r}" in str(err)
        return
    assert backend in ("native", "_native_flash", "_native_cudnn", "_native_efficient") or \
        __import__("importlib").util.find_spec("flash_attn")
    editor = models.editor.train()
    for lengths in ((6, 6), (4, 11)):  # unpadded, then padded (two text buckets: the padded kernel)
        states, mask = pad_states([torch.randn(n, 64) for n in lengths])
        out = editor(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), states, mask, torch.rand(2), torch.ones(2))
        out.square().mean().backward()
    assert editor.transformer.transformer_blocks[0].attn.to_q.weight.grad is not None
    if backend == "native":
        assert _padding_gap(editor.eval()) < 1e-5


def test_lora_on_a_bf16_base_trains_fp32_adapters_and_connector(tiny_model_cfg):
    from omegaconf import OmegaConf

    from editflow.models.build import build_models, keep_trainable_in_fp32

    cfg = OmegaConf.merge(tiny_model_cfg, {"dtype": "bfloat16", "trainable": "lora"})
    editor = build_models(cfg, seed=0, training=True).editor
    keep_trainable_in_fp32(editor, cfg)
    trainable = {n: p for n, p in editor.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all("lora_" in n for n in trainable if n.startswith("transformer."))
    assert editor.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    states, mask = pad_states([torch.randn(4, 64), torch.randn(6, 64)])
    out = editor(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), states, mask, torch.rand(2), torch.ones(2))
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())


def test_int8_base_under_lora_trains_the_adapters(tiny_model_cfg):
    pytest.importorskip("torchao")
    from omegaconf import OmegaConf

    from editflow.models.build import build_models

    cfg = OmegaConf.merge(tiny_model_cfg, {"trainable": "lora", "base_quantization": "int8"})
    editor = build_models(cfg, seed=0, training=True).editor
    base = editor.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert "Int8" in type(base).__name__ and base.requires_grad is False
    optimizer = torch.optim.AdamW([p for p in editor.parameters() if p.requires_grad], lr=1e-2)
    states, mask = pad_states([torch.randn(5, 64), torch.randn(5, 64)])
    torch.manual_seed(0)
    inputs = (torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), states, mask, torch.rand(2), torch.ones(2))
    target = torch.randn(2, 16, 4, 4)
    losses = []
    for _ in range(30):
        loss = (editor(*inputs) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    lora_b = editor.transformer.transformer_blocks[0].attn.to_q.lora_B.default.weight
    assert lora_b.abs().sum() > 0  # the adapters moved, the int8 base did not


def test_base_quantization_needs_lora():
    from hydra import compose, initialize_config_dir

    from editflow.config import CONFIG_DIR
    from editflow.config import validate
    from editflow.errors import ConfigError

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model.base_quantization=int8"])
    with pytest.raises(ConfigError, match="model.base_quantization: .*needs model.trainable=lora"):
        validate(cfg)
