"""The main job: `editflow train` with no overrides learns to edit, as far as the README promises: on 250
held-out toy edits the fine-tuned tiny base beats copying the source on every kind of edit (recolor narrowly),
more than four in five of its edits succeed, and it keeps what the base could do before its first step. The
run starts quietly and ends with its summary."""

import json
import math
import subprocess
import sys

KINDS = ("add", "background", "move", "recolor", "remove")
# Measured on the default run (README, "The default run"): mae 0.0128 vs copy-the-source 0.0667 overall (0.0135
# at step 0: the base already edits, and the fine-tune keeps it there), every kind below copying, recolor
# narrowly (0.0145 vs 0.0149), success 0.86 (add 1.00, remove 0.94, move 0.86, recolor 0.82, background 0.66).
# The thresholds leave room for other machines' float sums (one edit of 50 is 0.02 of a kind's success).
NARROW = "recolor"  # beats copying by 3 %; sampling seeds 0-2 give 0.92-1.03x copying (one edit of 50 is ~3 %)


def test_default_run_beats_copy_source_on_every_kind_and_keeps_its_start(default_run):
    run = default_run / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 12 and all(math.isfinite(loss) for loss in losses)
    # The base already fits these edits, so the fine-tune's loss is flat (0.015 +- 0.003 a logged step, measured):
    # what must hold is that it does not drift away from the base, as a fine-tune at too high an lr would.
    first, last = losses[:6], losses[-6:]
    assert sum(last) < 1.25 * sum(first), (first, last)
    report = json.loads((run / "eval.json").read_text())
    model, baseline, start = report["model"], report["baseline"], report["start"]["model"]
    assert report["primary"] == "mae" and report["num_samples"] == 250 and report["ema_decay"] == 0.995
    assert model["mae"] < 0.35 * baseline["mae"], (model["mae"], baseline["mae"])
    for kind in KINDS:
        margin = 1.04 if kind == NARROW else 1.0
        assert model[f"mae/{kind}"] < margin * baseline[f"mae/{kind}"], kind
    assert model["success"] >= 0.8 and model["success/add"] >= 0.9 and model["success/remove"] >= 0.85
    assert min(model[f"success/{kind}"] for kind in ("move", "recolor")) >= 0.75
    assert model["success/background"] >= 0.55
    assert model["success"] >= start["success"] - 0.05  # the fine-tune keeps what the base could do
    assert model["mae"] < 1.15 * start["mae"], (model["mae"], start["mae"])
    assert model["mae_edit_region"] < 0.5 * baseline["mae_edit_region"]


def test_default_run_starts_quietly_and_ends_with_its_summary(default_run):
    run = default_run / "run"
    out, err = (default_run / "stdout.txt").read_text(), (default_run / "stderr.txt").read_text()
    for notice in ("Failed to load", "is an Enum subclass", "requires torchvision", "Unable to import `torchao`",
                   "Setting accelerator to CPU"):
        assert notice not in out + err, notice
    assert "single process on cpu" in out + err
    summary = (run / "summary.txt").read_text()
    assert out.rstrip().endswith(summary.rstrip())  # the last thing the user sees
    table = [line.split() for line in summary.splitlines()]
    rows = {words[0]: words for words in table if words and words[0] in (*KINDS, "all")}
    assert rows.keys() == {*KINDS, "all"} and all(("yes" in r) != ("NO" in r) for r in rows.values()), rows
    assert all("yes" in row for kind, row in rows.items() if kind != NARROW)  # README's promise
    assert "at step 0" in summary and "samples-step0000000.png" in summary  # where the run started
    for phase in ("toy data", "encoding", "training steps", "evaluation"):
        assert phase in summary
    checkpoint = next((run / "checkpoints").glob("step-*"))
    assert str(checkpoint.relative_to(run)) in summary and (run / "example-source.png").exists()
    assert f"editflow edit --model {run}" in summary and f"editflow export {run}" in summary
    grid = next(run.glob("samples-step*.png"))
    assert grid.name in summary


def test_eval_cli_on_toy_shards_scores_the_trained_model_above_copy_source(default_run, tmp_path):
    val = next((default_run / "cache").glob("toy-val-*"))
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, "-m", "editflow.cli", "eval", "--model", str(default_run / "run"), "--data", str(val),
         "--out", str(out), "--limit", "32", "--steps", "20"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["primary"] == "mae" and report["higher_is_better"] is False and report["num_samples"] == 32
    assert report["model"]["mae"] < 0.8 * report["baseline"]["mae"]
    assert report["baseline"]["mae_preserved"] == 0.0  # copying keeps everything outside the edit
    assert {"mae_edit_region", "preservation_mae", "success"} <= report["model"].keys()
