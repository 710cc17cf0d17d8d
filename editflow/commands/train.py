"""`editflow train` / `python -m editflow.train` / `accelerate launch -m editflow.train`: one Hydra app."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from editflow import quiet

quiet.install()  # before editflow.config imports diffusers, whose import emits the notices
from editflow.config import CONFIG_DIR, compose, is_override, register, validate  # noqa: E402
from editflow.errors import ConfigError, EditflowError, report  # noqa: E402

register()


class RunDirectoryCheck(Callback):
    """Hydra creates the run directory before the app starts, and fails with a traceback where it cannot:
    this check (conf/config.yaml, hydra.callbacks) says so in one paragraph first."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(str(config.hydra.run.dir)).expanduser().absolute()
        parent = next(p for p in [run_dir, *run_dir.parents] if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            report("train", ConfigError(f"hydra.run.dir={run_dir}: cannot create the run directory ({parent} is "
                                        "not a writable directory); give another hydra.run.dir"))


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def train_app(cfg: DictConfig) -> None:
    from editflow.trainer import Trainer  # heavy imports after Hydra has parsed the command line

    run_dir = HydraConfig.get().runtime.output_dir
    trainer = None
    try:
        validate(cfg)  # bad values and unknown keys fail here, before any model loads
        OmegaConf.resolve(cfg)
        logging.getLogger(__name__).info("run directory: %s", run_dir)
        trainer = Trainer(cfg, run_dir)  # data, run directory and checkpoint checks come before the models
        OmegaConf.save(cfg, f"{run_dir}/config.yaml")  # after those checks: a refused run overwrites nothing
        trainer.train()
    except EditflowError as err:  # bad input: one paragraph, no traceback
        report("train", err)
    except KeyboardInterrupt as err:  # Ctrl-C outside the steps, or a second one within them
        newest = trainer.checkpointer.latest() if trainer is not None else None
        print(f"\neditflow train: interrupted{f' ({err})' if str(err) else ''}; newest checkpoint: "  # off the bar
              f"{newest or 'none'}{' (continue with trainer.resume=auto)' if newest else ''}", file=sys.stderr)
        sys.exit(130)
    if trainer.interrupted:  # Ctrl-C, then a checkpoint at the step boundary: nothing to requeue
        sys.exit(130)
    if trainer.preempted:  # the SLURM template requeues the job on this exit code
        sys.exit(int(cfg.trainer.preempt_exit_code))


def main(argv: list[str] | None = None) -> None:
    """`editflow train [overrides]`; without `argv` (python -m editflow.train) Hydra reads sys.argv itself."""
    args = sys.argv[1:] if argv is None else argv
    if all(is_override(arg) for arg in args):  # with Hydra's own flags (--cfg, -m, ...) Hydra reports errors
        try:  # composed and checked before Hydra makes the run directory, and in one paragraph, not Hydra's report
            validate(compose(args))
        except EditflowError as err:
            report("train", err)
    if argv is not None:
        sys.argv = ["editflow train", *argv]  # Hydra reads its overrides from sys.argv
    train_app()
