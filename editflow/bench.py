"""`editflow bench train`: time editflow's training step against the diffusers-example way of stepping
the same model, on synthetic Kontext inputs, and report samples/s, tokens/s, MFU and peak memory.

    editflow bench train                                    # tiny config on the CPU (CI smoke test)
    editflow bench train --model kontext_real_width --resolution 1024 --batch 1 --steps 20
    editflow bench train experiment=lora_24gb --full-depth --resolution 1024 --memory-cap-gb 24 --only editflow

Both variants build the same architecture with the same random weights (the speed of a step does not
depend on the weights, so nothing is downloaded) and step it on the same inputs:

- editflow: the configured attention kernel, torch.compile of every FLUX block (on CUDA), fused AdamW
  (or the configured 8-bit AdamW) that skips a non-finite update on the device, no host sync in the step;
- reference: what diffusers' Kontext training example does: default attention, eager, unfused
  AdamW, and `loss.item()` every step.

Encoders are not timed (editflow pre-encodes or caches them); MFU counts the FLOPs of the actual step
with torch.utils.flop_counter against the device's measured dense matmul peak.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from editflow import flow
from editflow.config import compose, validate_groups
from editflow.guard import NonFiniteGuard
from editflow.models.build import (ASSETS, build_editor, compile_blocks, configure_transformer, keep_trainable_in_fp32,
                                   qwen_hidden_size, torch_dtype)
from editflow.models.editor import KontextEditor
from editflow.optim import build_optimizer
from editflow.throughput import count_step_flops, device_peak_tflops

RESULTS = Path("bench") / "results"  # relative to where the command runs (the repo root in the README)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this device in `dtype` (TFLOP/s): the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    iters = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transformer_config(model_cfg, layers: int | None, single_layers: int | None) -> dict:
    """The architecture only: the config's own, or the published FLUX.1-Kontext-dev one for a hub model."""
    from omegaconf import OmegaConf

    if model_cfg.transformer.config:
        config = OmegaConf.to_container(model_cfg.transformer.config, resolve=True)
    else:
        config = json.loads((ASSETS / "configs" / "flux1-kontext-dev-transformer.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["axes_dims_rope"] = tuple(config.get("axes_dims_rope", (16, 56, 56)))
    if layers is not None:
        config["num_layers"] = layers
    if single_layers is not None:
        config["num_single_layers"] = single_layers
    return config


def random_editor(cfg, arch: dict, device: torch.device, reference: bool) -> KontextEditor:
    """The editor training builds (models/build.py), with the architecture `arch`, random weights made in
    place on `device` (a 12B model is not built on the CPU first), and nothing loaded."""
    from diffusers import FluxTransformer2DModel
    from omegaconf import OmegaConf

    mcfg = OmegaConf.merge(cfg.model, {"attention_backend": "native"} if reference else {})
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**arch).to(torch_dtype(mcfg.dtype))
    plan = configure_transformer(transformer, mcfg, training=True)
    editor = build_editor(mcfg, transformer, plan, qwen_hidden_size(mcfg.qwen.pretrained), training=True)
    keep_trainable_in_fp32(editor, mcfg)
    return editor.train()


def synthetic_batch(editor: KontextEditor, batch: int, resolution: int, text_tokens: int, device) -> tuple:
    """Inputs of one micro-batch at `resolution`^2: latents (packed 2x2 -> (res/16)^2 tokens each for the
    target and the source), Qwen states of `text_tokens`, sigmas and the guidance value."""
    side = resolution // 8
    channels = editor.transformer.config.in_channels // 4
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device)
    x0, source, noise = make(batch, channels, side, side), make(batch, channels, side, side), make(batch, channels, side, side)
    states = make(batch, text_tokens, editor.connector.sizes["qwen_dim"])
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    sigmas = torch.rand(batch, generator=g).to(device)
    return x0, noise, sigmas, source, states, mask, torch.ones(batch, device=device)


def make_optimizer(editor: KontextEditor, cfg, reference: bool) -> torch.optim.Optimizer:
    params = [p for p in editor.parameters() if p.requires_grad]
    if reference:  # torch's default AdamW (foreach, unfused), as in diffusers' example
        return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                 weight_decay=cfg.optim.weight_decay)
    return build_optimizer(params, cfg.optim)


def time_variant(cfg, arch: dict, args, device: torch.device, reference: bool, peak: float) -> dict:
    editor = random_editor(cfg, arch, device, reference)
    if not reference and args.compile:
        compile_blocks(editor.transformer)
    optimizer = make_optimizer(editor, cfg, reference)
    inputs = synthetic_batch(editor, args.batch, args.resolution, args.text_tokens, device)
    params = [p for p in editor.parameters() if p.requires_grad]
    # editflow's trainer skips a non-finite update (on the device with fused AdamW): timed with the step
    guard = None if reference else NonFiniteGuard(optimizer, 1, device, NonFiniteGuard.supports_sync_free(optimizer))

    def step() -> torch.Tensor:
        loss, _ = flow.training_loss(editor, *inputs)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)  # both clip, as the example
        if guard is None or guard.verdict(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()), 0, []):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reference:
            loss.item()  # the example logs the loss every step: one host sync per step
        return loss

    for _ in range(args.warmup):
        step()
    _, flops = count_step_flops(step)  # as training counts its step
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - start
    tokens = args.batch * (2 * (args.resolution // 16) ** 2 + args.text_tokens)
    result = {
        "samples_per_s": args.batch * args.steps / elapsed,
        "tokens_per_s": tokens * args.steps / elapsed,
        "step_s": elapsed / args.steps,
        "tflops_per_s": flops * args.steps / elapsed / 1e12,
        "mfu": flops * args.steps / elapsed / 1e12 / peak,
        "peak_mem_gb": _peak_memory_gb(device),
        "flops_per_step": flops,
        "final_loss": float(loss),
        "trainable_params": sum(p.numel() for p in editor.parameters() if p.requires_grad),
        "attention": "native" if reference else editor.attention_backend[0],
        "compiled": bool(not reference and args.compile),
        "optimizer": type(optimizer).__name__ + ("" if reference else f"(fused={_fused(optimizer)})"),
    }
    return result


def _fused(optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # process peak RSS (KiB -> GB) on Linux


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = ([f"model={args.model}"] if args.model else []) + overrides
    cfg = compose(overrides)
    if device.type == "cpu":  # the CPU has no bf16 tensor cores worth timing: fp32, plain attention
        cfg.model.dtype = "float32"
        cfg.model.attention_backend = "native"
    validate_groups(cfg, ("model", "optim", "objective"))  # not the checks that span groups: any model on any device
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.memory_cap_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb / total), device)
    arch = transformer_config(cfg.model, None if args.full_depth else args.layers,
                              None if args.full_depth else args.single_layers)
    dtype = torch_dtype(cfg.model.dtype)
    peak = measure_peak_tflops(device, dtype if device.type == "cuda" else torch.float32)
    result = {"device": device_name(device), "date": datetime.date.today().isoformat(),
              "command": "editflow bench train " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "train"] else []),
              "peak_tflops": peak, "peak_tflops_spec": device_peak_tflops() if device.type == "cuda" else None,
              "setup": {"model": cfg.model.name, "resolution": args.resolution, "batch": args.batch,
                        "text_tokens": args.text_tokens, "steps": args.steps, "warmup": args.warmup,
                        "layers": arch["num_layers"], "single_layers": arch["num_single_layers"],
                        "hidden": arch["num_attention_heads"] * arch["attention_head_dim"],
                        "dtype": str(dtype).replace("torch.", ""), "trainable": cfg.model.trainable,
                        "gradient_checkpointing": cfg.model.gradient_checkpointing,
                        "optimizer": cfg.optim.name, "memory_cap_gb": args.memory_cap_gb,
                        "torch": torch.__version__, "overrides": overrides}}
    for variant in ("editflow", "reference"):
        if args.only in (None, variant):
            print(f"[bench] timing {variant} ...", file=sys.stderr)
            result[variant] = time_variant(cfg, arch, args, device, variant == "reference", peak)
            gc.collect()  # the variant's model and optimizer, before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "editflow" in result and "reference" in result:
        result["speedup"] = result["editflow"]["samples_per_s"] / result["reference"]["samples_per_s"]
    return result


def default_out(result: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")[:40]
    return RESULTS / f"{result['date']}-{slug}.json"
