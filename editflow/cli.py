"""The `editflow` command: a table of commands, each a module of editflow/commands/ with `main(argv)`."""

from __future__ import annotations

import importlib
import sys

# name -> (module, usage lines)
COMMANDS = {
    "train": ("editflow.commands.train",
              ["editflow train [hydra overrides]   train (no overrides: tiny model on toy edits, CPU)"]),
    "data": ("editflow.commands.data", ["editflow data toy --out DIR --num N --seed S",
                                        "editflow data convert --format FORMAT INPUT... --out DIR",
                                        "editflow data verify DIR"]),
    "encode": ("editflow.commands.encode",
               ["editflow encode [hydra overrides] encode.out=DIR   pre-encode the training sets"]),
    "edit": ("editflow.commands.edit", ["editflow edit --model RUN --image IN --instruction TEXT --out OUT [...]"]),
    "eval": ("editflow.commands.eval", ["editflow eval --model RUN --data SHARDS --out metrics.json [--limit N]"]),
    "export": ("editflow.commands.export", ["editflow export RUN_OR_CHECKPOINT --out DIR [--merge-lora]"]),
    "slurm": ("editflow.commands.slurm", ["editflow slurm [hydra overrides] [--nodes N ...] [--dry-run]"]),
    "bench": ("editflow.commands.bench",
              ["editflow bench train [--model M --resolution R --batch B --steps N] [--out FILE.json]",
               "editflow bench data [--pairs N --rounds R] [hydra overrides] [--out FILE.json]"]),
}


def usage() -> str:
    lines = [f"  {line}" for _, lines in COMMANDS.values() for line in lines]
    return "\n".join([f"usage: editflow {{{','.join(COMMANDS)}}} ...", *lines,
                      "Hydra overrides (key=value) may stand anywhere on a command's line."])


def main(argv: list[str] | None = None) -> None:
    from editflow import quiet

    quiet.install()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
