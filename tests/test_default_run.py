"""The main job: `editflow train` with no overrides trains an editor that clearly beats copy-the-source."""

import json
import subprocess
import sys


def test_default_run_beats_copy_source_by_a_quarter(default_run):
    run = default_run / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    report = json.loads((run / "eval.json").read_text())
    primary = report["primary"]
    model, baseline = report["model"][primary], report["baseline"][primary]
    assert model <= 0.75 * baseline, f"model {primary}={model:.4f} vs copy-source {baseline:.4f}"
    # the edits are not just a copy: the edited regions are closer to the targets than the sources are
    assert report["model"]["mae_edit_region"] < report["baseline"]["mae_edit_region"]


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
