"""One guidance story: the value fed in training and the sampling default live in the run's config, and
the run's evaluation, `editflow edit`, `editflow eval`, `EditPipeline` and exports all sample with it."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from editflow.data.toy import make_edit


def cli(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "editflow.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance")
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"))
    cli("train", "experiment=debug", "objective.sample_guidance=2.5", "eval.guidance=[2.5,1.0]", "eval.every=2",
        f"hydra.run.dir={root / 'run'}", env=env)
    return root


def test_the_run_evaluates_each_guidance_value_and_names_its_metrics(run):
    report = json.loads((run / "run" / "eval.json").read_text())
    assert report["guidance"] == 2.5 and set(report["by_guidance"]) == {"2.5", "1"}
    assert report["by_guidance"]["2.5"]["model"] == report["model"]
    assert report["by_guidance"]["1"]["model"]["mae"] != report["model"]["mae"]
    logged = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    periodic = next(m for m in logged if "eval/mae" in m)  # eval.every=2
    assert periodic["eval/mae"] == periodic["eval/guidance_2.5/mae"] and "eval/guidance_1/mae" in periodic


def test_edit_eval_pipeline_and_export_share_the_default(run, tmp_path):
    from editflow.pipeline import EditPipeline

    assert EditPipeline.from_pretrained(run / "run").guidance == 2.5
    edit = make_edit(0, seed=9)
    edit.source.save(tmp_path / "src.png")
    common = ["edit", "--model", run / "run", "--image", tmp_path / "src.png", "--instruction", edit.instruction,
              "--steps", "2"]
    cli(*common, "--out", tmp_path / "default.png")
    cli(*common, "--out", tmp_path / "explicit.png", "--guidance", "2.5")
    cli(*common, "--out", tmp_path / "other.png", "--guidance", "1.0")
    pixels = lambda name: Image.open(tmp_path / name).tobytes()
    assert pixels("default.png") == pixels("explicit.png") != pixels("other.png")

    val = next((run / "cache").glob("toy-val-*"))
    cli("eval", "--model", run / "run", "--data", val, "--out", tmp_path / "m.json", "--limit", "2", "--steps", "2")
    assert json.loads((tmp_path / "m.json").read_text())["guidance"] == 2.5
    cli("eval", "--model", run / "run", "--data", val, "--out", tmp_path / "m2.json", "--limit", "2", "--steps", "2",
        "--guidance", "1.0", "2.5")
    report = json.loads((tmp_path / "m2.json").read_text())
    assert report["guidance"] == 1.0 and set(report["by_guidance"]) == {"1", "2.5"}
    cli("eval", "--model", run / "run", "--data", val, "--out", tmp_path / "m3.json", "--limit", "2", "--steps", "2",
        "--text-guidance", "3.0")  # classifier-free guidance over the instruction, as `editflow edit` samples it
    guided = json.loads((tmp_path / "m3.json").read_text())
    default = json.loads((tmp_path / "m.json").read_text())
    assert (guided["text_guidance"], default["text_guidance"]) == (3.0, 1.0)
    assert guided["model"]["mae"] != default["model"]["mae"]

    cli("export", run / "run", "--out", tmp_path / "export")
    export = json.loads((tmp_path / "export" / "editflow.json").read_text())
    assert export["guidance"] == {"sample": 2.5, "train": 1.0}
    assert EditPipeline.from_pretrained(tmp_path / "export").guidance == 2.5
    assert "guidance_scale=2.5" in (tmp_path / "export" / "README.md").read_text()
