"""Non-finite steps: a NaN/inf loss or gradient norm must never reach the weights.

With fused AdamW the verdict stays on the accelerator: the optimizer's `found_inf` tensor makes the
fused kernel skip the whole update (as torch's GradScaler uses it), so an optimizer step needs no host
sync; the counters are read on logging steps, where a run of `max_in_row` skipped steps stops training.
Other optimizers (the 8-bit AdamWs, DeepSpeed's) read the verdict on the host, once per
optimizer step. Either way the update is skipped and counted; the sync-free path still advances the
lr schedule on a skipped step (the schedule counts optimizer steps taken or skipped).
"""

from __future__ import annotations

import collections
import logging

import torch

log = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, max_in_row: int, device, sync_free: bool,
                 skipped: int = 0, window: int = 1):
        self.optimizer, self.max_in_row, self.sync_free = optimizer, max_in_row, sync_free
        self.skipped = torch.tensor(float(skipped), device=device)
        self.in_row = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)  # longest run of skipped steps since the last check
        self.last_bad = torch.zeros((), device=device)  # step number of the latest skipped step
        self.recent: collections.deque = collections.deque(maxlen=max(window, max_in_row) + 1)
        self.reported = skipped

    @staticmethod
    def supports_sync_free(optimizer: torch.optim.Optimizer) -> bool:
        return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped.item())

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        skipped = state.get("skipped_steps", 0)  # absent from checkpoints of runs before the guard
        self.skipped.fill_(skipped)
        self.reported = skipped

    def verdict(self, finite: torch.Tensor, step: int, keys: list[str]) -> bool:
        """Record optimizer step `step`'s verdict (`finite`: 1.0, or 0.0 when the loss or gradient norm of
        any rank was not finite). Returns whether to apply the update: sync-free, always (the fused kernel
        skips it by itself); otherwise the host's reading of `finite`."""
        self.recent.append((step, keys))
        bad = 1.0 - finite.float()
        if self.sync_free:
            self.optimizer.found_inf = bad
            self.skipped += bad
            self.in_row.add_(1).mul_(bad)
            torch.maximum(self.longest, self.in_row, out=self.longest)
            self.last_bad.copy_(torch.where(bad > 0, float(step), self.last_bad))
            return True
        if bool(finite):  # the optimizer step's one host sync
            self.in_row.zero_()
            return True
        self.skipped += 1
        self.in_row += 1
        self.longest.fill_(torch.maximum(self.longest, self.in_row))
        self.last_bad.fill_(step)
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)", step,
                    int(self.in_row.item()))
        self.check()
        return False

    def check(self) -> None:
        """Stop the run after `max_in_row` skipped steps in a row (sync-free: called on logging steps)."""
        longest = int(self.longest.item())
        self.longest.zero_()
        if self.sync_free and self.skipped_steps > self.reported:
            log.warning("%d update(s) with a non-finite loss or gradient skipped so far (the latest at step %d)",
                        self.skipped_steps, int(self.last_bad.item()))
            self.reported = self.skipped_steps
        if longest < self.max_in_row:
            return
        step = int(self.last_bad.item())
        keys = next((k for s, k in reversed(self.recent) if s == step), [])
        raise FloatingPointError(
            f"{longest} steps in a row had a non-finite loss or gradient norm, the last at step {step} "
            f"(samples {keys[:8]}{' ...' if len(keys) > 8 else ''}); stopping")
