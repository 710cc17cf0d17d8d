"""The `editflow` command: train, data."""

from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> None:
    from editflow import train

    sys.argv = ["editflow train", *argv]  # Hydra reads its overrides from sys.argv
    train.main()


def _data(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="editflow data", description="Make and check WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="write procedurally generated toy edits as shards")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--num", type=int, default=1000, help="number of samples")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--size", type=int, default=64, help="image size in pixels (multiple of 8)")
    toy.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "toy":
        from editflow.data.toy_shards import write_toy_shards

        out = write_toy_shards(args.out, args.num, seed=args.seed, size=args.size,
                               samples_per_shard=args.samples_per_shard)
        print(f"wrote {args.num} toy edits to {out}")


COMMANDS = {"train": _train, "data": _data}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: editflow {train,data} ...\n"
              "  editflow train [hydra overrides]   train (no overrides: tiny model on toy edits, CPU)\n"
              "  editflow data toy --out DIR --num N --seed S", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
