"""Exponential moving average of the trainable weights, optionally kept in CPU memory."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

NUM_UPDATES = "num_updates"  # the one entry of an EMA's state that is not a weight


class EMA:
    def __init__(self, model: nn.Module, decay: float, device: str | None = None, warmup: bool = True):
        self.decay = decay
        # Warm-up: the n-th update uses min(decay, (1 + n) / (10 + n)), so a short run's average is not
        # mostly its random start (0.995 ** 200 = 0.37 without it); a long run's reaches `decay` soon.
        self.warmup = warmup
        self.num_updates = 0
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().to(device or params[n].device, torch.float32, copy=True) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module, weight: torch.Tensor | None = None) -> None:
        """shadow += (1 - decay) * (param - shadow); `weight` (a 0-dim 0/1 tensor) scales that on the device,
        so an update skipped there without a host sync is skipped here too."""
        params = dict(model.named_parameters())
        current = [params[n].detach().to(s.device, torch.float32) for n, s in zip(self.names, self.shadow)]
        decay = self.current_decay()
        self.num_updates += 1
        if weight is None:
            torch._foreach_lerp_(self.shadow, current, 1.0 - decay)
            return
        delta = torch._foreach_sub(current, self.shadow)
        torch._foreach_mul_(delta, weight.to(self.shadow[0].device) * (1.0 - decay))
        torch._foreach_add_(self.shadow, delta)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

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
        """The averaged weights by parameter name, and `num_updates` (the warm-up's position)."""
        state = {n: s.to("cpu").contiguous() for n, s in zip(self.names, self.shadow)}
        return {**state, NUM_UPDATES: torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])
        # an EMA saved before the warm-up existed had long passed it
        self.num_updates = int(state[NUM_UPDATES]) if NUM_UPDATES in state else 10**9
