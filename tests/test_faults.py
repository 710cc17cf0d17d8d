"""Bad input and faults in training and resume: a clear error before the models load where the input can be
checked up front, skips that are counted, and nothing already written lost (issue 13, issue 12 item 5)."""

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from editflow import checkpoint as ckpt
from editflow.config import compose, validate
from editflow.data.shards import read_manifest, write_manifest, write_shard
from editflow.data.toy_shards import toy_sample
from editflow.errors import CheckpointError, ConfigError, DataError

from test_train import QUICK

IN_PROCESS = [*QUICK, "logging.wandb=false", "eval.num_samples=0", "trainer.cache_encodings=false"]
SHARDS = ["data=shards", "data.num_workers=0", "data.shuffle_buffer=4", "data.bucket_base=64"]


def trainer(tmp_path, *overrides, run="run"):
    from editflow.trainer import Trainer

    base = [o for o in IN_PROCESS if "data=shards" not in overrides or not o.startswith("data.toy.")]
    cfg = compose([*base, *overrides])
    OmegaConf.resolve(cfg)
    validate(cfg)
    return Trainer(cfg, tmp_path / run)


@pytest.fixture()
def no_models(monkeypatch):
    """Makes loading a model fail the test: what is checked up front must fail before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the bad input was reported")

    monkeypatch.setattr("editflow.trainer.build_models", refuse)


def shard_dir(directory, samples, manifest_count=None):
    directory.mkdir(parents=True)
    entry = write_shard(directory / "shard-000000.tar", samples)
    write_manifest(directory, {"shards": [entry], "num_samples": len(samples) if manifest_count is None
                               else manifest_count})
    return directory


def toy(n, seed=0):
    return [toy_sample(i, seed=seed, size=64) for i in range(n)]


# ---------------------------------------------------------------- data, before the models


def test_a_set_that_convert_left_empty_is_refused_up_front(tmp_path, cache_dir, no_models):
    empty = shard_dir(tmp_path / "empty", [])
    (empty / "rejects.jsonl").write_text('{"reason": "too_small"}\n')
    with pytest.raises(DataError, match=r"data\.train: .*empty/manifest\.json lists 0 samples.*rejects\.jsonl"):
        trainer(tmp_path, *SHARDS, f"data.train={empty}")
    with pytest.raises(DataError, match=r"data\.train\.broken\.path: .*lists 0 samples"):
        trainer(tmp_path, *SHARDS, f"data.train={{broken: {{path: {empty}}}}}")


@pytest.mark.parametrize("key", ["train", "val"])
def test_a_missing_data_path_names_the_key_before_the_models_load(tmp_path, cache_dir, no_models, key):
    good = shard_dir(tmp_path / "good", toy(4))
    paths = {"train": good, "val": good, key: tmp_path / "nonexistent"}
    with pytest.raises(ConfigError, match=rf"data\.{key}: .*nonexistent does not exist"):
        trainer(tmp_path, *SHARDS, f"data.train={paths['train']}", f"data.val={paths['val']}")


def test_a_shard_missing_from_its_directory_is_named(tmp_path, cache_dir, no_models):
    good = shard_dir(tmp_path / "good", toy(4))
    (good / "shard-000000.tar").unlink()
    with pytest.raises(ConfigError, match=r"data\.train: 1 shard\(s\) listed .* missing, e\.g\. .*shard-000000"):
        trainer(tmp_path, *SHARDS, f"data.train={good}")


def test_train_data_on_the_toy_preset_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"data\.train: the toy data .* add data=shards"):
        validate(compose(["data.train=/data/shards/mine"]))


def test_an_unwritable_run_directory_fails_before_the_models_load(tmp_path, cache_dir, no_models):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"cannot hold checkpoints .* writable hydra\.run\.dir"):
        trainer(tmp_path, run="file/run")


def _encoding_of(tmp_path, source: Path) -> Path:
    """A pre-encoded set as `editflow encode` records it: each source shard's path and listed sha256."""
    enc = tmp_path / "enc" / "train"
    enc.mkdir(parents=True)
    (enc / "000000-shard-000000.tar").write_bytes(b"")
    sha = read_manifest(source)["shards"][0]["sha256"]
    write_manifest(enc, {"encoding": {"settings": {}, "drops": []}, "num_samples": 2, "shards": [
        {"file": "000000-shard-000000.tar", "count": 2, "source": str(source / "shard-000000.tar"),
         "source_sha256": sha}]})
    return enc.parent


def test_pre_encoded_shards_of_other_source_shards_are_refused(tmp_path, cache_dir, no_models):
    """`editflow encode` records the source shards; a data.train that names others is refused, not trained on
    the old encoding without a word."""
    encoded_from, now = shard_dir(tmp_path / "first", toy(2)), shard_dir(tmp_path / "second", toy(2, seed=1))
    enc = _encoding_of(tmp_path, encoded_from)
    with pytest.raises(ConfigError, match=rf"set 'train' was encoded from {encoded_from}, but data\.train is {now}"):
        trainer(tmp_path, *SHARDS, f"data.train={now}", f"data.pre_encoded={enc}")


def test_pre_encoded_shards_follow_their_sources_to_another_mount(tmp_path, cache_dir, no_models):
    """The same shards under another path (another node's mount, a copy) match by their manifest's sha256."""
    encoded_from = shard_dir(tmp_path / "first", toy(2))
    enc = _encoding_of(tmp_path, encoded_from)
    moved = tmp_path / "elsewhere" / "shards"
    shutil.copytree(encoded_from, moved)  # the original stays: not "sources gone, taken on trust"
    # past the source check, the next one (the hand-written encoding has no settings) is what speaks
    with pytest.raises(ConfigError, match="was encoded with other settings"):
        trainer(tmp_path, *SHARDS, f"data.train={moved}", f"data.pre_encoded={enc}")
    (moved / "shard-000000.tar").write_bytes((moved / "shard-000000.tar").read_bytes() + bytes(512))
    listed = read_manifest(moved)
    write_manifest(moved, {**listed, "shards": [{**listed["shards"][0], "sha256": "0" * 64}]})
    with pytest.raises(ConfigError, match=rf"was encoded from {encoded_from}, but data\.train is {moved}"):
        trainer(tmp_path, *SHARDS, f"data.train={moved}", f"data.pre_encoded={enc}")


def test_images_that_make_cpu_steps_take_minutes_are_announced(tmp_path, cache_dir, caplog):
    data = shard_dir(tmp_path / "data", toy(2))
    for base, warned in ((64, False), (1024, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer(tmp_path, *SHARDS, f"data.train={data}", f"data.bucket_base={base}", run=f"run{base}")
        assert ("data.bucket_base=1024: 16384 image tokens per image" in caplog.text) == warned


# ---------------------------------------------------------------- resume, before the models


def test_resume_auto_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, cache_dir, caplog):
    (tmp_path / "run" / "checkpoints" / "step-0000002.tmp").mkdir(parents=True)  # an interrupted save
    with caplog.at_level(logging.INFO):
        assert trainer(tmp_path, "trainer.resume=auto").step == 0
    assert "no complete checkpoint" in caplog.text and "step-0000002.tmp" in caplog.text


def test_a_new_run_into_a_directory_holding_a_run_is_refused_and_changes_nothing(tmp_path, cache_dir, no_models):
    earlier = tmp_path / "run" / "checkpoints" / "step-0000004"
    earlier.mkdir(parents=True)
    (earlier / ckpt.MODEL_FILE).write_bytes(b"weights")
    (earlier / ckpt.MARKER).write_text("4")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 4}\n')
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoints up to step-0000004\).*"
                                              r"trainer\.resume=auto.*hydra\.run\.dir"):
        trainer(tmp_path)
    assert (earlier / ckpt.MODEL_FILE).read_bytes() == b"weights"
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 4}\n'


@pytest.mark.parametrize("target", ["missing", "empty_run"])
def test_an_explicit_resume_without_a_checkpoint_is_an_error(tmp_path, cache_dir, no_models, target):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=rf"trainer\.resume=.*{target}"):
        trainer(tmp_path, f"trainer.resume={tmp_path / target}")


def test_a_checkpoint_of_another_model_config_is_refused_naming_the_keys(tmp_path, cache_dir, no_models):
    cfg = compose(IN_PROCESS)
    cfg.model.connector.hidden_dim = 256
    other = tmp_path / "other" / "checkpoints" / "step-0000002"
    other.mkdir(parents=True)
    (other / ckpt.MODEL_FILE).write_bytes(b"")
    (other / "train_state.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
    (other / ckpt.MARKER).write_text("2")
    with pytest.raises(CheckpointError, match=r"another model config \(model\.connector: .*256"):
        trainer(tmp_path, f"trainer.resume={tmp_path / 'other'}")


# ---------------------------------------------------------------- during training


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("faults")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EDITFLOW_CACHE", str(root / "cache"))
    trainer(root).train()
    monkeypatch.undo()
    return root


def copy_run(checkpointed, tmp_path):
    import shutil

    shutil.copytree(checkpointed / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(checkpointed, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDITFLOW_CACHE", str(checkpointed / "cache"))
    checkpoints = copy_run(checkpointed, tmp_path)
    newest = checkpoints / "step-0000004" / ckpt.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.INFO):
        resumed = trainer(tmp_path, "trainer.resume=auto", "trainer.max_steps=6")
    assert resumed.step == 2
    assert "skipping checkpoint" in caplog.text and "step-0000004" in caplog.text and "damaged" in caplog.text
    expected = load_file(checkpoints / "step-0000002" / ckpt.MODEL_FILE)
    weights = ckpt.trainable_state(resumed.accelerator.unwrap_model(resumed.editor))
    assert all((weights[k] == v).all() for k, v in expected.items())
    for name in ("optimizer.pt", "train_state.json"):  # every file is checked; none left: an error naming all
        path = checkpoints / "step-0000002" / name
        intact = path.read_bytes()
        path.write_bytes(b"{")
        with pytest.raises(CheckpointError, match=rf"no checkpoint loads: .*step-0000004.*step-0000002/{name}"):
            trainer(tmp_path, "trainer.resume=auto")
        path.write_bytes(intact)


def test_edit_eval_and_export_also_skip_a_damaged_newest_checkpoint(checkpointed, tmp_path, caplog):
    from editflow.model_paths import resolve_checkpoint

    checkpoints = copy_run(checkpointed, tmp_path)
    (checkpoints / "step-0000004" / "train_state.json").write_text("")
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(tmp_path / "run") == checkpoints / "step-0000002"
    assert "skipping checkpoint" in caplog.text and "step-0000004" in caplog.text


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(checkpointed, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFLOW_CACHE", str(checkpointed / "cache"))
    checkpoints = copy_run(checkpointed, tmp_path)
    run = trainer(tmp_path, "trainer.resume=auto", "trainer.max_steps=6")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match=r"step 6 .*No space left.*newest complete checkpoint is .*step-0000004"):
        run.train()
    assert ckpt.latest_checkpoint(checkpoints).name == "step-0000004"
    assert not list(checkpoints.glob("*.tmp"))  # the partial save does not keep taking space
    ckpt.check_files(checkpoints / "step-0000004")


def test_too_many_bad_samples_mid_run_stop_with_a_checkpoint(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr("editflow.data.skips.MIN_SEEN", 16)  # judge the rate after 16 samples, not 200
    samples = toy(40)
    for s in samples[1::2]:
        s["tgt.png"] = b"not a png"
    data = shard_dir(tmp_path / "half_bad", samples)
    run = trainer(tmp_path, *SHARDS, f"data.train={data}", "data.max_skip_rate=0.3", "trainer.max_steps=1000",
                  "trainer.checkpoint_every=0", "trainer.log_every=1")
    with pytest.raises(DataError) as info:
        run.train()
    message = str(info.value)
    assert "undecodable_image" in message and "data.max_skip_rate=30.0%" in message and "half_bad" in message
    assert "checkpoint of step" in message and "trainer.resume=auto" in message
    [saved] = ckpt.complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved.name == f"step-{run.step:07d}" and run.step > 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["data/skipped_undecodable_image"] > 0
    resumed = trainer(tmp_path, *SHARDS, f"data.train={data}", "data.max_skip_rate=0.9", "trainer.resume=auto",
                      f"trainer.max_steps={run.step + 1}")
    assert resumed.step == run.step
    resumed.train()
    assert resumed.step == run.step + 1


def test_an_instruction_over_the_encoder_budget_is_skipped_and_the_run_continues(tmp_path, cache_dir):
    samples = toy(12)
    meta = json.loads(samples[3]["json"])
    meta["instruction"] = "Paint the circle a slightly different shade of teal please. " * 60
    samples[3]["json"] = json.dumps(meta).encode()
    data = shard_dir(tmp_path / "long", samples)
    # micro-batch 1: a micro-batch whose only sample is refused is replaced by the next one
    run = trainer(tmp_path, *SHARDS, f"data.train={data}", "data.max_skip_rate=0.5", "trainer.max_steps=14",
                  "trainer.global_batch_size=1", "trainer.micro_batch_size=1", "trainer.log_every=1",
                  "trainer.checkpoint_every=0")
    run.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 15))
    assert metrics[-1]["data/skipped_unencodable"] >= 1
    assert all(m["loss"] == m["loss"] for m in metrics)  # finite: the refused sample never reached the model


def test_region_weights_follow_the_samples_the_encoders_keep(tmp_path, cache_dir):
    import dataclasses

    data = shard_dir(tmp_path / "toy", toy(8))
    run = trainer(tmp_path, *SHARDS, f"data.train={data}", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                  "objective.region_weighting=log")
    batch = next(run.batches)
    long = "Paint the circle a slightly different shade of teal please. " * 60  # over Qwen's max_length
    batch = dataclasses.replace(batch, instructions=[long, *batch.instructions[1:]])
    loss, losses, _ = run.compute_loss(batch)  # the region weights of the 3 samples kept, not of all 4
    assert losses.shape == (3,) and torch.isfinite(loss)
    assert run.encoder.skips.counts["unencodable"] == 1


def test_config_errors_print_one_paragraph_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, EDITFLOW_CACHE=str(tmp_path / "cache"))
    (tmp_path / "file").write_text("")
    for override, key in (("optim.lr=-1", "optim.lr"), ("data.train=/nonexistent", "data.train"),
                          (f"hydra.run.dir={tmp_path / 'file' / 'run'}", "hydra.run.dir")):
        result = subprocess.run([sys.executable, "-m", "editflow.cli", "train", "data=shards", "data.train=/nonexistent",
                                 f"hydra.run.dir={tmp_path / 'run'}", override], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.splitlines()[-1].startswith(f"editflow train: error: {key}")
