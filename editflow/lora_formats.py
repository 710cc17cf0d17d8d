"""LoRA weights in the layouts other tools read.

editflow trains PEFT adapters on diffusers' FluxTransformer2DModel, so its native LoRA file is diffusers'
(`transformer.<module>.lora_A/lora_B.weight` + adapter metadata). ComfyUI (and kohya's sd-scripts,
Forge, ...) name modules after the original FLUX checkpoint, where q/k/v (and, in single blocks, the MLP
input) are one fused linear: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`. A fused module's
LoRA is made exactly from its parts: the downs stacked, the ups placed block-diagonally (rank = sum of
the parts' ranks). Each module's scale (PEFT's `scaling`: alpha/rank, or its alpha_pattern/rank_pattern
entry) is folded into `lora_up` and `alpha` is set to the rank, which every reader interprets the same
way (diffusers' kohya converter ignores alpha on the final layer). The final norm's modulation
(`norm_out.linear`) is FLUX's `final_layer.adaLN_modulation.1` with its two halves swapped (diffusers
orders it scale, shift; FLUX shift, scale), so its `lora_up` rows are swapped too.

The names are ComfyUI's: comfy/lora.py `model_lora_keys_unet` maps `lora_unet_` + the FLUX state-dict
key (dots as underscores) to that weight, and comfy/utils.py `flux_to_diffusers` gives the FLUX module
(and row slice) of each diffusers module, which this module's tables follow.
"""

from __future__ import annotations

import re

import torch

# diffusers module inside transformer_blocks.{i} -> (FLUX module in double_blocks.{i}, part, parts)
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
# diffusers module inside single_transformer_blocks.{i} -> (FLUX module in single_blocks.{i}, part, parts)
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}
TOP_LEVEL = {
    "proj_out": "final_layer_linear", "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
}
SWAPPED_HALVES = {"norm_out.linear"}  # FLUX: (shift, scale); diffusers: (scale, shift)
KEY = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def _flux_target(module: str) -> tuple[str, int, int]:
    """diffusers module path -> (kohya-style FLUX name, part index, number of parts of the fused module)."""
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", module)
    if m:
        table, prefix = (DOUBLE_BLOCK, "double_blocks") if m.group(1) == "transformer_blocks" else (SINGLE_BLOCK, "single_blocks")
        if m.group(3) in table:
            name, part, parts = table[m.group(3)]
            return f"lora_unet_{prefix}_{m.group(2)}_{name}", part, parts
    elif module in TOP_LEVEL:
        return f"lora_unet_{TOP_LEVEL[module]}", 0, 1
    raise ValueError(f"LoRA on {module!r} has no counterpart in the original FLUX layout (ComfyUI export)")


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """The rows of a diffusers `norm_out.linear` update in FLUX's order (its two halves exchanged)."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_comfyui(lora: dict[str, torch.Tensor], alpha: float | None, inner_dim: int,
                         mlp_dim: int, scales: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """diffusers-format LoRA (`transformer.<module>.lora_A/B.weight`) -> kohya/ComfyUI keys.

    A module's update is scale x B @ A: `scales[module]` (module path without `transformer.`) where given,
    else alpha/rank (alpha None: 1, the adapter's scale already folded into B).
    inner_dim: heads x head_dim (q, k and v widths); mlp_dim: a single block's MLP width (4 x inner_dim)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        m = KEY.match(key)
        if not m:
            raise ValueError(f"not a diffusers LoRA key: {key!r}")
        modules.setdefault(m.group("module"), {})[m.group("which")] = tensor
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    parts_of: dict[str, int] = {}
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA on {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        down, up = ab["A"], ab["B"]
        if scales is not None and module in scales:
            scale = scales[module]
        else:
            scale = 1.0 if alpha is None else alpha / down.shape[0]
        up = up * scale  # fold the scale in: alpha = rank from here on
        if module in SWAPPED_HALVES:
            up = swap_halves(up)
        name, part, parts = _flux_target(module)
        fused.setdefault(name, {})[part] = (down, up)
        parts_of[name] = parts
    out: dict[str, torch.Tensor] = {}
    for name, parts in fused.items():
        if parts_of[name] == 1:
            down, up = parts[0]
        else:
            widths = [inner_dim] * 3 + ([mlp_dim] if parts_of[name] == 4 else [])
            present = sorted(parts)
            for p in present:
                if parts[p][1].shape[0] != widths[p]:
                    raise ValueError(f"{name}: part {p} has {parts[p][1].shape[0]} output rows, the fused FLUX "
                                     f"module expects {widths[p]} (inner_dim={inner_dim}, mlp_dim={mlp_dim})")
            down = torch.cat([parts[p][0] for p in present])
            up = down.new_zeros(sum(widths), down.shape[0])
            column = 0
            for p in present:
                part_up = parts[p][1]
                row = sum(widths[:p])
                up[row:row + part_up.shape[0], column:column + part_up.shape[1]] = part_up
                column += part_up.shape[1]
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
