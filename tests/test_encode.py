"""Pre-encoded training data (`editflow encode`, `data.pre_encoded`)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from editflow.config import compose
from editflow.data.preencoded import TENSORS_EXT, check_pre_encoded, decode_encoded
from editflow.data.regions import latent_region
from editflow.data.samples import SampleError
from editflow.data.shards import iter_tar
from editflow.data.sources import train_sets

from test_train import EXACT, QUICK, read_metrics, run_train

DROPS = ["objective.drop_text=0.2", "objective.drop_image=0.1", "objective.drop_both=0.1"]


def run_encode(root, *overrides: str, code: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "encode", *QUICK, *overrides], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == code, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    # data.pre_encoded (as in experiment=lora_24gb) does not stop encode from reading the source shards
    run_encode(root, *DROPS, f"encode.out={root / 'enc'}", "encode.batch_size=3",
               f"data.pre_encoded={root / 'enc'}")
    return root


def test_encoded_shards_mirror_the_source_with_the_stored_tensors(encoded, monkeypatch):
    monkeypatch.setenv("EDITFLOW_CACHE", str(encoded / "cache"))
    cfg = compose([*QUICK, *DROPS])
    source = train_sets(cfg.data)[0]
    manifest = json.loads((encoded / "enc" / "toy" / "manifest.json").read_text())
    assert manifest["num_samples"] == 24 and len(manifest["shards"]) == len(source.urls) == 3
    assert manifest["encoding"]["drops"] == ["text", "image", "both"]
    assert manifest["encoding"]["settings"]["data.bucket_base"] == 64

    from editflow.data.samples import decode_sample
    from editflow.data.stream import collate_images
    from editflow.frozen_encoders import FrozenEncoder, drop_inputs
    from editflow.models.build import build_models

    models = build_models(cfg.model)
    encoder = FrozenEncoder(models.codec, models.conditioner)
    raw = next(iter_tar(source.urls[0]))
    stored = decode_encoded(next(iter_tar(str(encoded / "enc" / "toy" / manifest["shards"][0]["file"]))))
    assert stored.key == raw["__key__"]  # same order as the source shard
    sample = decode_sample(raw)
    batch = collate_images([sample], (64, 64))
    torch.testing.assert_close(stored.tensors["target"], encoder.latents(batch.target)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored.tensors["source"], encoder.latents(batch.source)[0], atol=1e-5, rtol=1e-5)
    for drop, field in [(None, "states"), ("text", "states_drop_text"), ("image", "states_drop_image"),
                        ("both", "states_drop_both")]:
        text, image = drop_inputs(sample.instruction, batch.source_images[0], drop)
        expected = encoder.states([image], [text])[0]
        assert stored.tensors[field].shape == expected.shape, field
        torch.testing.assert_close(stored.tensors[field], expected, atol=1e-4, rtol=1e-4)
    # the image is gone from what Qwen read when it was dropped
    assert stored.tensors["states_drop_image"].shape[0] < stored.tensors["states"].shape[0]
    # the changed region (objective.region_weighting): the toy mask, pooled to the latent grid
    region = latent_region(torch.from_numpy(np.asarray(sample.mask) > 127)[None], stored.tensors["target"].shape[-2:])
    assert region.any() and torch.equal(stored.tensors["region"].bool(), region[0])


def test_training_on_pre_encoded_data_follows_the_on_the_fly_run(encoded):
    cache = encoded / "cache"
    online, stored = encoded / "online", encoded / "stored"
    entry = [sys.executable, "-m", "editflow.train"]
    run_train(entry, online, cache, *DROPS, *EXACT, "trainer.max_steps=6", "trainer.keep_last=5")
    run_train(entry, stored, cache, *DROPS, *EXACT, "trainer.max_steps=6", "trainer.keep_last=5",
              f"data.pre_encoded={encoded / 'enc'}")
    a, b = read_metrics(online), read_metrics(stored)
    # equal up to float rounding: the stored tensors were encoded in other batches than the run's
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    wa = load_file(online / "checkpoints" / "step-0000006" / "model.safetensors")
    wb = load_file(stored / "checkpoints" / "step-0000006" / "model.safetensors")
    start = load_file(online / "checkpoints" / "step-0000002" / "model.safetensors")
    for key in wa:
        moved = (wa[key] - start[key]).abs().max()
        assert (wa[key] - wb[key]).abs().max() <= 1e-3 * moved + 1e-7, key
    assert (stored / "eval.json").exists()  # evaluation still runs (Qwen and the VAE loaded for it)


def test_pre_encoded_training_loads_qwen_and_the_vae_only_for_evaluation(encoded, monkeypatch, tmp_path):
    from editflow.trainer import Trainer

    monkeypatch.setenv("EDITFLOW_CACHE", str(encoded / "cache"))
    cfg = compose([*QUICK, *DROPS, f"data.pre_encoded={encoded / 'enc'}", "logging.wandb=false"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.conditioner is None and trainer.codec is None
    assert trainer.editor.connector.sizes["qwen_dim"] == 64  # from the encoding's record (tiny Qwen)
    pipe = trainer.pipeline()
    assert trainer.conditioner is not None and pipe.conditioner is trainer.conditioner


def test_a_run_with_other_settings_is_refused(encoded, monkeypatch):
    monkeypatch.setenv("EDITFLOW_CACHE", str(encoded / "cache"))
    cfg = compose([*QUICK, *DROPS, f"data.pre_encoded={encoded / 'enc'}"])
    assert check_pre_encoded(train_sets(cfg.data), cfg)
    other = compose([*QUICK, *DROPS, f"data.pre_encoded={encoded / 'enc'}", "model.qwen.hidden_layer=-2"])
    with pytest.raises(ValueError, match=r"model\.qwen\.hidden_layer \(encoded with -1, this run has -2\)"):
        check_pre_encoded(train_sets(other.data), other)
    # data.train pointing at the encoded directory itself is recognised too
    direct = compose(["data=shards", f"data.train={encoded / 'enc' / 'toy'}", "data.bucket_base=64",
                      "objective.drop_text=0.2"])
    assert check_pre_encoded(train_sets(direct.data), direct)


def test_missing_dropout_states_are_named(tmp_path):
    root = tmp_path
    run_encode(root, f"encode.out={root / 'enc'}")  # no dropout: states only
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "-m", "editflow.train", *QUICK, "objective.drop_both=0.1",
                             f"data.pre_encoded={root / 'enc'}", f"hydra.run.dir={root / 'run'}"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "holds no Qwen states for dropping ['both']" in result.stderr


def rewrite_first_member(shard, suffix: str, change) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == target:
                data = change(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_encode_resumes_keeps_finished_shards_and_rejects_bad_samples(tmp_path):
    from editflow.data.toy_shards import write_toy_shards
    from editflow.encode_shards import encode

    src = write_toy_shards(tmp_path / "src", 6, samples_per_shard=3, progress=False)
    rewrite_first_member(src / "toy-000000.tar", ".tgt.png", lambda data: b"not a png")
    too_long = lambda data: json.dumps({**json.loads(data), "instruction": "paint it red " * 300}).encode()
    rewrite_first_member(src / "toy-000001.tar", ".json", too_long)  # over model.qwen.max_length
    overrides = ["data=shards", f"data.train={src}", "data.bucket_base=64", f"encode.out={tmp_path / 'enc'}"]
    out = encode(compose(overrides)) / "train"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["rejected"] == {"undecodable_image": 1, "unencodable": 1}
    assert [e["count"] for e in manifest["shards"]] == [2, 2]
    assert [e["source"] for e in manifest["shards"]] == [str((src / f"toy-00000{i}.tar").resolve()) for i in (0, 1)]
    listed = json.loads((src / "manifest.json").read_text())["shards"]  # what finds them on another mount
    assert [e["source_sha256"] for e in manifest["shards"]] == [listed[i]["sha256"] for i in (0, 1)]
    kept = out / manifest["shards"][1]["file"]
    stamp = kept.stat().st_mtime_ns
    redo = out / manifest["shards"][0]["file"]
    os.unlink(f"{redo}.done.json")  # as if the encode had stopped while writing this shard
    encode(compose(overrides))
    again = json.loads((out / "manifest.json").read_text())
    assert kept.stat().st_mtime_ns == stamp and again["shards"][1] == manifest["shards"][1]
    summary = lambda m: [(e["file"], e["count"], e["rejected"]) for e in m["shards"]]  # tar headers hold times
    assert summary(again) == summary(manifest) and again["rejected"] == manifest["rejected"]
    with pytest.raises(ValueError, match="holds shards encoded with"):
        encode(compose([*overrides, "model.qwen.hidden_layer=-2"]))


def test_bad_encoded_sample_names_shard_key_and_field():
    with pytest.raises(SampleError, match=rf"shard s\.tar, key k1: no {TENSORS_EXT} field"):
        decode_encoded({"__key__": "k1", "__url__": "s.tar", "json": b"{}"})
    with pytest.raises(SampleError, match="shard s.tar, key k2: unreadable"):
        decode_encoded({"__key__": "k2", "__url__": "s.tar", "json": b"{}", TENSORS_EXT: b"garbage"})


def test_two_processes_split_the_shards_and_write_the_same_data(encoded):
    env = dict(os.environ, EDITFLOW_CACHE=str(encoded / "cache"), HF_HUB_OFFLINE="1")
    config = os.path.join(os.path.dirname(__file__), "..", "launch", "accelerate", "cpu_2proc.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    result = subprocess.run([*launch, "-m", "editflow.preencode", *QUICK, *DROPS, "encode.batch_size=3",
                             f"encode.out={encoded / 'enc2'}"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((encoded / "enc" / "toy" / "manifest.json").read_text())
    two = json.loads((encoded / "enc2" / "toy" / "manifest.json").read_text())
    assert [(e["file"], e["count"]) for e in one["shards"]] == [(e["file"], e["count"]) for e in two["shards"]]
    for entry in one["shards"]:
        a = [decode_encoded(r) for r in iter_tar(str(encoded / "enc" / "toy" / entry["file"]))]
        b = [decode_encoded(r) for r in iter_tar(str(encoded / "enc2" / "toy" / entry["file"]))]
        assert [s.key for s in a] == [s.key for s in b]
        for x, y in zip(a, b):  # equal up to the float rounding of another thread count
            assert x.tensors.keys() == y.tensors.keys()
            for k in x.tensors:
                torch.testing.assert_close(x.tensors[k], y.tensors[k], atol=1e-5, rtol=1e-5)


@pytest.fixture()
def encode_error(tmp_path, monkeypatch, capsys):
    """Runs `editflow encode` in this process and returns its error message; loading a model fails the test."""
    from editflow.commands.encode import main

    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the bad input was reported")

    monkeypatch.setattr("editflow.encode_shards.build_frozen", refuse)

    def run(*overrides: str) -> str:
        with pytest.raises(SystemExit) as info:
            main([*QUICK, *overrides])
        message = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in message
        return message

    return run


def test_encode_without_a_usable_out_is_one_paragraph(tmp_path, encode_error):
    assert "editflow encode: error: encode.out is not set" in encode_error()
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert f"encode.out={out}: {tmp_path / 'file'} is a file" in encode_error(f"encode.out={out}")


def test_encode_into_a_directory_of_another_encoding_names_the_differing_settings(tmp_path, encode_error):
    from editflow.data.preencoded import encoding_settings

    claimed = tmp_path / "enc" / "toy"
    claimed.mkdir(parents=True)
    marker = {"settings": encoding_settings(compose(QUICK)), "drops": [], "qwen_hidden_size": 64}
    (claimed / "encoding.json").write_text(json.dumps(marker))
    message = encode_error(f"encode.out={tmp_path / 'enc'}", "data.bucket_base=128")
    assert f"{claimed} holds shards encoded with other settings: data.bucket_base (encoded with 64, this run " \
           "has 128)." in message
    assert "model.qwen" not in message  # only what differs
    assert sorted(p.name for p in claimed.iterdir()) == ["encoding.json"]  # nothing written
