import numpy as np
import pytest

from editflow.data.samples import EditSample
from editflow.data.toy import make_edit
from editflow.evaluation import evaluate, grid_picks, sample_grid


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


def test_grid_shows_every_kind_of_edit_before_repeating_one():
    samples = [_sample(i) for i in range(12)]
    picks = grid_picks(samples, 7)
    kinds = [samples[i].meta["task"] for i in picks]
    assert sorted(kinds[:5]) == sorted({s.meta["task"] for s in samples}) and len(kinds) == 7
    assert grid_picks(samples, 3) == picks[:3]
    grid = sample_grid([samples[i] for i in picks[:5]], [samples[i].target for i in picks[:5]], cell=96)
    # a heading row, then one row of source | target | edit (+ the instruction) per kind
    assert grid.height == 28 + 5 * (96 + 4) and grid.width > 3 * 96
    heading = np.asarray(grid.convert("L"))[:28, : 3 * 96]
    assert (heading < 128).any()  # the column titles are drawn


def test_judge_answers_are_parsed_or_marked_unparsed():
    import math

    from editflow.judge import parse_scores

    scores = parse_scores("SC=8 PQ: 2")
    assert scores["judge_sc"] == 8 and scores["judge_pq"] == 2 and scores["judge_overall"] == 4
    assert scores["judge_parsed"] == 1
    garbled = parse_scores("I think it is fine")
    assert math.isnan(garbled["judge_overall"]) and garbled["judge_parsed"] == 0


def test_tiny_qwen_judge_runs_through_evaluate():
    from editflow.judge import QwenVLJudge
    from editflow.models.build import asset_path

    judge = QwenVLJudge.from_pretrained(asset_path("tiny/qwen"), dtype=__import__("torch").float32)
    samples = [_sample(i) for i in range(2)]
    result, _ = evaluate(samples, lambda batch: [s.target for s in batch], judge=judge)
    for side in ("model", "baseline"):
        assert {"judge_sc", "judge_pq", "judge_overall", "judge_parsed"} <= result[side].keys()
        assert 0 <= result[side]["judge_parsed"] <= 1  # a random tiny model rarely answers in format


@pytest.fixture()
def stand_in_checkpoint(tmp_path, monkeypatch):
    """A checkpoint that passes the file checks; loading it as a model fails the test."""
    import json

    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ckpt"
    path.mkdir()
    save_file({"w": torch.zeros(1)}, path / "model.safetensors")
    (path / "train_state.json").write_text(json.dumps({"config": {}}))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad data was reported")

    monkeypatch.setattr("editflow.pipeline.EditPipeline.from_pretrained", refuse)
    return path


def eval_error(capsys, *args):
    from editflow.commands.eval import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 2
    return capsys.readouterr().err


def test_eval_names_a_truncated_shard_before_the_model_loads(tmp_path, capsys, stand_in_checkpoint):
    from editflow.data.shards import shard_urls
    from editflow.data.toy_shards import write_toy_shards

    data = write_toy_shards(tmp_path / "val", num=12, samples_per_shard=6, progress=False)
    second = shard_urls(data)[1]
    open(second, "r+b").truncate(len(open(second, "rb").read()) // 2)
    message = eval_error(capsys, "--model", stand_in_checkpoint, "--data", data, "--out", tmp_path / "m.json")
    assert f"shard {second} cannot be read to the end" in message and "Traceback" not in message
    assert message.count("\n") == 1  # one paragraph


def test_eval_refuses_a_set_with_nothing_to_edit(tmp_path, capsys, stand_in_checkpoint):
    from editflow.data.shards import write_manifest, write_shard

    (tmp_path / "empty").mkdir()
    write_manifest(tmp_path / "empty", {"shards": [write_shard(tmp_path / "empty" / "s.tar", [])],
                                        "num_samples": 0})
    message = eval_error(capsys, "--model", stand_in_checkpoint, "--data", tmp_path / "empty", "--out",
                         tmp_path / "m.json")
    assert "--data: " in message and "lists 0 samples" in message
    assert "does not exist" in eval_error(capsys, "--model", stand_in_checkpoint, "--data", tmp_path / "nope",
                                          "--out", tmp_path / "m.json")


@pytest.mark.parametrize("args, named", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-2"], "--steps must be at least 1, got -2"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
    (["--grid", "GRID.bmpx"], "--grid GRID.bmpx: give an image file name ending in one of .png, .jpg"),
    (["--grid", "GRID"], "--grid GRID: give an image file name ending in one of .png, .jpg"),
    (["--judge", "qwen", "--judge-model", "/nonexist"], "--judge-model /nonexist does not exist"),
])
def test_eval_options_that_cannot_work_are_refused_before_the_model_loads(tmp_path, capsys, stand_in_checkpoint,
                                                                         args, named):
    from editflow.data.toy_shards import write_toy_shards

    data = write_toy_shards(tmp_path / "val", num=2, progress=False)
    args = [str(tmp_path / a) if a.startswith("GRID") else a for a in args]
    message = eval_error(capsys, "--model", stand_in_checkpoint, "--data", data, "--out", tmp_path / "m.json", *args)
    assert named.replace("GRID", str(tmp_path / "GRID")) in message and "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "val"]  # nothing written


def test_eval_grid_into_a_new_folder_and_a_judge_without_weights(quick_model, tmp_path, capsys):
    from PIL import Image

    from editflow.commands.eval import main

    val = next((quick_model / "cache").glob("toy-val-*"))
    common = ["--model", quick_model / "run", "--data", val, "--steps", "1", "--limit", "2"]
    (tmp_path / "empty").mkdir()
    message = eval_error(capsys, *common, "--out", tmp_path / "none.json", "--judge", "qwen", "--judge-model",
                         tmp_path / "empty")
    last = message.rstrip("\n").split("\n")[-1]  # after the editor's loading bar: one line
    assert last.startswith(f"editflow eval: error: --judge-model {tmp_path / 'empty'}: cannot load the judge from "
                           "this local directory") and "Traceback" not in message
    assert not (tmp_path / "none.json").exists()
    main([str(a) for a in [*common, "--out", tmp_path / "m.json", "--grid", tmp_path / "new" / "grid.jpg"]])
    assert Image.open(tmp_path / "new" / "grid.jpg").format == "JPEG"


def test_eval_says_what_its_data_is_when_it_is_not_source_shards(tmp_path, capsys, stand_in_checkpoint):
    from editflow.data.shards import write_manifest

    encoded = tmp_path / "enc" / "train"  # as `editflow encode` leaves it
    encoded.mkdir(parents=True)
    (encoded / "000000-shard.tar").write_bytes(b"")
    write_manifest(encoded, {"encoding": {"settings": {}, "drops": []}, "num_samples": 1,
                             "shards": [{"file": "000000-shard.tar", "count": 1}]})
    message = eval_error(capsys, "--model", stand_in_checkpoint, "--data", encoded, "--out", tmp_path / "m.json")
    assert f"--data {encoded} holds pre-encoded shards" in message
    metadata = tmp_path / "edits.jsonl"
    metadata.write_text('{"source": "a.png", "target": "b.png", "instruction": "x"}\n')
    message = eval_error(capsys, "--model", stand_in_checkpoint, "--data", metadata, "--out", tmp_path / "m.json")
    assert f"{metadata} is not a tar shard" in message and not (tmp_path / "m.json").exists()
