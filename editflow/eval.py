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
from PIL import Image, ImageDraw

from editflow.data.images import to_rgb
from editflow.data.samples import EditSample

PRIMARY = "mae"
# An edit succeeds when the edited region is right and the rest is kept (errors on a [0, 1] scale).
SUCCESS_EDIT_MAE = 0.10
SUCCESS_KEEP_MAE = 0.05


# Real data has no ground-truth mask: pixels whose source and target differ by more than this
# (mean over channels, [0, 1] scale) are taken as the changed region.
CHANGE_THRESHOLD = 0.1


def _array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    image = to_rgb(image)
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255


def changed_region(sample: EditSample) -> np.ndarray:
    """Boolean (H, W) changed region at the target's size: the toy ground truth, else |source - target|."""
    if sample.mask is not None:
        return np.asarray(sample.mask.resize(sample.target.size, Image.NEAREST)) > 127
    difference = np.abs(_array(sample.source, sample.target.size) - _array(sample.target, sample.target.size))
    return difference.mean(-1) > CHANGE_THRESHOLD


def edit_scores(pred: Image.Image, sample: EditSample) -> dict[str, float]:
    """Scores of one edited image against the sample's target, inside and outside the changed region."""
    target = _array(sample.target, sample.target.size)
    output = _array(pred, sample.target.size)
    error = np.abs(output - target).mean(-1)
    scores = {"mae": float(error.mean())}
    if sample.source is not None:
        changed = changed_region(sample)
        drift = np.abs(output - _array(sample.source, sample.target.size)).mean(-1)
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


def sample_grid(samples: Sequence[EditSample], edits: Sequence[Image.Image], text_width: int = 260) -> Image.Image:
    """One row per sample: source | target | model edit | instruction."""
    w, h = samples[0].target.size
    grid = Image.new("RGB", (3 * w + text_width, h * len(samples)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (sample, edit) in enumerate(zip(samples, edits)):
        for col, image in enumerate((sample.source, sample.target, edit)):
            grid.paste(to_rgb(image).resize((w, h)), (col * w, row * h))
        words, lines = sample.instruction.split(), [""]
        for word in words:  # wrap to the text column
            lines[-1] = f"{lines[-1]} {word}".strip() if len(lines[-1]) + len(word) < text_width // 7 else lines[-1]
            if not lines[-1].endswith(word):
                lines.append(word)
        draw.multiline_text((3 * w + 6, row * h + 4), "\n".join(lines), fill="black", spacing=2)
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
