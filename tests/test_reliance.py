"""`editflow eval --reliance`: the flow loss with each sample's own instruction and source, then a partner's
(same kind of edit, same size): ratios say whether the model reads each input."""

import dataclasses
import json
import subprocess
import sys

import pytest

from editflow.data.samples import EditSample
from editflow.data.toy import make_edit
from editflow.errors import EditflowError
from editflow.reliance import conditioning_reliance

KINDS = ("recolor", "add", "remove", "move", "background")


def _samples(n, seed=31):
    edits = [make_edit(i, seed=seed) for i in range(n)]
    return [EditSample(e.key, e.source, e.target, e.instruction, e.meta, e.mask) for e in edits]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from editflow.pipeline import EditPipeline

    return EditPipeline.from_models(tiny_models, guidance=1.0)


def _ratios(result, swap):
    return {kind: result["ratio"][f"{swap}/{kind}"] for kind in KINDS}


def test_a_swapped_instruction_or_source_moves_the_loss_and_an_identical_one_does_not(pipe):
    # the random tiny model barely reads either input (ratios within 1e-3 of 1), but it reads them: a swap moves
    # the loss, and swapping in an identical input leaves it exactly as it was
    samples = _samples(10)  # two of each kind: each is the other's partner
    result = conditioning_reliance(pipe, samples, base=64, guidance=1.0)
    assert result["num_samples"] == 10 and result["left_out"] == 0
    assert all(r != 1.0 for r in _ratios(result, "other_instruction").values())
    assert all(r != 1.0 for r in _ratios(result, "other_source").values())
    assert conditioning_reliance(pipe, samples, base=64, guidance=1.0) == result  # fixed noise and partners

    # partners given the same instruction: swapping it changes nothing, while the source swap still does
    first = {}
    same_text = [dataclasses.replace(s, instruction=first.setdefault(s.meta["task"], s.instruction)) for s in samples]
    result = conditioning_reliance(pipe, same_text, base=64, guidance=1.0)
    assert all(r == 1.0 for r in _ratios(result, "other_instruction").values())
    assert all(r != 1.0 for r in _ratios(result, "other_source").values())

    # partners given the same source image: the source swap changes nothing
    first = {}
    same_source = [dataclasses.replace(s, source=first.setdefault(s.meta["task"], s.source)) for s in samples]
    result = conditioning_reliance(pipe, same_source, base=64, guidance=1.0)
    assert all(r == 1.0 for r in _ratios(result, "other_source").values())


def test_samples_without_a_partner_are_counted_or_refused(pipe):
    samples = _samples(6)  # the second recolor pairs with the first; one of each other kind is alone
    result = conditioning_reliance(pipe, samples, base=64, guidance=1.0)
    assert result["num_samples"] == 2 and result["left_out"] == 4
    with pytest.raises(EditflowError, match="partner"):
        conditioning_reliance(pipe, samples[:5], base=64, guidance=1.0)


def test_eval_cli_writes_and_prints_the_reliance(quick_model, tmp_path):
    val = next((quick_model / "cache").glob("toy-val-*"))
    out = tmp_path / "m.json"
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "editflow.cli", "eval", "--model", str(quick_model / "run"), "--data", str(val),
         "--steps", "1", "--reliance", *extra], capture_output=True, text=True, timeout=600)
    result = run("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    reliance = json.loads(out.read_text())["reliance"]
    assert (reliance["num_samples"], reliance["left_out"]) == (6, 2)  # 8 edits: recolor, add, remove paired
    assert set(reliance["loss"]) >= {"own", "other_instruction", "other_source"}
    assert "other instruction" in result.stdout

    refused = run("--out", str(tmp_path / "none.json"), "--limit", "1")  # checked before the model loads
    assert refused.returncode == 2 and "partner" in refused.stderr and not (tmp_path / "none.json").exists()
