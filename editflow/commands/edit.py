"""`editflow edit --model RUN --image IN --instruction TEXT --out OUT [...]` (the work: editflow/edit.py)."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from editflow import edit
from editflow.edit import (MAX_OUTPUT_PIXELS, EditRequest, ModelLimits, RequestError, check_against_model,
                           prepare_all, read_batch, scale_note)
from editflow.errors import EditflowError, report
from editflow.model_paths import read_model_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow edit", description=edit.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run directory, a checkpoint, or an export")
    parser.add_argument("--image", action="append", default=[],
                        help="source image; repeat for extra reference images (the first is the source)")
    parser.add_argument("--instruction", default="")
    parser.add_argument("--out", default="", help="output file (.png .jpg .webp); N variants: <stem>-1<ext> ...")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--size", default="auto", help="auto (bucket nearest the source aspect) or WxH")
    parser.add_argument("--allow-large", action="store_true",
                        help=f"allow --size above {MAX_OUTPUT_PIXELS / 1e6:.1f} MP")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=None, help="Kontext distilled guidance (default: "
                        "the model's objective.sample_guidance)")
    parser.add_argument("--text-guidance", type=float, default=1.0, help="classifier-free guidance on the text")
    parser.add_argument("--image-guidance", type=float, default=1.0, help="classifier-free guidance on the image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask", help="PNG: transparent (or, without alpha, white) pixels may change")
    parser.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    parser.add_argument("--batch", help="jsonl of requests; the flags above are their defaults")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    defaults = EditRequest(args.image, args.instruction, args.out, args.num_images, args.size, args.steps,
                           args.guidance, args.text_guidance, args.image_guidance, args.seed, args.mask, args.quality)
    try:
        requests = read_batch(args.batch, defaults) if args.batch else [defaults]
        if not args.batch and not args.out:
            raise RequestError("give --out (or --batch)")
        config, model = read_model_config(args.model)
        prepared = prepare_all(requests, ModelLimits.from_config(config, args.allow_large), bool(args.batch))
        for item in prepared:
            if note := scale_note(item):
                print(note, file=sys.stderr)
        from editflow.pipeline import EditPipeline

        pipe = EditPipeline.from_pretrained(model, device=args.device)
        for i, item in enumerate(prepared, start=1):
            try:
                check_against_model(item, pipe)
            except RequestError as err:
                raise RequestError(f"request {i}: {err}" if args.batch else str(err)) from None
    except (EditflowError, FileNotFoundError) as err:
        report("edit", err, code=2)
    for i, item in enumerate(tqdm(prepared, desc="edit", unit="request", disable=len(prepared) == 1), start=1):
        try:
            for path in edit.run(item, pipe, pipe.guidance):
                print(path)  # once saved: what a later failure leaves written is listed
        except RequestError as err:  # an output that could be written up front and now cannot (disk full, ...)
            report("edit", RequestError(f"request {i}: {err}") if args.batch else err, code=2)
