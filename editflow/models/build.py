"""Build every model component from its config node (`cfg.model`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from omegaconf import DictConfig, OmegaConf

from editflow.models.conditioner import QwenVLConditioner
from editflow.models.connector import Connector
from editflow.models.editor import KontextEditor
from editflow.models.vae import LatentCodec

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# FLUX.1-Kontext-dev's scheduler_config.json: dynamic (resolution-dependent) shifting.
KONTEXT_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def asset_path(name: str) -> str:
    """Path of a shipped asset (used by the `${asset:...}` config resolver)."""
    return str(ASSETS / name)


def relocate_asset(path: str) -> str:
    """A shipped-asset path recorded on another machine or install -> this install's copy."""
    marker = "/editflow/assets/"
    if path and not os.path.exists(path) and marker in path:
        candidate = ASSETS / path.split(marker, 1)[1]
        if candidate.exists():
            return str(candidate)
    return path


def _from_pretrained(cls, path: str, what: str, **kwargs):
    """`cls.from_pretrained` with an error that names the component, the path and what is missing."""
    path = relocate_asset(path)
    local = os.path.isdir(path)
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "local directory" if local else "hub id (offline machines need a local directory)"
        sub = f" subfolder {kwargs['subfolder']!r}" if kwargs.get("subfolder") else ""
        raise FileNotFoundError(f"cannot load the {what} from {where} {path!r}{sub}: {err}") from err


def build_transformer(cfg: DictConfig, dtype: torch.dtype) -> FluxTransformer2DModel:
    if cfg.get("pretrained"):
        return _from_pretrained(
            FluxTransformer2DModel, cfg.pretrained, "FLUX transformer", subfolder=cfg.get("subfolder"), torch_dtype=dtype
        )
    config = OmegaConf.to_container(cfg.config, resolve=True)
    config["axes_dims_rope"] = tuple(config.get("axes_dims_rope", (16, 56, 56)))
    model = FluxTransformer2DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype)


def build_codec(cfg: DictConfig, dtype: torch.dtype) -> LatentCodec:
    vae = _from_pretrained(AutoencoderKL, cfg.pretrained, "VAE", subfolder=cfg.get("subfolder"), torch_dtype=dtype)
    return LatentCodec(vae)


def build_conditioner(cfg: DictConfig, dtype: torch.dtype) -> QwenVLConditioner:
    try:
        return QwenVLConditioner.from_pretrained(
            relocate_asset(cfg.pretrained),
            dtype=dtype,
            hidden_layer=cfg.get("hidden_layer", -1),
            max_length=cfg.get("max_length", 512),
            min_pixels=cfg.get("min_pixels"),
            max_pixels=cfg.get("max_pixels"),
            attn_implementation=cfg.get("attn_implementation"),
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load Qwen2.5-VL from {cfg.pretrained!r}: {err}") from err


def build_connector(cfg: DictConfig, qwen_dim: int, transformer: FluxTransformer2DModel) -> Connector:
    return Connector(
        qwen_dim=qwen_dim,
        joint_dim=transformer.config.joint_attention_dim,
        pooled_dim=transformer.config.pooled_projection_dim,
        hidden_dim=cfg.get("hidden_dim"),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(KONTEXT_SCHEDULER_CONFIG)


@dataclasses.dataclass
class Models:
    editor: KontextEditor  # trainable: connector + transformer
    conditioner: QwenVLConditioner  # frozen
    codec: LatentCodec  # frozen
    scheduler: FlowMatchEulerDiscreteScheduler

    def to(self, device) -> "Models":
        self.editor.to(device)
        self.conditioner.to(device)
        self.codec.vae.to(device)
        return self


# diffusers' Kontext LoRA target list (train_dreambooth_lora_flux_kontext.py).
KONTEXT_LORA_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "proj_mlp", "proj_out",
]
# What the public GPT-IMAGE-EDIT reference trains: attention projections and norms of the image branch.
REFERENCE_ATTENTION_PATTERNS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "attn.norm_q", "attn.norm_k")
# Attention backends that have a backward pass (diffusers' dispatcher names).
TRAINABLE_BACKENDS = {"native": None, "flash": "flash_attn", "_flash_3": "flash_attn_interface",
                      "_native_flash": None, "_native_cudnn": None, "_native_efficient": None}


def select_trainable(transformer: FluxTransformer2DModel, cfg: DictConfig) -> None:
    """model.trainable: full | lora (PEFT adapters; base frozen) | reference_attention."""
    mode = cfg.get("trainable", "full")
    if mode == "full":
        transformer.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig

        lora = cfg.get("lora", {})
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(
            r=lora.get("rank", 16), lora_alpha=lora.get("alpha", lora.get("rank", 16)),
            lora_dropout=lora.get("dropout", 0.0), init_lora_weights="gaussian",
            target_modules=list(lora.get("target_modules") or KONTEXT_LORA_TARGETS)))
    elif mode == "reference_attention":
        for name, param in transformer.named_parameters():
            param.requires_grad_(name.startswith("transformer_blocks.") and any(p in name for p in
                                                                                 REFERENCE_ATTENTION_PATTERNS))
    else:
        raise ValueError(f"model.trainable: unknown mode {mode!r}")


def set_attention_backend(transformer: FluxTransformer2DModel, backend: str | None, training: bool = True) -> None:
    """Select diffusers' attention kernel; refuse backends that are missing or cannot train."""
    if not backend or backend == "native":
        return
    if training and backend not in TRAINABLE_BACKENDS:
        raise ValueError(f"model.attention_backend={backend!r} has no backward pass in diffusers; use one of "
                         f"{sorted(TRAINABLE_BACKENDS)}")
    package = TRAINABLE_BACKENDS.get(backend)
    if package:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            raise ImportError(f"model.attention_backend={backend!r} needs the {package} package (pip install "
                              f"'editflow[gpu]'); '_native_flash' uses PyTorch's built-in FlashAttention instead")
    transformer.set_attention_backend(backend)


def build_models(cfg: DictConfig, seed: int = 0, training: bool = False) -> Models:
    """All components of `cfg` (a `model/` config node), on the CPU; the caller moves them."""
    weights_dtype = torch_dtype(cfg.get("dtype", "float32"))
    frozen_dtype = torch_dtype(cfg.get("frozen_dtype", cfg.get("dtype", "float32")))
    torch.manual_seed(seed)  # random-init parts (tiny transformer, connector) are reproducible
    transformer = build_transformer(cfg.transformer, weights_dtype)
    set_attention_backend(transformer, cfg.get("attention_backend"), training)
    if training:
        select_trainable(transformer, cfg)
        if cfg.get("gradient_checkpointing"):
            transformer.enable_gradient_checkpointing()
    conditioner = build_conditioner(cfg.qwen, frozen_dtype)
    connector = build_connector(cfg.connector, conditioner.hidden_size, transformer).to(weights_dtype)
    codec = build_codec(cfg.vae, frozen_dtype)
    return Models(KontextEditor(transformer, connector), conditioner, codec, build_scheduler())
