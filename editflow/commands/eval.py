"""`editflow eval --model RUN --data SHARDS --out metrics.json`: edit quality of a trained model on shards,
against copy-the-source (the scores: editflow/evaluation.py)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from editflow.data.shards import read_samples
from editflow.data.sources import recorded_encoding, resolve_urls
from editflow.edit import OUTPUT_FORMATS, check_writable
from editflow.errors import EditflowError, report
from editflow.evaluation import evaluate_guidances, grid_picks, make_edit_fn, sample_grid
from editflow.model_paths import read_model_config
from editflow.reliance import conditioning_reliance, reliance_table, swap_groups


def finite(value):
    """JSON has no NaN: a metric nobody could compute is null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def check_judge_path(name: str) -> None:
    """A --judge-model that is not a hub id must be a local directory (checked before any model loads)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from editflow.models.build import relocate_asset

    if os.path.exists(relocate_asset(name)):
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise EditflowError(f"--judge-model {name} does not exist: give the judge's local directory or a hub id "
                            "(e.g. Qwen/Qwen2.5-VL-7B-Instruct)") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow eval", description=__doc__)
    parser.add_argument("--model", required=True, help="a run directory, a checkpoint, or an export")
    parser.add_argument("--data", required=True, nargs="+", help="shard directories (manifest.json) or tar files")
    parser.add_argument("--out", required=True, help="metrics json (same schema as a run's eval.json)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="Kontext distilled guidance, one value or several (each is evaluated; the first is the "
                             "headline); default: the model's objective.sample_guidance")
    parser.add_argument("--text-guidance", type=float, default=1.0,
                        help="classifier-free guidance over the instruction, as in `editflow edit` (1.0: off; the "
                             "model needs objective.drop_text > 0 in training)")
    parser.add_argument("--image-guidance", type=float, default=1.0,
                        help="classifier-free guidance over the image Qwen sees (1.0: off; needs objective.drop_both)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", choices=["none", "qwen"], default="none", help="VLM judge (GEdit/ImgEdit style)")
    parser.add_argument("--judge-model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="judge weights: path or hub id")
    parser.add_argument("--grid", help="also write a sample grid here (.png, .jpg, .jpeg or .webp)")
    parser.add_argument("--reliance", action="store_true",
                        help="also measure whether the model reads its inputs: the flow loss per kind of edit with "
                             "each sample's own instruction and source, then another sample's (editflow/reliance.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from editflow.judge import JUDGES
    from editflow.pipeline import EditPipeline

    try:  # everything that can be checked comes before the model loads
        for option, value in (("--limit", args.limit), ("--steps", args.steps), ("--batch-size", args.batch_size)):
            if value is not None and value < 1:
                raise EditflowError(f"{option} must be at least 1, got {value}")
        if args.grid and Path(args.grid).suffix.lower() not in OUTPUT_FORMATS:
            raise EditflowError(f"--grid {args.grid}: give an image file name ending in one of "
                                f"{', '.join(OUTPUT_FORMATS)}")
        for path in filter(None, (args.out, args.grid)):
            check_writable(Path(path))
        if args.judge != "none":
            check_judge_path(args.judge_model)
        config, model = read_model_config(args.model)
        if recorded_encoding(args.data):
            raise EditflowError(f"--data {' '.join(map(str, args.data))} holds pre-encoded shards (`editflow encode`'s latents, not "
                                "images); evaluation edits images: give the shard directory it was encoded from")
        samples = read_samples(resolve_urls(args.data, "--data"), args.limit)
        if not any(s.source is not None for s in samples):
            raise EditflowError(f"--data {' '.join(args.data)}: none of its {len(samples)} samples has a source "
                                "image to edit")
        if args.reliance:
            swap_groups(samples, config.data.bucket_base)
        pipe = EditPipeline.from_pretrained(model, device=args.device)
        judge = None
        if args.judge != "none":
            dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
            try:
                judge = JUDGES[args.judge].from_pretrained(args.judge_model, dtype=dtype, device=args.device)
            except OSError as err:  # a hub id that is not downloaded (offline), or a directory without weights
                where = "local directory" if os.path.isdir(args.judge_model) else \
                    "hub id (no such local directory; offline machines need one)"
                raise EditflowError(f"--judge-model {args.judge_model}: cannot load the judge from this {where}: "
                                    f"{' '.join(str(err).split())}") from None  # one paragraph
    except (EditflowError, FileNotFoundError, ValueError) as err:
        report("eval", err, code=2)
    guidances = args.guidance or [pipe.guidance]
    base = pipe.config.data.bucket_base
    result, edits = evaluate_guidances(
        samples, lambda g: make_edit_fn(pipe, base, args.steps, g, args.seed, args.text_guidance, args.image_guidance),
        guidances, batch_size=args.batch_size, judge=judge, progress=True)
    result.update(model_path=str(args.model), data=args.data, steps=args.steps, judge=args.judge,
                  text_guidance=args.text_guidance, image_guidance=args.image_guidance)
    if args.reliance:
        result["reliance"] = conditioning_reliance(pipe, samples, base, pipe.config.objective.guidance, args.seed,
                                                   args.batch_size)
        print(reliance_table(result["reliance"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(finite(result), indent=1))
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        scored = [s for s in samples if s.source is not None]
        picks = grid_picks(scored, 8)
        sample_grid([scored[i] for i in picks], [edits[i] for i in picks]).save(args.grid)
    primary = result["primary"]
    print(f"{primary}: model {result['model'][primary]:.4f}  copy-source {result['baseline'][primary]:.4f}  "
          f"({result['num_samples']} samples) -> {args.out}")

