"""LoRA end to end: toy_lora trains, its checkpoint holds adapters only, the export loads in editflow and
in diffusers' load_lora_weights with the same images, and the ComfyUI file is the same adapter."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors.torch import load_file

from editflow.data.toy import make_edit
from editflow.export import COMFYUI_LORA_FILE, export
from editflow.lora_formats import diffusers_to_comfyui
from editflow.pipeline import LORA_FILE, EditPipeline


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    overrides = ["experiment=toy_lora", "trainer.max_steps=6", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                 "trainer.log_every=3", "optim.warmup_steps=0", "data.toy.num_train=16", "data.toy.num_val=4",
                 "data.toy.samples_per_shard=8", "eval.num_samples=2", "eval.steps=1", f"hydra.run.dir={root / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "editflow.train", *overrides], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def sample(pipe, edit, **kw):
    return pipe(edit.source, edit.instruction, num_inference_steps=3, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(5), output_type="np", **kw)


def test_lora_checkpoint_holds_adapters_and_connector_only(lora_run):
    weights = load_file(lora_run / "run" / "checkpoints" / "step-0000006" / "model.safetensors")
    transformer_keys = [k for k in weights if k.startswith("transformer.")]
    assert transformer_keys and all(".lora_A." in k or ".lora_B." in k for k in transformer_keys)
    assert any(k.startswith("connector.") for k in weights)
    assert any(".single_transformer_blocks.0.proj_mlp.lora_A" in k for k in transformer_keys)  # the Kontext list


def test_lora_export_matches_editflow_and_diffusers_load_lora_weights(lora_run, tmp_path):
    out = export(lora_run / "run", tmp_path / "export")
    assert json.loads((out / "editflow.json").read_text())["kind"] == "lora"
    assert (out / LORA_FILE).exists() and (out / COMFYUI_LORA_FILE).exists()
    edit = make_edit(2, seed=9)
    from_run = EditPipeline.from_pretrained(lora_run / "run")
    from_export = EditPipeline.from_pretrained(out)
    ours = sample(from_export, edit)
    np.testing.assert_allclose(sample(from_run, edit), ours, atol=1e-5)

    prompt_embeds, pooled, _ = from_export.encode([edit.source], [edit.instruction])
    kontext = FluxKontextPipeline.from_pretrained(out, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None)  # the tiny base; real runs: the hub's Kontext
    kw = dict(image=edit.source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=64, width=64,
              max_area=64 * 64, _auto_resize=False, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    base = kontext(generator=torch.Generator().manual_seed(5), **kw).images
    kontext.load_lora_weights(out)
    theirs = kontext(generator=torch.Generator().manual_seed(5), **kw).images
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert np.abs(base - theirs).max() > 1e-2  # the adapter does change the images

    merged = export(lora_run / "run", tmp_path / "merged", merge_lora=True)
    assert json.loads((merged / "editflow.json").read_text())["kind"] == "full" and not (merged / LORA_FILE).exists()
    np.testing.assert_allclose(sample(EditPipeline.from_pretrained(merged), edit), ours, atol=2e-3)


def test_comfyui_keys_are_the_same_adapter_at_real_width():
    """Random adapters on every module of the real 19 + 38 block FLUX (no weights needed): the kohya/ComfyUI
    file, read back by diffusers' converter, gives every module the same update B @ A * alpha / rank."""
    from editflow.models.build import KONTEXT_LORA_TARGETS

    g = torch.Generator().manual_seed(0)
    inner, mlp, rank, alpha = 3072, 12288, 2, 4.0
    shapes = {"attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
              "attn.to_out.0": (inner, inner), "attn.add_q_proj": (inner, inner), "attn.add_k_proj": (inner, inner),
              "attn.add_v_proj": (inner, inner), "attn.to_add_out": (inner, inner), "ff.net.0.proj": (mlp, inner),
              "ff.net.2": (inner, mlp), "ff_context.net.0.proj": (mlp, inner), "ff_context.net.2": (inner, mlp)}
    single = {"attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
              "proj_mlp": (mlp, inner), "proj_out": (inner, inner + mlp)}
    assert set(shapes) | set(single) == set(KONTEXT_LORA_TARGETS)  # every default target
    lora = {}
    for prefix, table, blocks in (("transformer_blocks", shapes, 19), ("single_transformer_blocks", single, 38)):
        for i in range(blocks):
            for module, (out_dim, in_dim) in table.items():
                key = f"transformer.{prefix}.{i}.{module}"
                lora[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
                lora[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    lora["transformer.proj_out.lora_A.weight"] = torch.randn(rank, inner, generator=g)
    lora["transformer.proj_out.lora_B.weight"] = torch.randn(64, rank, generator=g)
    comfy = diffusers_to_comfyui(lora, alpha, inner, mlp)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in comfy
    assert comfy["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * inner + mlp, 4 * rank)
    back = FluxKontextPipeline.lora_state_dict(comfy)  # detects the kohya layout and converts it
    back = back[0] if isinstance(back, tuple) else back
    # diffusers' converter names the final layer `proj_out` without the `transformer.` prefix it gives blocks
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    probes = {}  # compare the updates on random inputs: B @ (A @ x), without forming 12288 x 3072 matrices

    def delta(sd, key):
        a, b = sd[f"{key}.lora_A.weight"].double(), sd[f"{key}.lora_B.weight"].double()
        x = probes.setdefault(a.shape[1], torch.randn(a.shape[1], 3, generator=g, dtype=torch.float64))
        return b @ (a @ x)
    modules = {k[: -len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert {k[: -len(".lora_A.weight")] for k in back if k.endswith(".lora_A.weight")} == modules
    for key in sorted(modules):
        torch.testing.assert_close(delta(back, key), delta(lora, key) * alpha / rank, rtol=1e-6, atol=1e-6, msg=key)


def test_the_24gb_recipe_in_miniature_trains_and_resumes_exactly(tmp_path):
    """experiment=lora_24gb's mechanisms on the tiny model: LoRA on an int8 base, gradient checkpointing,
    8-bit AdamW (torchao, which runs on the CPU) and pre-encoded conditioning; stopped half-way and resumed,
    the run ends where the uninterrupted one does."""
    from test_encode import run_encode
    from test_train import read_metrics, run_train

    recipe = ["experiment=toy_lora", "model.base_quantization=int8", "model.gradient_checkpointing=true",
              "optim.name=adamw8bit_torchao", "trainer.max_steps=8", "trainer.cache_encodings=false",
              f"data.pre_encoded={tmp_path / 'enc'}"]
    run_encode(tmp_path, *recipe, f"encode.out={tmp_path / 'enc'}")
    entry = [sys.executable, "-m", "editflow.train"]
    run_train(entry, tmp_path / "straight", tmp_path / "cache", *recipe)
    run_train(entry, tmp_path / "resumed", tmp_path / "cache", *recipe, "trainer.stop_after=4", code=42)
    run_train(entry, tmp_path / "resumed", tmp_path / "cache", *recipe, "trainer.resume=auto")
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000008" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert any("lora_A" in k for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    earlier = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / "model.safetensors")
    assert any(not torch.equal(a[k], earlier[k]) for k in a if "lora_B" in k)  # the adapters train
    losses = [m["loss"] for m in read_metrics(tmp_path / "straight")]
    assert losses == [m["loss"] for m in read_metrics(tmp_path / "resumed")]
