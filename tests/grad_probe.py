"""Gradients of one optimizer step, for test_distributed: two micro-batches either split over two
processes (one each) or taken by one process with gradient accumulation 2, the way the trainer steps.

    python tests/grad_probe.py OUT.pt 2                                  # 1 process, accumulation 2
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml tests/grad_probe.py OUT.pt 1
"""

import sys

import torch
from accelerate import Accelerator

from editflow import flow
from editflow.config import compose
from editflow.models.build import build_models


def micro_batch(index: int, qwen_dim: int):
    g = torch.Generator().manual_seed(index)
    x0, source, noise = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    states, mask = torch.randn(2, 7, qwen_dim, generator=g), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4 + index:] = False  # padded rows of different lengths
    sigmas = torch.rand(2, generator=g)
    return x0, noise, sigmas, source, states, mask, torch.ones(2)


def main(out: str, accumulation: int) -> None:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    models = build_models(compose(["model=tiny"]).model, seed=0, training=True)
    editor = acc.prepare(models.editor)
    qwen_dim = acc.unwrap_model(editor).connector.mlp[0].in_features
    indices = [acc.process_index] if acc.num_processes > 1 else range(accumulation)
    for index in indices:
        with acc.accumulate(editor):
            loss, _ = flow.training_loss(editor, *micro_batch(index, qwen_dim))
            acc.backward(loss)
    if acc.is_main_process:
        grads = {n: p.grad for n, p in acc.unwrap_model(editor).named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "sync": acc.sync_gradients}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
