"""Distributed plumbing: the Accelerator, DeepSpeed's settings, and frozen models kept whole under ZeRO-3."""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from omegaconf import DictConfig


def deepspeed_on_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()


def make_accelerator(tcfg: DictConfig) -> Accelerator:
    # accelerate's cpu=True turns DeepSpeed off, so DeepSpeed without CUDA (CPU tests) leaves it False
    use_cpu = tcfg.device == "cpu" or (not torch.cuda.is_available() and not deepspeed_on_cpu())
    # DeepSpeed without CUDA (CPU tests): accelerate only counts the processes when it is told the backend
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if deepspeed_on_cpu() else []
    # The schedule counts optimizer steps: accelerate must not step it once per process.
    return Accelerator(cpu=use_cpu, mixed_precision=tcfg.mixed_precision, step_scheduler_with_optimizer=False,
                       kwargs_handlers=kwargs)


def zero_stage(accelerator: Accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config.get("zero_optimization", {}).get("stage") if plugin else None


def shards_state(accelerator: Accelerator) -> bool:
    """DeepSpeed and FSDP shard optimizer state (and ZeRO-3/FSDP the weights): every rank saves its part."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def describe(accelerator: Accelerator) -> str:
    """'single process on cpu', 'DDP, 2 processes on cpu', 'DeepSpeed ZeRO-3, 8 processes on cuda', ..."""
    kind, n = accelerator.distributed_type, accelerator.num_processes
    if kind == DistributedType.NO:
        return f"single process on {accelerator.device.type}"
    name = {DistributedType.DEEPSPEED: f"DeepSpeed ZeRO-{zero_stage(accelerator)}", DistributedType.FSDP: "FSDP"}.get(
        kind, "DDP")
    return f"{name}, {n} process{'es' if n > 1 else ''} on {accelerator.device.type}"


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, accumulation: int, global_batch: int,
                        grad_clip: float) -> None:
    """Our batch arithmetic and clipping, not the launcher file's, decide DeepSpeed's batch settings."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": micro_batch,
                                    "gradient_accumulation_steps": accumulation,
                                    "train_batch_size": global_batch, "gradient_clipping": grad_clip})
    # ZeRO-3 must gather the partitioned weights for model.safetensors in each checkpoint
    plugin.deepspeed_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def frozen_models_unpartitioned(accelerator: Accelerator):
    """Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, whose from_pretrained then
    partitions Qwen at load (zero.Init). Qwen is frozen and stays outside the DeepSpeed engine, so nothing
    would gather it again: it is loaded whole. The trainable editor is partitioned by `prepare`."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
