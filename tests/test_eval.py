import pytest

from editflow.data.samples import EditSample
from editflow.data.toy import make_edit
from editflow.eval import evaluate, sample_grid


def _sample(i):
    e = make_edit(i, seed=21)
    return EditSample(e.key, e.source, e.target, e.instruction, e.meta, e.mask)


def test_perfect_edits_score_zero_and_copying_scores_zero_outside_the_region():
    samples = [_sample(i) for i in range(10)]
    result, edits = evaluate(samples, lambda batch: [s.target for s in batch], batch_size=4)
    assert result["primary"] == "mae" and result["higher_is_better"] is False
    assert result["model"]["mae"] == 0 and result["model"]["success"] == 1
    base = result["baseline"]
    assert base["mae_preserved"] == 0 and base["success"] == 0 and base["mae_edit_region"] > 0.1
    assert set(k.split("/")[1] for k in base if "/" in k) == {"recolor", "add", "remove", "move", "background"}
    assert result["improvement_over_baseline"] == 1.0
    assert len(edits) == 10


def test_baseline_mae_is_region_error_times_region_fraction():
    sample = _sample(0)
    result, _ = evaluate([sample], lambda batch: [s.source for s in batch])
    base = result["baseline"]
    assert base["mae"] == pytest.approx(base["mae_edit_region"] * sample.meta["changed_fraction"], rel=1e-5)


def test_grid_has_one_row_per_sample():
    samples = [_sample(i) for i in range(3)]
    grid = sample_grid(samples, [s.target for s in samples])
    assert grid.height == 3 * 64 and grid.width > 3 * 64
