"""Exponential moving average of the trainable weights, optionally kept in CPU memory."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, device: str | None = None):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().to(device or params[n].device, torch.float32, copy=True) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) * (param - shadow); `weight` (a 0-dim 0/1 tensor) scales that on the device,
        so an update skipped there without a host sync is skipped here too."""
        params = dict(model.named_parameters())
        current = [params[n].detach().to(s.device, torch.float32) for n, s in zip(self.names, self.shadow)]
        if weight is None:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
            return
        delta = torch._foreach_sub(current, self.shadow)
        torch._foreach_mul_(delta, weight.to(self.shadow[0].device) * (1.0 - self.decay))
        torch._foreach_add_(self.shadow, delta)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """The model runs with the averaged weights inside the block (evaluation); its own come back after."""
        params = dict(model.named_parameters())
        saved = [params[n].detach().clone() for n in self.names]
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow):
                params[name].copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, weights in zip(self.names, saved):
                    params[name].copy_(weights)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.to("cpu").contiguous() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
