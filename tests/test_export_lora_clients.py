"""The LoRA export held against the loaders of its clients, on the tiny model (no training run needed).

ComfyUI cannot be imported here, so what its loader does is written down from its source (cited per
function below) and nothing else of it is used:

- comfy/utils.py `flux_to_diffusers`: each diffusers FLUX key -> the original FLUX key, with a row slice
  where diffusers keeps apart what FLUX fuses (q, k, v -> `img_attn.qkv` / `txt_attn.qkv`; q, k, v,
  proj_mlp -> `single_blocks.N.linear1`) and `swap_scale_shift` for `norm_out.linear`. The test checks
  this table against diffusers' own single-file converter of original FLUX checkpoints
  (`convert_flux_transformer_checkpoint_to_diffusers`) before relying on it.
- comfy/lora.py `model_lora_keys_unet`: for every `diffusion_model.<K>.weight` of the model,
  `lora_unet_<K with dots as underscores>` names that weight; for a Flux model also `transformer.<diffusers
  module>` names the FLUX weight or its slice (the `flux_to_diffusers` table).
- comfy/lora.py `load_lora` + comfy/weight_adapter/lora.py `LoRAAdapter.load` / `calculate_weight`:
  `<x>.lora_up.weight` + `<x>.lora_down.weight` (or `<x>.lora_B.weight` + `<x>.lora_A.weight`), optional
  `<x>.alpha`; the weight (or its slice) gets alpha / rank * up @ down with rank = down's rows (1 without
  alpha), passed through the slice's function; a key no mapping consumed is logged "lora key not loaded".
"""

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from editflow.export import COMFYUI_LORA_FILE, _write_lora
from editflow.model_paths import LORA_FILE
from editflow.models.build import KONTEXT_LORA_TARGETS, select_trainable

EVERY_LINEAR = [  # every nn.Linear of FluxTransformer2DModel, by the suffix PEFT matches
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out", "norm_out.linear", "x_embedder", "context_embedder",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2", "guidance_embedder.linear_1",
    "guidance_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2",
]


def swap_scale_shift(weight):
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def comfy_flux_to_diffusers(depth: int, depth_single: int, hidden: int) -> dict:
    """comfy/utils.py flux_to_diffusers, written down: diffusers key -> (FLUX key, (first row, rows) or
    None, swap_scale_shift or None); FLUX keys without ComfyUI's `diffusion_model.` prefix."""
    table = {}
    for i in range(depth):
        d, f = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for end in ("weight", "bias"):
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                table[f"{d}attn.{name}.{end}"] = (f"{f}img_attn.qkv.{end}", (j * hidden, hidden), None)
            for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                table[f"{d}attn.{name}.{end}"] = (f"{f}txt_attn.qkv.{end}", (j * hidden, hidden), None)
            for ours, theirs in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                                 "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                                 "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                                 "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}.items():
                table[f"{d}{ours}.{end}"] = (f"{f}{theirs}.{end}", None, None)
        for ours, theirs in {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                             "attn.norm_added_q": "txt_attn.norm.query_norm",
                             "attn.norm_added_k": "txt_attn.norm.key_norm"}.items():
            table[f"{d}{ours}.weight"] = (f"{f}{theirs}.scale", None, None)
    for i in range(depth_single):
        d, f = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for end in ("weight", "bias"):
            for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                table[f"{d}{name}.{end}"] = (f"{f}linear1.{end}", (j * hidden, hidden), None)
            table[f"{d}proj_mlp.{end}"] = (f"{f}linear1.{end}", (3 * hidden, 4 * hidden), None)
            table[f"{d}norm.linear.{end}"] = (f"{f}modulation.lin.{end}", None, None)
            table[f"{d}proj_out.{end}"] = (f"{f}linear2.{end}", None, None)
        table[f"{d}attn.norm_q.weight"] = (f"{f}norm.query_norm.scale", None, None)
        table[f"{d}attn.norm_k.weight"] = (f"{f}norm.key_norm.scale", None, None)
    for end in ("weight", "bias"):
        for theirs, ours in {"final_layer.linear": "proj_out", "img_in": "x_embedder", "txt_in": "context_embedder",
                             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}.items():
            table[f"{ours}.{end}"] = (f"{theirs}.{end}", None, None)
        table[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", None, swap_scale_shift)
    return table


def to_flux(diffusers_sd: dict, table: dict) -> dict:
    """A diffusers state dict in the original FLUX layout, by the table (fused weights assembled)."""
    out = {}
    for key, (flux_key, part, _) in table.items():
        value = diffusers_sd[key]
        rows = max(out[flux_key].shape[0] if flux_key in out else 0, part[0] + part[1] if part else value.shape[0])
        out[flux_key] = value.new_zeros(rows, *value.shape[1:])
    for key, (flux_key, part, fn) in table.items():
        value = fn(diffusers_sd[key]) if fn else diffusers_sd[key]
        (out[flux_key].narrow(0, *part) if part else out[flux_key]).copy_(value)
    return out


def from_flux(flux_sd: dict, table: dict) -> dict:
    out = {}
    for key, (flux_key, part, fn) in table.items():
        value = flux_sd[flux_key].narrow(0, *part) if part else flux_sd[flux_key]
        out[key] = (fn(value) if fn else value).clone()  # the swap is its own inverse
    return out


def comfy_lora_key_map(flux_sd: dict, table: dict) -> dict:
    """comfy/lora.py model_lora_keys_unet for a Flux model: LoRA name -> (FLUX key, slice, function)."""
    key_map = {}
    for key in flux_sd:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[: -len(".weight")].replace(".", "_")] = (key, None, None)
            key_map["diffusion_model." + key[: -len(".weight")]] = (key, None, None)  # the generic format
    for key, target in table.items():
        if key.endswith(".weight"):
            key_map["transformer." + key[: -len(".weight")]] = target
    return key_map


def comfy_apply(lora: dict, key_map: dict, flux_sd: dict) -> dict:
    """comfy/lora.py load_lora + weight_adapter/lora.py calculate_weight (strength 1), in float64."""
    patched = {k: v.double().clone() for k, v in flux_sd.items()}
    loaded = set()
    for name, (flux_key, part, fn) in key_map.items():
        for up_name, down_name in (("lora_up", "lora_down"), ("lora_B", "lora_A")):
            if f"{name}.{up_name}.weight" in lora:
                break
        else:
            continue
        up, down = lora[f"{name}.{up_name}.weight"].double(), lora[f"{name}.{down_name}.weight"].double()
        alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else None
        loaded |= {f"{name}.{up_name}.weight", f"{name}.{down_name}.weight"} | ({f"{name}.alpha"} if alpha else set())
        weight = patched[flux_key].narrow(0, *part) if part else patched[flux_key]
        diff = (alpha / down.shape[0] if alpha is not None else 1.0) * (up @ down)
        assert diff.shape == weight.shape, f"{name}: LoRA {tuple(diff.shape)} on weight {tuple(weight.shape)}"
        weight += fn(diff) if fn else diff
    assert set(lora) - loaded == set(), "ComfyUI: lora key not loaded"
    return patched


def tiny_transformer(cfg) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**OmegaConf.to_container(cfg.transformer.config))


def forward(transformer, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    c = transformer.config
    image, text = 16, 8
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, image, c.in_channels, generator=g).to(dtype),
            encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dtype),
            timestep=torch.tensor([0.6], dtype=dtype), guidance=torch.tensor([2.0], dtype=dtype),
            img_ids=torch.cat([torch.zeros(image, 1), torch.randn(image, 2, generator=g)], 1),
            txt_ids=torch.zeros(text, 3), return_dict=False)[0].double()


def add_adapter(transformer, cfg, variant: str) -> None:
    """The adapters under test, with non-zero updates (lora_B starts at zero)."""
    if variant == "rank_pattern":  # rank and alpha differing per module: PEFT patterns (not an editflow option)
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=KONTEXT_LORA_TARGETS,
                                           rank_pattern={"attn.to_k": 2, "proj_mlp": 6}, alpha_pattern={"proj_mlp": 3}))
    else:  # editflow's own path: model.trainable=lora with model.lora.*
        targets, rank, alpha = {"every_linear": (EVERY_LINEAR, 4, 8),
                                "parts_of_fused": (["attn.to_q", "attn.add_k_proj", "proj_mlp"], 3, 1)}[variant]
        cfg = OmegaConf.merge(cfg, {"trainable": "lora", "lora": {"rank": rank, "alpha": alpha,
                                                                  "target_modules": targets}})
        select_trainable(transformer, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


VARIANTS = ["every_linear", "parts_of_fused", "rank_pattern"]


@pytest.fixture(scope="module")
def exported(tiny_model_cfg, tmp_path_factory):
    """variant -> (directory of _write_lora's files, the adapted transformer's output, the base's weights)"""
    out = {}
    for variant in VARIANTS:
        transformer = tiny_transformer(tiny_model_cfg)
        base = {k: v.clone() for k, v in transformer.state_dict().items()}
        add_adapter(transformer, tiny_model_cfg, variant)
        directory = tmp_path_factory.mktemp(variant)
        _write_lora(transformer, directory)
        out[variant] = directory, forward(transformer), base
    return out


def test_comfyui_table_matches_diffusers_single_file_converter():
    """The flux_to_diffusers table above against diffusers' converter of original FLUX checkpoints, at
    FLUX's real width (the converter assumes 3072): every row of every fused FLUX weight lands where the
    table says. Row-tagged (rows x 1) tensors keep it cheap."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        real = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)  # FLUX.1 widths
    table = comfy_flux_to_diffusers(2, 2, 3072)
    assert set(table) == set(real.state_dict())  # the table covers every parameter
    rows = {}
    for key, (flux_key, part, _) in table.items():
        rows[flux_key] = max(rows.get(flux_key, 0), part[0] + part[1] if part else real.state_dict()[key].shape[0])
    start, flux_sd = 0, {}
    for key, n in sorted(rows.items()):
        flux_sd[key] = torch.arange(start, start + n, dtype=torch.float64)[:, None]
        start += n
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(flux_sd))
    assert set(converted) == set(table)
    for key, (flux_key, part, fn) in table.items():
        expected = flux_sd[flux_key].narrow(0, *part) if part else flux_sd[flux_key]
        assert torch.equal(converted[key].reshape(-1, 1), fn(expected) if fn else expected), key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("file", [COMFYUI_LORA_FILE, LORA_FILE])
def test_comfyui_loads_every_key_and_reproduces_the_adapter(exported, tiny_model_cfg, variant, file):
    """Each exported file as ComfyUI loads it onto the tiny model in FLUX's layout: every key is consumed,
    every update has its weight's (or slice's) shape, and the patched model computes what editflow's
    adapted transformer does (alpha != rank, a q without k and v, a linear1 from q and proj_mlp alone,
    per-module ranks, the final norm's swapped halves)."""
    directory, expected, base = exported[variant]
    config = tiny_transformer(tiny_model_cfg).config
    table = comfy_flux_to_diffusers(config.num_layers, config.num_single_layers,
                                    config.num_attention_heads * config.attention_head_dim)
    flux_sd = to_flux(base, table)
    lora = load_file(directory / file)
    if file == COMFYUI_LORA_FILE:
        assert all(k.startswith("lora_unet_") for k in lora)
        assert all(lora[k].dim() == 0 and lora[k].dtype == torch.float32 for k in lora if k.endswith(".alpha"))
    patched = comfy_apply(lora, comfy_lora_key_map(flux_sd, table), flux_sd)
    transformer = tiny_transformer(tiny_model_cfg)
    transformer.load_state_dict({k: v.float() for k, v in from_flux(patched, table).items()})
    base_transformer = tiny_transformer(tiny_model_cfg)
    assert (forward(base_transformer) - expected).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(forward(transformer), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_load_lora_weights_reproduces_the_adapter(exported, tiny_model_cfg, variant):
    """FluxKontextPipeline.load_lora_weights on the export's directory (the diffusers file and its
    metadata) gives the tiny base what editflow's adapted transformer computes."""
    directory, expected, _ = exported[variant]
    transformer = tiny_transformer(tiny_model_cfg)
    pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(directory)
    torch.testing.assert_close(forward(transformer), expected, rtol=1e-4, atol=1e-5)


def test_comfyui_file_keeps_the_adapters_dtype(tiny_model_cfg, tmp_path):
    """A bf16 adapter stays bf16 in both files (alpha a float32 scalar, which ComfyUI reads with .item())."""
    transformer = tiny_transformer(tiny_model_cfg)
    add_adapter(transformer, tiny_model_cfg, "parts_of_fused")
    transformer.to(torch.bfloat16)
    _write_lora(transformer, tmp_path)
    for file in (COMFYUI_LORA_FILE, LORA_FILE):
        with safe_open(tmp_path / file, "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {"BF16"}, file
        assert {d for k, d in dtypes.items() if k.endswith(".alpha")} <= {"F32"}
