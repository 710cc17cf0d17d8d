"""Config checks that run before anything heavy loads; every error names the offending key."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from editflow.errors import ConfigError
from editflow.flow import LOSS_WEIGHTING, REGION_WEIGHTING, SIGMA_SAMPLING
from editflow.models.build import DTYPES

__all__ = ["ConfigError", "check_world_size", "validate"]


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: DictConfig, training: bool = True) -> None:
    """Check the values of a composed config before any model loads. `training=False` (`editflow encode`)
    skips what only a training run needs (a stage-2 preset's `model.connector.init_from`)."""
    t, o = cfg.trainer, cfg.optim
    for key in ("global_batch_size", "micro_batch_size", "max_steps", "log_every"):
        _require(isinstance(t[key], int) and t[key] > 0, f"trainer.{key}", f"must be a positive integer, got {t[key]!r}")
    _require(t.global_batch_size % t.micro_batch_size == 0, "trainer.global_batch_size",
             f"{t.global_batch_size} is not divisible by trainer.micro_batch_size={t.micro_batch_size}")
    _require(t.mixed_precision in ("no", "bf16", "fp16"), "trainer.mixed_precision",
             f"expected no, bf16 or fp16, got {t.mixed_precision!r}")
    _require(t.resume in (None, "auto") or isinstance(t.resume, str), "trainer.resume",
             f"expected auto, a checkpoint path or null, got {t.resume!r}")
    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be between 0 and optim.lr={o.lr}, got {o.min_lr}")
    _require(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, "optim.warmup_steps",
             f"must be a non-negative integer, got {o.warmup_steps!r}")
    _require(o.get("schedule", "cosine") in ("cosine", "constant"), "optim.schedule",
             f"expected cosine or constant, got {o.get('schedule')!r}")
    _require(o.get("name", "adamw") in ("adamw", "adamw8bit", "adamw8bit_torchao"), "optim.name",
             f"expected adamw, adamw8bit or adamw8bit_torchao, got {o.get('name')!r}")
    obj = cfg.objective
    _require(obj.sigma_sampling in SIGMA_SAMPLING, "objective.sigma_sampling",
             f"expected one of {', '.join(SIGMA_SAMPLING)}, got {obj.sigma_sampling!r}")
    _require(obj.logit_std > 0, "objective.logit_std", f"must be positive, got {obj.logit_std}")
    _require(obj.loss_weighting in LOSS_WEIGHTING, "objective.loss_weighting",
             f"expected one of {', '.join(LOSS_WEIGHTING)}, got {obj.loss_weighting!r}")
    _require(obj.get("region_weighting", "none") in REGION_WEIGHTING, "objective.region_weighting",
             f"expected one of {', '.join(REGION_WEIGHTING)}, got {obj.get('region_weighting')!r}")
    drops = [obj.drop_text, obj.drop_image, obj.drop_both]
    for key, p in zip(("drop_text", "drop_image", "drop_both"), drops):
        _require(0 <= p <= 1, f"objective.{key}", f"must be a probability in [0, 1], got {p}")
    _require(sum(drops) <= 1, "objective.drop_both",
             f"objective.drop_text + drop_image + drop_both must not exceed 1, got {sum(drops)}")
    d = cfg.data
    _require(d.kind in ("toy", "shards"), "data.kind", f"expected toy or shards, got {d.kind!r}")
    for key in ("train", "val"):
        _require(d.kind != "toy" or d.get(key) is None, f"data.{key}",
                 f"the toy data (data=toy, the default) has no data.{key} and would ignore it; add data=shards to "
                 f"train on shards: editflow train data=shards data.{key}=DIR ...")
    _require(d.kind != "shards" or not OmegaConf.is_missing(d, "train"), "data.train",
             "is not set: give a shard directory (editflow data convert --out), a list of them, or "
             "{name: {path: DIR, weight: W}}")
    _require(d.bucket_base % 16 == 0, "data.bucket_base", f"must be a multiple of 16, got {d.bucket_base}")
    _require(0 <= d.max_skip_rate < 1, "data.max_skip_rate", f"must be in [0, 1), got {d.max_skip_rate}")
    for key in ("num_workers", "decode_threads"):
        _require(isinstance(d.get(key, 0), int) and d.get(key, 0) >= 0, f"data.{key}",
                 f"must be a non-negative integer, got {d.get(key)!r}")
    m = cfg.model
    for key in ("dtype", "frozen_dtype"):
        _require(m.get(key, "float32") in DTYPES, f"model.{key}", f"expected one of {sorted(DTYPES)}")
    _require(m.get("trainable", "full") in TRAINABLE, "model.trainable",
             f"expected one of {', '.join(TRAINABLE)}, got {m.get('trainable')!r}")
    _validate_connector(m.connector, training)
    _require(m.get("dtype", "float32") in ("float32", "fp32") or m.get("trainable", "full") != "full"
             or _deepspeed(cfg) or o.get("allow_low_precision_weights", False), "model.dtype",
             f"a full fine-tune with model.dtype={m.get('dtype')} outside DeepSpeed runs AdamW on {m.get('dtype')} "
             "weights, where updates smaller than their rounding are lost. Use launcher=deepspeed_zero2/3 (fp32 "
             "master weights), or model.dtype=float32 with trainer.mixed_precision=bf16 (FSDP2, DDP), or set "
             "optim.allow_low_precision_weights=true to train this way anyway")
    _require(m.get("base_quantization") in (None, "int8", "fp8"), "model.base_quantization",
             f"expected int8, fp8 or null, got {m.get('base_quantization')!r}")
    _require(not m.get("base_quantization") or m.get("trainable") == "lora", "model.base_quantization",
             "quantizes the frozen base of a LoRA run: needs model.trainable=lora")


TRAINABLE = ("full", "lora", "reference_attention", "connector")


def _deepspeed(cfg: DictConfig) -> bool:
    """Whether DeepSpeed runs this job: launched with a DeepSpeed accelerate config, or a DeepSpeed launcher preset."""
    return (os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
            or str(cfg.get("launcher", {}).get("name", "")).startswith("deepspeed"))


def _validate_connector(c: DictConfig, training: bool) -> None:
    from editflow.models.connector import CONNECTOR_KINDS

    if training and c.get("init_from") == "required":
        raise ConfigError(
            "model.connector.init_from: this preset is stage 2 of the two-stage recipe and starts from the connector "
            "that stage 1 trained: run `editflow train experiment=align_connector ...` first and pass its run "
            "directory (or a checkpoint, an export, or the public GPT-Image-Edit projector file with "
            "model.connector.kind=reference) as model.connector.init_from=PATH; model.connector.init_from=null "
            "starts from a fresh connector instead (README: the two-stage recipe)")
    _require(c.get("kind", "mlp") in CONNECTOR_KINDS, "model.connector.kind",
             f"expected one of {', '.join(CONNECTOR_KINDS)}, got {c.get('kind')!r}")
    std = c.get("token_std", 1.0)
    _require(std == "from_base" or (isinstance(std, (int, float)) and std > 0), "model.connector.token_std",
             f"expected a positive number or from_base, got {std!r}")


def check_world_size(cfg: DictConfig, world_size: int) -> int:
    """Gradient accumulation for this world size; the global batch must split evenly."""
    t = cfg.trainer
    per_step = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_step == 0, "trainer.global_batch_size",
             f"{t.global_batch_size} is not divisible by trainer.micro_batch_size={t.micro_batch_size} x "
             f"world size {world_size} = {per_step}")
    return t.global_batch_size // per_step
