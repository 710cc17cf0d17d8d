"""Edit quality: exact scores against toy ground truth, for a model and for copy-the-source.

Schema of `eval.json` (shared by the training run and `editflow eval`):
    {"primary": NAME, "higher_is_better": BOOL, "model": {NAME: x, ...}, "baseline": {NAME: y, ...}, ...}
All errors are mean absolute pixel errors on a [0, 1] scale.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from editflow.data.samples import EditSample

PRIMARY = "mae"
# An edit succeeds when the edited region is right and the rest is kept (errors on a [0, 1] scale).
SUCCESS_EDIT_MAE = 0.10
SUCCESS_KEEP_MAE = 0.05


def edit_scores(pred: Image.Image, sample: EditSample) -> dict[str, float]:
    """Scores of one edited image against the sample's target (and ground-truth mask, when it has one)."""
    target = np.asarray(sample.target.convert("RGB"), dtype=np.float32) / 255
    if pred.size != sample.target.size:
        pred = pred.resize(sample.target.size, Image.BICUBIC)
    error = np.abs(np.asarray(pred.convert("RGB"), dtype=np.float32) / 255 - target).mean(-1)
    scores = {"mae": float(error.mean())}
    if sample.mask is not None:
        changed = np.asarray(sample.mask) > 127
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
    out = {name: float(np.mean(values)) for name, values in overall.items()}
    out.update({name: float(np.mean(values)) for name, values in sorted(per_task.items())})
    return out


def evaluate(
    samples: Sequence[EditSample], edit_fn: Callable[[list[EditSample]], list[Image.Image]], batch_size: int = 16
) -> tuple[dict, list[Image.Image]]:
    """Score `edit_fn` (a batch of samples -> edited images) and copy-the-source on `samples`."""
    model_rows, baseline_rows, edits = [], [], []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        outputs = edit_fn(batch)
        for sample, output in zip(batch, outputs):
            task = sample.meta.get("task", "edit")
            model_rows.append((task, edit_scores(output, sample)))
            baseline_rows.append((task, edit_scores(sample.source, sample)))
            edits.append(output)
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
            grid.paste(image.convert("RGB").resize((w, h)), (col * w, row * h))
        words, lines = sample.instruction.split(), [""]
        for word in words:  # wrap to the text column
            lines[-1] = f"{lines[-1]} {word}".strip() if len(lines[-1]) + len(word) < text_width // 7 else lines[-1]
            if not lines[-1].endswith(word):
                lines.append(word)
        draw.multiline_text((3 * w + 6, row * h + 4), "\n".join(lines), fill="black", spacing=2)
    return grid
