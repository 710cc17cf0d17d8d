"""`editflow slurm [hydra overrides] [--nodes N ...] [--dry-run]` (the sbatch script: editflow/slurm.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from editflow import slurm
from editflow.config import parse_with_overrides
from editflow.errors import report


def count(minimum: int):
    """An argparse type: an integer of at least `minimum` (argparse names the option when it is not)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse's message: "invalid integer value: ..."
    return parse


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="editflow slurm", description=slurm.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=count(1), default=1)
    parser.add_argument("--gpus-per-node", type=count(1), default=8)
    parser.add_argument("--cpus-per-task", type=count(1), default=64)
    parser.add_argument("--time", default="48:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="editflow")
    parser.add_argument("--run-dir", default=f"runs/slurm-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--workdir", default=str(Path.cwd()))
    parser.add_argument("--setup", default="source .venv/bin/activate 2>/dev/null || true",
                        help="shell lines run before training (modules, venv, env vars)")
    parser.add_argument("--signal-lead", type=count(0), default=300, help="seconds before the limit to checkpoint")
    parser.add_argument("--accelerate-config", help="default: launch/accelerate/<launcher.accelerate_config>")
    parser.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH option, e.g. --qos=high")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    args, overrides = parse_with_overrides(parser, argv)
    try:
        script = slurm.render(args, overrides)
    except Exception as err:  # noqa: BLE001 - config errors are reported, not traced
        report("slurm", err, code=2)
    if args.dry_run:
        print(script)
        return
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    subprocess.run(["sbatch", str(path)], check=True)
