"""Edit quality: exact scores against toy ground truth, for a model and for copy-the-source.

Schema of `eval.json` (shared by the training run and `editflow eval`):
    {"primary": NAME, "higher_is_better": BOOL, "model": {NAME: x, ...}, "baseline": {NAME: y, ...}, ...}
All errors are mean absolute pixel errors on a [0, 1] scale: `mae` against the target (primary),
`mae_edit_region` / `mae_preserved` inside / outside the changed region, `preservation_mae` the
drift from the source outside it, `success` the share of edits right inside and kept outside.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from editflow.data.buckets import nearest_bucket
from editflow.data.images import to_rgb
from editflow.data.regions import changed_region, pixels
from editflow.data.samples import EditSample

PRIMARY = "mae"
# An edit succeeds when the edited region is right and the rest is kept (errors on a [0, 1] scale).
SUCCESS_EDIT_MAE = 0.10
SUCCESS_KEEP_MAE = 0.05


def edit_scores(pred: Image.Image, sample: EditSample) -> dict[str, float]:
    """Scores of one edited image against the sample's target, inside and outside the changed region."""
    target = pixels(sample.target, sample.target.size)
    output = pixels(pred, sample.target.size)
    error = np.abs(output - target).mean(-1)
    scores = {"mae": float(error.mean())}
    if sample.source is not None:
        changed = changed_region(sample.source, sample.target, sample.mask)
        drift = np.abs(output - pixels(sample.source, sample.target.size)).mean(-1)
        scores["preservation_mae"] = float(drift[~changed].mean()) if (~changed).any() else 0.0
        edit = float(error[changed].mean()) if changed.any() else 0.0
        keep = float(error[~changed].mean()) if (~changed).any() else 0.0
        scores.update(mae_edit_region=edit, mae_preserved=keep,
                      success=float(edit < SUCCESS_EDIT_MAE and keep < SUCCESS_KEEP_MAE))
    return scores


def aggregate(rows: list[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Mean of every score overall and per task ("mae/recolor", ...)."""
    overall, per_task = defaultdict(list), defaultdict(list)
    for task, scores in rows:
        for name, value in scores.items():
            overall[name].append(value)
            per_task[f"{name}/{task}"].append(value)
    def mean(values):  # NaN (e.g. a judge answer that could not be parsed) is left out; all NaN stays NaN
        kept = [v for v in values if not np.isnan(v)]
        return float(np.mean(kept)) if kept else float("nan")

    out = {name: mean(values) for name, values in overall.items()}
    out.update({name: mean(values) for name, values in sorted(per_task.items())})
    return out


def evaluate(
    samples: Sequence[EditSample],
    edit_fn: Callable[[list[EditSample]], list[Image.Image]],
    batch_size: int = 16,
    judge=None,
    progress: bool = False,
) -> tuple[dict, list[Image.Image]]:
    """Score `edit_fn` (a batch of samples -> edited images) and copy-the-source on `samples`.

    `judge` (optional, see editflow.judge) adds VLM scores of instruction following and quality.
    """
    from tqdm import tqdm

    samples = [s for s in samples if s.source is not None]  # editing metrics need a source
    model_rows, baseline_rows, edits = [], [], []
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        outputs = edit_fn(batch)
        for sample, output in zip(batch, outputs):
            task = sample.meta.get("task") or "edit"
            model_scores, baseline_scores = edit_scores(output, sample), edit_scores(sample.source, sample)
            if judge is not None:
                model_scores.update(judge.score(sample.source, output, sample.instruction))
                baseline_scores.update(judge.score(sample.source, sample.source, sample.instruction))
            model_rows.append((task, model_scores))
            baseline_rows.append((task, baseline_scores))
            edits.append(output)
        bar.update(len(batch))
    bar.close()
    model, baseline = aggregate(model_rows), aggregate(baseline_rows)
    result = {
        "primary": PRIMARY,
        "higher_is_better": False,
        "model": model,
        "baseline": baseline,
        "num_samples": len(samples),
        "improvement_over_baseline": 1.0 - model[PRIMARY] / baseline[PRIMARY] if baseline[PRIMARY] else 0.0,
    }
    return result, edits


def grid_picks(samples: Sequence[EditSample], rows: int) -> list[int]:
    """Indices of up to `rows` samples for the grid: one per kind of edit (in order of first appearance),
    then a second of each kind, and so on, so every kind is shown before any is repeated."""
    by_task: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_task.setdefault(sample.meta.get("task") or "edit", []).append(i)
    picks: list[int] = []
    for rank in range(max((len(v) for v in by_task.values()), default=0)):
        picks += [indices[rank] for indices in by_task.values() if rank < len(indices)]
    return picks[:rows]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's scalable built-in font (needs FreeType)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(candidate, font=font) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` scaled to fit a `cell` x `cell` square; small images grow by whole pixels (no blur)."""
    image = to_rgb(image)
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    whole = scale >= 1 and scale == int(scale)
    return image.resize(size, Image.NEAREST if whole else Image.BICUBIC)


def sample_grid(samples: Sequence[EditSample], edits: Sequence[Image.Image], cell: int = 192,
                text_width: int = 300) -> Image.Image:
    """One row per sample under column headings: source | target | edit | the kind of edit, the
    instruction, and the row's scores (model and copy-the-source)."""
    header, pad, gap = 28, 6, 4
    heading, body = _font(16), _font(13)
    step = cell + gap
    grid = Image.new("RGB", (3 * step + text_width, header + step * len(samples)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(("source", "target", "edit", "instruction")):
        draw.text((col * step + pad, 5), title, fill="black", font=heading)
    for row, (sample, edit) in enumerate(zip(samples, edits)):
        top = header + row * step
        for col, image in enumerate((sample.source, sample.target, edit)):
            fitted = _fit(image, cell)
            grid.paste(fitted, (col * step + (cell - fitted.width) // 2, top + (cell - fitted.height) // 2))
        model, copy = edit_scores(edit, sample), edit_scores(sample.source, sample)
        scores = f"mae {model['mae']:.3f} (copy {copy['mae']:.3f})"
        if "success" in model:
            scores += ", success" if model["success"] else ", not a success"
        left = 3 * step + pad
        draw.text((left, top + pad), sample.meta.get("task") or "edit", fill=(30, 80, 200), font=heading)
        lines = _wrap(draw, sample.instruction, body, text_width - 2 * pad)
        draw.multiline_text((left, top + pad + 24), "\n".join(lines), fill="black", font=body, spacing=3)
        draw.text((left, top + cell - pad - 16), scores, fill=(90, 90, 90), font=body)
    return grid


def guidance_values(value) -> list[float]:
    """`eval.guidance` / `editflow eval --guidance`: one distilled-guidance value or a list of them."""
    if isinstance(value, (int, float, str)):
        return [float(value)]
    return [float(v) for v in value]


def evaluate_guidances(samples, edit_fn_for: Callable[[float], Callable], guidances: Sequence[float],
                       **options) -> tuple[dict, list[Image.Image]]:
    """`evaluate` at each guidance value. The first value's scores are the headline (`model`, `baseline`,
    `primary`, and its edits are returned); with several values, `by_guidance` holds each one's, keyed by value."""
    runs = [(g, *evaluate(samples, edit_fn_for(g), **options)) for g in guidances]
    _, result, edits = runs[0]
    result["guidance"] = runs[0][0]
    if len(runs) > 1:
        result["by_guidance"] = {f"{g:g}": {"model": r["model"], "improvement_over_baseline":
                                            r["improvement_over_baseline"]} for g, r, _ in runs}
    return result, edits


def eval_metrics(result: dict) -> dict[str, float]:
    """Flat `eval/*` metrics of a result: the headline scores, and `eval/guidance_<g>/*` per guidance value."""
    primary = result["primary"]
    metrics = {f"eval/{k}": v for k, v in result["model"].items() if "/" not in k}
    metrics[f"eval/baseline_{primary}"] = result["baseline"][primary]
    for g, scores in result.get("by_guidance", {}).items():
        metrics.update({f"eval/guidance_{g}/{k}": v for k, v in scores["model"].items() if "/" not in k})
    return metrics


def make_edit_fn(pipe, bucket_base: int, steps: int, guidance: float, seed: int, text_guidance: float = 1.0,
                 image_guidance: float = 1.0):
    """Batch of samples -> edited images, each sampled at the bucket nearest its source's aspect (text/image
    guidance: the two-scale classifier-free guidance of `editflow edit`; 1.0 disables it)."""
    generator = torch.Generator().manual_seed(seed)

    def edit(batch):
        outputs = [None] * len(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, sample in enumerate(batch):
            groups.setdefault(nearest_bucket(*sample.source.size, bucket_base), []).append(i)
        for (width, height), indices in groups.items():
            images = pipe([batch[i].source for i in indices], [batch[i].instruction for i in indices],
                          num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                          generator=generator, text_guidance_scale=text_guidance,
                          image_guidance_scale=image_guidance)
            for i, image in zip(indices, images):
                outputs[i] = image
        return outputs

    return edit
