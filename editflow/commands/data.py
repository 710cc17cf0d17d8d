"""`editflow data toy|convert|verify`: make and check WebDataset shards."""

from __future__ import annotations

import argparse
import os
import sys

from editflow.data.toy import SIZE_RULE, valid_size, weighted_kinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow data", description="Make and check WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="write procedurally generated toy edits as shards")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--num", type=int, default=1000, help="number of samples")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--size", type=int, default=64, help="image size in pixels (a multiple of 8, at least 24)")
    toy.add_argument("--samples-per-shard", type=int, default=1000)
    toy.add_argument("--kind-weights", default="", metavar="KIND=N,...",
                     help="edits of each kind per cycle, e.g. recolor=2,move=0 (kinds not named: 1)")

    conv = sub.add_parser("convert", help="convert a dataset into validated shards",
                          epilog="Hydra overrides among the inputs (model=..., model.qwen.pretrained=/local/qwen, "
                                 "experiment=...) choose the model config whose tokenizer and budget count "
                                 "over-long instructions (default model=kontext_qwen25vl_7b).")
    conv.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="dataset folder(s), downloaded archive(s) (.tar, .tar.gz.partNNN), a data list (data.txt) "
                           "or metadata .json/.jsonl file(s)")
    conv.add_argument("--format", required=True, choices=["gpt-image-edit", "llava-edit", "sharegpt4o", "jsonl"])
    conv.add_argument("--out", required=True)
    conv.add_argument("--samples-per-shard", type=int, default=1000)
    conv.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    conv.add_argument("--image-root", help="folder image paths are relative to (default: next to the json)")
    conv.add_argument("--min-side", type=int, default=256, help="reject images with a shorter short side")
    conv.add_argument("--max-aspect-change", type=float, default=0.25,
                      help="allowed relative difference of source and target aspect ratios")
    conv.add_argument("--max-instruction-chars", type=int, default=2000)
    conv.add_argument("--max-instruction-tokens", type=int, default=None,
                      help="count instructions longer than this many Qwen tokens (default: the model config's "
                           "budget at its pixel budget; 0: do not count)")
    conv.add_argument("--bucket-base", type=int, default=1024, help="base resolution of the bucket histogram")
    conv.add_argument("--memory-budget", default="2G",
                      help="archives: memory for images held until their record is complete; beyond it they "
                           "spill to OUT/.scratch (default 2G)")
    conv.add_argument("--source-key", help="jsonl format: field holding the source image (default: source, and a "
                                           "record without it is text-to-image; a key given here must be in every "
                                           "record)")
    for key in ("target", "instruction", "id"):
        conv.add_argument(f"--{key}-key", default=key, help=f"jsonl format: field holding the {key}")
    conv.add_argument("--dataset", help="jsonl format: dataset name stored in each sample")

    ver = sub.add_parser("verify", help="check shards against manifest.json (sha256, counts, stray files)")
    ver.add_argument("directory")

    args = parser.parse_args(argv)
    if problem := bad_option(args):  # before anything is read or written: a usage error (exit 2)
        sub.choices[args.command].error(problem)
    from editflow.data.errors import DataError
    from editflow.errors import EditflowError

    try:
        if args.command == "toy":
            from editflow.data.toy_shards import write_toy_shards

            out = write_toy_shards(args.out, args.num, seed=args.seed, size=args.size,
                                   samples_per_shard=args.samples_per_shard, kinds=kinds_from_spec(args.kind_weights))
            print(f"wrote {args.num} toy edits to {out}")
        elif args.command == "convert":
            convert(args)
        elif args.command == "verify":
            from editflow.data.convert import verify

            problems = verify(args.directory)
            for problem in problems:
                print(f"PROBLEM {problem}", file=sys.stderr)
            if problems:
                sys.exit(1)
            print(f"{args.directory}: all shards match the manifest")
    except (DataError, EditflowError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


def bad_option(args: argparse.Namespace) -> str | None:
    """What is wrong with the first option value that cannot work, or None."""
    at_least_1 = lambda value: value >= 1  # noqa: E731
    if args.command == "toy":
        rules = [("--num", args.num, at_least_1, "at least 1"),
                 ("--size", args.size, valid_size, SIZE_RULE),
                 ("--samples-per-shard", args.samples_per_shard, at_least_1, "at least 1")]
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            return f"--out {args.out} is a file; give a folder for the shards"
        try:
            kinds_from_spec(args.kind_weights)
        except ValueError as err:
            return f"--kind-weights {args.kind_weights}: {err}"
    elif args.command == "convert":
        rules = [("--samples-per-shard", args.samples_per_shard, at_least_1, "at least 1"),
                 ("--workers", args.workers, at_least_1, "at least 1"),
                 ("--min-side", args.min_side, lambda v: v >= 0, "at least 0 (pixels)"),
                 ("--max-aspect-change", args.max_aspect_change, lambda v: v >= 0, "at least 0 (0: the same shape)")]
    else:
        rules = []
    return next((f"{name} must be {what}, got {value}" for name, value, ok, what in rules if not ok(value)), None)


def kinds_from_spec(spec: str) -> tuple[str, ...]:
    """The kind cycle of --kind-weights "recolor=2,move=0" (ValueError: what is wrong with it)."""
    weights = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"{item!r} is not KIND=N with N a whole number >= 0")
        weights[kind.strip()] = int(count)
    return weighted_kinds(weights)


def convert(args: argparse.Namespace) -> None:
    import re

    from editflow.data.archives import parse_size
    from editflow.data.convert import Validation
    from editflow.data.convert import convert as convert_dataset
    from editflow.data.errors import DataError
    from editflow.data.tokens import budget_from_model

    is_override = lambda a: re.match(r"^[+~]?[A-Za-z_][\w.]*=", a) and not os.path.exists(a)  # noqa: E731
    overrides, inputs = [a for a in args.inputs if is_override(a)], [a for a in args.inputs if not is_override(a)]
    if not inputs:
        raise DataError("no input given: name the dataset folder, archives or metadata files to convert.")
    budget = None
    if args.max_instruction_tokens != 0:
        try:
            budget = budget_from_model(overrides, args.max_instruction_tokens)
        except DataError as err:
            if overrides or args.max_instruction_tokens is not None:
                raise
            print(f"note: instruction tokens are not counted: {err}", file=sys.stderr)
    rules = Validation(args.min_side, args.max_aspect_change, args.max_instruction_chars, args.bucket_base)
    options = {"image_root": args.image_root}
    if args.format == "jsonl":
        options.update(source_key=args.source_key or "source", target_key=args.target_key,
                       instruction_key=args.instruction_key, id_key=args.id_key, dataset=args.dataset)
        if args.source_key is not None:  # named on purpose: a record without it is a reject, not text-to-image
            options["source_required"] = True
    manifest = convert_dataset(args.format, inputs, args.out, args.samples_per_shard, args.workers, rules,
                               memory_budget=parse_size(args.memory_budget), tokens=budget, **options)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards -> {args.out} (listed in "
          f"manifest.json; `editflow data verify {args.out}` checks them)")
    # said every time: a --source-key that matches no record would otherwise pass silently as text-to-image
    print(f"text-to-image (no source image): {manifest['text_to_image']} of the {manifest['num_samples']} samples")
    print(f"{manifest['num_rejected']} records rejected -> {os.path.join(args.out, 'rejects.jsonl')}")
    for reason, count in sorted(manifest["reject_reasons"].items(), key=lambda kv: -kv[1]):
        print(f"  {reason}: {count}")
    if manifest.get("ids_reused"):
        print(f"{manifest['ids_reused']} records reuse the id of a different record: kept under distinct keys")
    if budget is not None:
        examples = "; ".join(f"{loc} ({n} tokens)" for loc, n, _ in manifest["token_examples"])
        print(f"{manifest['over_token_budget']} instructions exceed the Qwen budget of {budget.with_image} tokens "
              f"({budget.text_only} without a source image; {budget.origin}); training skips those samples"
              f"{f'. E.g. {examples}' if examples else ''}")
    if manifest.get("archives"):
        from tqdm import tqdm

        a, size = manifest["archives"], lambda n: tqdm.format_sizeof(n, "B", 1024)  # noqa: E731
        print(f"archives read in place: {size(a['bytes'])}, {a['members']} members; images held until their record "
              f"was complete: at most {size(a['peak_memory'])} in memory (--memory-budget {size(a['memory_budget'])}) "
              f"and {size(a['peak_scratch'])} in {args.out}/.scratch (removed)")
        if a["unused_members"]:
            print(f"{a['unused_members']} archive members are used by no record (e.g. {a['unused_example']}): "
                  "a task's metadata missing from the archives?")
