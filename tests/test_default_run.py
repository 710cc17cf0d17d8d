"""The main job: `editflow train` with no overrides learns to edit. On held-out toy edits it beats copying the
source on every kind of edit, most edits succeed, and the run starts quietly and ends by saying so."""

import json
import subprocess
import sys

KINDS = ("add", "background", "move", "recolor", "remove")
# The promise of the README. Measured on the default run (100 held-out edits, 20 of each kind): see the README's
# Quick start; the thresholds sit a little below, for the noise of 20 edits per kind.
MIN_SUCCESS = 0.6
MIN_KIND_SUCCESS = 0.4


def test_default_run_beats_copy_source_on_every_kind_of_edit(default_run):
    run = default_run / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    report = json.loads((run / "eval.json").read_text())
    model, baseline = report["model"], report["baseline"]
    assert report["primary"] == "mae" and report["num_samples"] == 100
    table = {kind: (model[f"mae/{kind}"], baseline[f"mae/{kind}"], model[f"success/{kind}"]) for kind in KINDS}
    losing = {kind: row for kind, row in table.items() if row[0] >= row[1]}
    assert not losing, f"copying the source beats the model (mae model, copy, success) on {losing}"
    assert model["success"] >= MIN_SUCCESS, f"success {model['success']:.2f} < {MIN_SUCCESS}; per kind {table}"
    failing = {kind: row for kind, row in table.items() if row[2] < MIN_KIND_SUCCESS}
    assert not failing, f"success below {MIN_KIND_SUCCESS} on {failing}"


def test_default_run_starts_quietly_and_ends_with_its_summary(default_run):
    run = default_run / "run"
    out, err = (default_run / "stdout.txt").read_text(), (default_run / "stderr.txt").read_text()
    for notice in ("Failed to load", "is an Enum subclass", "requires torchvision", "Unable to import `torchao`",
                   "Setting accelerator to CPU"):
        assert notice not in out + err, notice
    assert "single process on cpu" in out + err
    summary = (run / "summary.txt").read_text()
    assert out.rstrip().endswith(summary.rstrip())  # the last thing the user sees
    for kind in (*KINDS, "all"):
        assert any(line.split()[:1] == [kind] and "yes" in line.split() for line in summary.splitlines()), kind
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
