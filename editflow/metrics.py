"""Training metrics: what a log window accumulates on the device, and where a logged step goes
(`metrics.jsonl`, wandb, the progress bar), on the main process."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from editflow import flow


@dataclasses.dataclass
class WindowStats:
    loss: float  # mean over the window's finite micro-batch losses, all ranks
    samples: int  # samples of all ranks
    seconds: float
    sigma_losses: dict[str, float]  # `loss/sigma_<bin>`: mean loss per noise-level bin

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class MetricsWindow:
    """Accumulated without a host sync; read (and reset) once per logged step."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.count = torch.zeros((), device=device)
        self.bins = torch.zeros(2, 4, device=device)
        self.samples, self.start = 0, time.time()

    def add(self, loss: torch.Tensor, losses: torch.Tensor, sigmas: torch.Tensor, samples: int) -> None:
        """One micro-batch: its mean loss, per-sample losses and sigmas, and its sample count (all ranks)."""
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.count += finite.float()
        self.samples += samples
        self.bins += flow.sigma_bin_losses(torch.nan_to_num(losses, 0.0, 0.0, 0.0), sigmas)

    def read(self, accelerator: Accelerator) -> WindowStats:
        """The window's numbers (every rank takes part: the loss is summed over them); then a new window."""
        total, count = accelerator.reduce(torch.stack([self.loss_sum, self.count]), "sum").tolist()
        loss_totals, counts = self.bins.tolist()
        stats = WindowStats(total / count if count else float("nan"), self.samples, time.time() - self.start,
                            {f"loss/sigma_{name}": t / c for name, t, c in
                             zip(flow.sigma_bin_names(), loss_totals, counts) if c})
        self.loss_sum.zero_()
        self.count.zero_()
        self.bins.zero_()
        self.samples, self.start = 0, time.time()
        return stats


class RunLog:
    """The progress bar, `metrics.jsonl` (one JSON object per logged step, with at least `step` and `loss`)
    and the wandb run (logging.wandb), written by the main process."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, cfg: DictConfig, initial_step: int):
        self.main = accelerator.is_main_process
        self.path = run_dir / "metrics.jsonl"
        self.pending: dict = {}  # metrics that go out with the next record (evaluation's)
        self.bar = tqdm(total=cfg.trainer.max_steps, initial=initial_step, desc="train", disable=not self.main,
                        dynamic_ncols=True)
        lcfg = cfg.logging
        self.wandb = None
        if self.main and lcfg.wandb:
            import wandb

            self.wandb = wandb.init(project=lcfg.project, name=lcfg.name, dir=str(run_dir), mode=lcfg.wandb_mode,
                                    resume="allow", id=lcfg.run_id or run_dir.name,
                                    config=OmegaConf.to_container(cfg, resolve=True))

    def write(self, record: dict) -> None:
        record.update(self.pending)
        self.pending = {}
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}")

    def image(self, name: str, image, caption: str, step: int) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(image, caption=caption)}, step=step)

    def close(self) -> None:
        """The training steps are over (the end of the run, or a stop with a checkpoint)."""
        self.bar.close()

    def finish(self, eval_result: dict) -> None:
        """The end of the run: wandb gets evaluation's headline numbers as its summary."""
        if self.wandb is not None:
            if eval_result:
                self.wandb.summary.update({f"eval/{k}": v for k, v in eval_result["model"].items() if "/" not in k})
            self.wandb.finish()
