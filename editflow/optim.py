"""The optimizer and its learning-rate schedule, built from the `optim` config node."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

OPTIMIZERS = ("adamw", "adamw8bit", "adamw8bit_torchao")
SCHEDULES = ("cosine", "constant")


def build_optimizer(params: list[torch.Tensor], ocfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernels), or an 8-bit AdamW for the 24 GB mode: bitsandbytes' (CUDA) or torchao's
    (any device; block-wise 8-bit moments, small tensors kept in fp32)."""
    kwargs = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    name = ocfg.name
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes (pip install 'editflow[gpu]'); "
                              "optim.name=adamw8bit_torchao needs only torchao") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "adamw8bit_torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ImportError("optim.name=adamw8bit_torchao needs torchao (pip install 'editflow[gpu]')") from None
        return AdamW8bit(params, **kwargs)
    # fused kernels (one launch for all tensors, and `found_inf` for skipping a step without a host sync)
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def build_schedule(optimizer: torch.optim.Optimizer, ocfg: DictConfig, max_steps: int):
    """Linear warm-up, then constant or cosine down to `optim.min_lr`; it counts optimizer steps."""
    if ocfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=ocfg.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=ocfg.warmup_steps,
                                                       num_training_steps=max_steps, min_lr=ocfg.min_lr)
