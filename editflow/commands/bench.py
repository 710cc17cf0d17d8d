"""`editflow bench train|data [...]`: the step and data-loader benchmarks (editflow/bench.py,
editflow/bench_data.py) with their arguments and reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editflow import bench, bench_data
from editflow.config import parse_with_overrides
from editflow.errors import ConfigError, EditflowError, report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        return bench_data_main(argv[1:])
    parser = argparse.ArgumentParser(prog="editflow bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="time the training data loader against a bare PIL decode loop and the pre-encoded "
                                "reader (editflow bench data --help)")
    train = sub.add_parser("train", help="time the training step (editflow vs the diffusers-example way)")
    train.add_argument("--model", help="a conf/model config (default: the composed config's, tiny)")
    train.add_argument("--resolution", type=int, default=64, help="square side in pixels (multiple of 16)")
    train.add_argument("--batch", type=int, default=2)
    train.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    train.add_argument("--warmup", type=int, default=2)
    train.add_argument("--text-tokens", type=int, default=512, help="Qwen tokens per sample")
    train.add_argument("--layers", type=int, help="double-stream blocks (default: the config's)")
    train.add_argument("--single-layers", type=int, help="single-stream blocks (default: the config's)")
    train.add_argument("--full-depth", action="store_true", help="ignore --layers/--single-layers")
    train.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the blocks of the editflow variant (default: on CUDA)")
    train.add_argument("--device", default="auto")
    train.add_argument("--memory-cap-gb", type=float, help="cap this process's GPU memory (e.g. 24)")
    train.add_argument("--only", choices=["editflow", "reference"])
    train.add_argument("--out", help="result json (default: bench/results/<date>-<device>.json)")
    args, overrides = parse_with_overrides(parser, argv)
    if args.resolution % 16:
        parser.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    check_outputs("train", args.out)
    try:
        result = bench.run(args, overrides)
    except ConfigError as err:  # a bad override: one paragraph, before anything is built
        report("bench train", err, code=2)
    out = write_result(result, Path(args.out) if args.out else bench.default_out(result))
    print(f"[bench] wrote {out}", file=sys.stderr)


def check_outputs(command: str, out: str | None, workdir: str | None = None) -> None:
    """--out and --workdir that cannot take the results fail now, not after the whole benchmark."""
    from editflow.edit import check_writable

    try:
        if out:
            check_writable(Path(out))
        if workdir and not Path(workdir).is_dir():
            raise EditflowError(f"--workdir {workdir} is not a directory; give an existing one for the temporary data")
    except EditflowError as err:
        report(f"bench {command}", err, code=2)


def write_result(result: dict, out: Path) -> Path:
    """The result json at `out`, and on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return out


def bench_data_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="editflow bench data", description=bench_data.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Hydra overrides (key=value) choose the loader's settings: "
                                            "data.decode_threads, data.num_workers, data.bucket_base, "
                                            "data.source_pixels, "
                                            "trainer.micro_batch_size, model=... (encoded shapes), experiment=...")
    parser.add_argument("--pairs", type=int, default=96, help="JPEG pairs written (default 96)")
    parser.add_argument("--side", type=int, default=1024, help="short side of the pairs in pixels (default 1024)")
    parser.add_argument("--samples", type=int, default=128, help="pairs timed per measurement (default 128)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--shuffle-buffer", type=int, default=16,
                        help="cap on the loader's shuffle buffer (default 16): the buffer decides the order and the "
                             "start-up, not the rate, and a full one of 1024-px pairs holds GBs per worker")
    parser.add_argument("--samples-per-shard", type=int, default=8)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile the one-thread loader and record its top N functions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the temporary data goes (default: the system's temp dir)")
    parser.add_argument("--out", help="result json (default: bench/results/<date>-data-<device>.json)")
    args, overrides = parser.parse_known_args(argv)
    args.argv = argv
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (Hydra overrides look like key=value)")
    for name in ("pairs", "side", "samples", "rounds", "samples_per_shard", "shuffle_buffer"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.side % 16:
        parser.error(f"--side must be a multiple of 16, got {args.side}")
    check_outputs("data", args.out, args.workdir)
    try:
        result = bench_data.run(args, overrides)
    except ConfigError as err:  # a bad override: one paragraph, before anything is written
        report("bench data", err, code=2)
    out = write_result(result, Path(args.out) if args.out else bench_data.default_out(result))
    ratio, cpu_s = result["ratio_per_core"], result["samples_per_cpu_s"]
    workers, threads, cores = result["workers"], result["decode_threads"], result["cores_used"]
    how = f"{workers} worker process{'es' * (workers != 1)}" if workers else \
        f"{threads} decode thread{'s' * (threads != 1)}"
    how += f", {cores} at a time on the {result['cpu']} usable CPUs" if cores < max(workers, threads) else ""
    print(f"[bench] per CPU-second: training loader {cpu_s['loader']:.1f} pairs ({how}), bare "
          f"PIL decode {cpu_s['decode']:.1f}: {ratio['median']:.2f}x per core (rounds {ratio['min']:.2f}-"
          f"{ratio['max']:.2f}; target >= {bench_data.TARGET_RATIO}); in one thread "
          f"{result['ratio_one_thread']['median']:.2f}x. "
          f"Wall clock: loader {result['loader_samples_per_s']:.1f} pairs/s, bare decode "
          f"{result['decode_samples_per_s']:.1f}, pre-encoded reader {result['encoded_samples_per_s']:.1f}. "
          f"Results: {out}", file=sys.stderr)
