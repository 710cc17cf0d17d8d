"""`editflow slurm`: render (and submit) an sbatch for a training run from launch/slurm/*.sbatch.

    editflow slurm experiment=gpt_image_edit_8xa100 --nodes 2 --partition gpu --time 48:00:00 --dry-run

Hydra overrides (key=value) may stand anywhere on the line, or after `--`. They are composed first, so a
bad value fails here, not hours later in the queue. The job continues its run directory with
trainer.resume=auto, checkpoints on SLURM's USR1 warning and is requeued until training finishes.
"""

from __future__ import annotations

import argparse
import shlex
import string
from pathlib import Path

from editflow.config import CONFIG_DIR, check_world_size, compose, validate

TEMPLATES = CONFIG_DIR.parent / "launch" / "slurm"
ACCELERATE_CONFIGS = CONFIG_DIR.parent / "launch" / "accelerate"


def render(args: argparse.Namespace, overrides: list[str]) -> str:
    cfg = compose(overrides)
    # as `editflow train` would: bad keys and values fail here, not in the queue (paths are the job's to read)
    validate(cfg, files=False)
    world = args.nodes * args.gpus_per_node
    check_world_size(cfg, world)
    template = "single_node.sbatch" if args.nodes == 1 else "multi_node.sbatch"
    accelerate_config = args.accelerate_config or str(ACCELERATE_CONFIGS / cfg.launcher.accelerate_config)
    extra = [f"#SBATCH --partition={args.partition}"] if args.partition else []
    extra += [f"#SBATCH --account={args.account}"] if args.account else []
    extra += [f"#SBATCH {line}" for line in args.sbatch]
    values = {
        "job_name": args.job_name, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
        "total_processes": world, "cpus_per_task": args.cpus_per_task, "time": args.time,
        "signal_lead": args.signal_lead, "run_dir": str(Path(args.run_dir).resolve()), "workdir": args.workdir,
        "setup": args.setup, "exit_code": cfg.trainer.preempt_exit_code, "accelerate_config": accelerate_config,
        "overrides": " ".join(shlex.quote(o) for o in overrides), "extra_sbatch": "\n".join(extra),
    }
    return string.Template((TEMPLATES / template).read_text()).substitute(values)
