"""`editflow train` / `python -m editflow.train` / `accelerate launch -m editflow.train`: one Hydra app."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from editflow import quiet

quiet.install()  # before editflow.config imports diffusers, whose import emits the notices
from editflow.config import CONFIG_DIR, register_resolvers  # noqa: E402

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from editflow.trainer import Trainer  # heavy imports after Hydra has parsed the command line
    from editflow.validate import ConfigError, validate

    run_dir = HydraConfig.get().runtime.output_dir
    OmegaConf.resolve(cfg)
    try:
        validate(cfg)  # bad values fail here, before any model loads
    except ConfigError as err:
        logging.getLogger(__name__).error("invalid config: %s", err)
        raise
    OmegaConf.save(cfg, f"{run_dir}/config.yaml")
    logging.getLogger(__name__).info("run directory: %s", run_dir)
    trainer = Trainer(cfg, run_dir)
    trainer.train()
    if trainer.preempted:  # the SLURM template requeues the job on this exit code
        sys.exit(int(cfg.trainer.preempt_exit_code))


if __name__ == "__main__":
    main()
