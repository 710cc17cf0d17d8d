"""The main job: `editflow train` with no overrides trains an editor that clearly beats copy-the-source."""

import json
import os
import subprocess
import sys


def test_default_run_beats_copy_source_by_a_quarter(tmp_path):
    env = dict(os.environ, EDITFLOW_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "train", f"hydra.run.dir={run}"],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.6 * metrics[0]["loss"]
    report = json.loads((run / "eval.json").read_text())
    primary = report["primary"]
    model, baseline = report["model"][primary], report["baseline"][primary]
    assert model <= 0.75 * baseline, f"model {primary}={model:.4f} vs copy-source {baseline:.4f}"
    # the edits are not just a copy: the edited regions are closer to the targets than the sources are
    assert report["model"]["mae_edit_region"] < report["baseline"]["mae_edit_region"]
