"""Build every model component from its config node (`cfg.model`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from omegaconf import DictConfig, OmegaConf

from editflow.errors import ConfigError
from editflow.models.attention import AttentionPlan, attention_plan
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


def _from_pretrained(cls, path: str, what: str, key: str, **kwargs):
    """`cls.from_pretrained` with an error (a ConfigError: the user's path) that names the key, the component,
    the path and what is missing."""
    path = relocate_asset(path)
    local = os.path.isdir(path)
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "local directory" if local else "hub id (offline machines need a local directory)"
        sub = f" subfolder {kwargs['subfolder']!r}" if kwargs.get("subfolder") else ""
        raise ConfigError(f"{key}={path}: cannot load the {what} from {where} {path!r}{sub}: {err}") from err


def build_transformer(cfg: DictConfig, dtype: torch.dtype) -> FluxTransformer2DModel:
    if cfg.pretrained:
        return _from_pretrained(
            FluxTransformer2DModel, cfg.pretrained, "FLUX transformer", "model.transformer.pretrained",
            subfolder=cfg.subfolder, torch_dtype=dtype,
        )
    config = OmegaConf.to_container(cfg.config, resolve=True)
    config["axes_dims_rope"] = tuple(config.get("axes_dims_rope", (16, 56, 56)))
    model = FluxTransformer2DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype)


def build_codec(cfg: DictConfig, dtype: torch.dtype) -> LatentCodec:
    vae = _from_pretrained(AutoencoderKL, cfg.pretrained, "VAE", "model.vae.pretrained", subfolder=cfg.subfolder,
                           torch_dtype=dtype)
    return LatentCodec(vae)


def build_conditioner(cfg: DictConfig, dtype: torch.dtype) -> QwenVLConditioner:
    try:
        return QwenVLConditioner.from_pretrained(
            relocate_asset(cfg.pretrained),
            dtype=dtype,
            hidden_layer=cfg.hidden_layer,
            max_length=cfg.max_length,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.qwen.pretrained={cfg.pretrained}: cannot load Qwen2.5-VL from {cfg.pretrained!r}: "
                          f"{err}") from err


def build_connector(cfg: DictConfig, qwen_dim: int, transformer: FluxTransformer2DModel) -> Connector:
    return Connector(
        qwen_dim=qwen_dim,
        joint_dim=transformer.config.joint_attention_dim,
        pooled_dim=transformer.config.pooled_projection_dim,
        kind=cfg.kind,
        hidden_dim=cfg.hidden_dim,
        refiner_layers=cfg.refiner_layers,
        refiner_heads=cfg.refiner_heads,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(KONTEXT_SCHEDULER_CONFIG)


@dataclasses.dataclass
class Models:
    editor: KontextEditor  # trainable: connector + transformer
    conditioner: QwenVLConditioner | None  # frozen; None until needed when training on pre-encoded data
    codec: LatentCodec | None  # frozen, likewise
    scheduler: FlowMatchEulerDiscreteScheduler

    def to(self, device) -> "Models":
        self.editor.to(device)
        if self.conditioner is not None:
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
TRAINABLE = ("full", "lora", "reference_attention", "connector")  # model.trainable, see select_trainable


def select_trainable(transformer: FluxTransformer2DModel, cfg: DictConfig) -> None:
    """model.trainable: full | lora (PEFT adapters; base frozen) | reference_attention | connector (stage 1:
    the transformer frozen, only the connector's token path trains: `select_trainable_connector`)."""
    mode = cfg.trainable
    if mode == "full":
        transformer.requires_grad_(True)
    elif mode == "connector":
        transformer.requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig

        lora = cfg.lora
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, init_lora_weights="gaussian",
            target_modules=list(lora.target_modules or KONTEXT_LORA_TARGETS)))
    elif mode == "reference_attention":
        for name, param in transformer.named_parameters():
            param.requires_grad_(name.startswith("transformer_blocks.") and any(p in name for p in
                                                                                 REFERENCE_ATTENTION_PATTERNS))


def select_trainable_connector(connector: Connector, mode: str, pooled: str = "learned") -> None:
    """Stage 1 (trainable=connector) trains the token path alone: the pooled vector stays at the base's CLIP
    embedding of "", the constant the public reference feeds in its stage 1, and its correction learns in
    stage 2, from zero. A correction aligned to a frozen transformer first cost the toy's two-stage run
    (README, "The two-stage recipe"). With model.connector.pooled=base it never trains (`start_connector`
    zeroes it)."""
    connector.pooled_correction.requires_grad_(mode != "connector" and pooled == "learned")


def keep_trainable_in_fp32(editor: KontextEditor, cfg: DictConfig) -> None:
    """LoRA adapters, a partial selection and the connector train in fp32 (so does their AdamW state) on a
    bf16 base, as diffusers' training scripts do (trainable=connector: the connector alone). Not under DeepSpeed,
    which keeps fp32 master weights of its own; a full fine-tune stays in model.dtype (use model.dtype=float32 +
    mixed precision for FSDP2)."""
    from diffusers.training_utils import cast_training_params

    editor.connector.float()
    if cfg.trainable != "full":
        cast_training_params(editor.transformer, dtype=torch.float32)


def build_models(cfg: DictConfig, seed: int = 0, training: bool = False, lora_adapter: bool = True,
                 qwen_dim: int | None = None) -> Models:
    """All components of `cfg` (a `model/` config node), on the CPU; the caller moves them.

    With model.trainable=lora the adapter is part of the structure (a LoRA checkpoint loads into it),
    unless `lora_adapter=False` (an exported LoRA file is then loaded by diffusers' own loader).
    Given `qwen_dim` (training on pre-encoded data), Qwen and the VAE are not loaded: `build_frozen`
    makes them when they are needed."""
    from editflow.models.local_models import check_local_models

    check_local_models(cfg, ("transformer",))  # before from_pretrained, which fails badly on a wrong directory
    torch.manual_seed(seed)  # random-init parts (tiny transformer, connector) are reproducible
    transformer = build_transformer(cfg.transformer, torch_dtype(cfg.dtype))
    plan = configure_transformer(transformer, cfg, training, lora_adapter)
    conditioner, codec = (None, None) if qwen_dim else build_frozen(cfg)
    editor = build_editor(cfg, transformer, plan, qwen_dim or conditioner.hidden_size, training)
    return Models(editor, conditioner, codec, build_scheduler())


def build_editor(cfg: DictConfig, transformer: FluxTransformer2DModel, plan: AttentionPlan,
                 qwen_dim: int, training: bool = False) -> KontextEditor:
    """The trainable editor of a `model/` config node around a configured transformer: a new connector
    (in model.dtype, on the transformer's device) from Qwen's width to the transformer's."""
    connector = build_connector(cfg.connector, qwen_dim, transformer)
    connector.to(transformer.device, torch_dtype(cfg.dtype))
    if training:
        select_trainable_connector(connector, cfg.trainable, cfg.connector.get("pooled", "learned"))
    return KontextEditor(transformer, connector, attention_backend=plan, text_pad_multiple=cfg.text_pad_multiple)


def qwen_hidden_size(qwen_path: str | None) -> int:
    """The conditioner's width from its config.json (a local directory), else Qwen2.5-VL-7B's, without
    loading it."""
    config = Path(qwen_path or "") / "config.json"
    if not config.exists():
        config = ASSETS / "configs" / "qwen2.5-vl-7b-instruct.json"
    data = json.loads(config.read_text())
    return data.get("text_config", data).get("hidden_size", data.get("hidden_size"))


def build_frozen(cfg: DictConfig) -> tuple[QwenVLConditioner, LatentCodec]:
    """The frozen Qwen2.5-VL conditioner and VAE codec of a `model/` config node, on the CPU."""
    from editflow.models.local_models import check_local_models

    check_local_models(cfg, ("qwen", "vae"))  # Qwen without config.json would be built at 7B's size
    frozen_dtype = torch_dtype(cfg.frozen_dtype)
    return build_conditioner(cfg.qwen, frozen_dtype), build_codec(cfg.vae, frozen_dtype)


def configure_transformer(transformer: FluxTransformer2DModel, cfg: DictConfig, training: bool,
                          lora_adapter: bool = True) -> AttentionPlan:
    """What trains (adapters too), gradient checkpointing, and the attention kernels to use."""
    plan = attention_plan(cfg.attention_backend)
    if training and cfg.base_quantization:
        quantize_base(transformer, cfg.base_quantization)  # before the adapters wrap the quantized linears
    if training or (lora_adapter and cfg.trainable == "lora"):
        select_trainable(transformer, cfg)
    if training and cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return plan


def quantize_base(transformer: FluxTransformer2DModel, kind: str) -> None:
    """The frozen base of a LoRA run in 8 bits (torchao, weight-only): the block linears hold int8 or fp8
    weights, about half the memory of bf16; PEFT's LoRA layers train on top of them in full precision.
    Inference and export use the unquantized base (the usual QLoRA practice)."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError("model.base_quantization needs torchao (pip install 'editflow[gpu]')") from None
    configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
    if kind == "fp8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise ValueError("model.base_quantization=fp8 needs a GPU with fp8 support (Ada/Hopper or newer); use int8")
    in_blocks = lambda module, name: isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
    quantize_(transformer, configs[kind](), filter_fn=in_blocks)


def compile_blocks(transformer: FluxTransformer2DModel) -> None:
    """Regional torch.compile: each FLUX block is compiled (all blocks of a kind share one graph), which
    compiles in seconds instead of minutes for the whole model and keeps checkpointing per block."""
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.compile()
