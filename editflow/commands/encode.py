"""`editflow encode [hydra overrides] encode.out=DIR` (also `accelerate launch -m editflow.preencode ...`)."""

from __future__ import annotations

import logging
import sys

DESCRIPTION = """Run the frozen VAE and Qwen over the training data once, so training keeps neither on the
accelerator (the 24 GB mode) and spends no time on them.

The overrides are the training run's: the same model, data and objective settings decide what is stored.
Each training set becomes `DIR/<set name>/`, one encoded shard per source shard in the same order, so a
run with `data.pre_encoded=DIR` sees the batches an on-the-fly run sees. Several processes
(`accelerate launch -m editflow.preencode ...`, or torchrun) split the shards between them; a stopped
encode resumes, keeping the shards it finished."""


def main(argv: list[str] | None = None) -> None:
    import argparse

    from accelerate import PartialState

    from editflow.config import compose, parse_with_overrides, validate
    from editflow.encode_shards import encode
    from editflow.errors import EditflowError, report

    parser = argparse.ArgumentParser(prog="editflow encode", description=DESCRIPTION,
                                     usage="%(prog)s [hydra overrides]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = compose(overrides)
        validate(cfg, training=False)  # encoding needs no stage-1 connector
        out = encode(cfg)
    except EditflowError as err:  # bad input or overrides: one paragraph, no traceback
        report("encode", err, code=2)
    if PartialState().is_main_process:
        print(f"encoded -> {out}; train on it with data.pre_encoded={out}")

