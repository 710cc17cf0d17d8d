"""`editflow export RUN_OR_CHECKPOINT --out DIR [--merge-lora]` (the work: editflow/export.py)."""

from __future__ import annotations

import argparse

from editflow import export as exporting
from editflow.errors import EditflowError, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow export", description=exporting.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory (newest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run: fold the adapter into the weights and export a full transformer")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    args = parser.parse_args(argv)
    try:
        out = exporting.export(args.source, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite)
    except (EditflowError, FileNotFoundError) as err:
        report("export", err, code=2)
    print(f"exported {args.source} -> {out}")
