"""Mixing weights of training sets: a set's size by default (the natural mixture), an explicit weight overrides."""

import pytest
from omegaconf import OmegaConf

from editflow.config import compose, validate
from editflow.config_schema import DataConfig
from editflow.data.shards import write_manifest
from editflow.data.sources import set_names, train_sets
from editflow.errors import ConfigError


def shard_dir(path, samples: int):
    path.mkdir(parents=True)
    (path / "shard-000000.tar").write_bytes(b"")
    write_manifest(path, {"shards": [{"file": "shard-000000.tar", "count": samples}], "num_samples": samples})
    return str(path)


def test_sets_without_a_weight_are_drawn_in_proportion_to_their_size(tmp_path):
    omni, hq, ultra = (shard_dir(tmp_path / n, s) for n, s in (("omni", 600), ("hq", 250), ("ultra", 150)))
    natural = OmegaConf.structured(DataConfig(kind="shards", train={"omni": {"path": omni},
                                                                    "hq": {"path": hq, "weight": None},
                                                                    "ultra": {"path": [ultra]}}))
    assert [(s.name, s.weight) for s in train_sets(natural)] == [("omni", 0.6), ("hq", 0.25), ("ultra", 0.15)]
    natural.train.ultra.weight = 0.5  # an explicit weight overrides; the others keep their natural share
    assert [s.weight for s in train_sets(natural)] == [0.6, 0.25, 0.5]


def test_a_set_of_unknown_size_needs_a_weight(tmp_path):
    for i in range(4):  # bare .tar files without a manifest: they exist, their sample count is unknown
        (tmp_path / f"x-{i:03d}.tar").write_bytes(b"")
    cfg = OmegaConf.structured(DataConfig(kind="shards", train={"a": {"path": str(tmp_path / "x-{000..003}.tar")}}))
    with pytest.raises(ValueError, match=r"data.train.a: no weight, and its size is unknown"):
        train_sets(cfg)


@pytest.mark.parametrize("entry, key", [("{a: {path: /x, weight: -1}}", r"data\.train\.a\.weight: expected a number >= 0"),
                                        ("{a: {path: /x, wieght: 1}}", r"data\.train\.a\.wieght: unknown key"),
                                        ("{a: {weight: 1}}", r"data\.train\.a: expected \{path"),
                                        ("[/x, 3]", r"data\.train: expected a shard directory or a list")])
def test_a_malformed_set_names_its_key_before_any_data_is_read(entry, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose(["data=shards", f"data.train={entry}"]))


def test_the_8xa100_preset_uses_the_natural_mixture():
    cfg = compose(["experiment=gpt_image_edit_8xa100"])
    assert set_names(cfg.data) == [("omniedit", None), ("hqedit", None), ("ultraedit", None)]
    cfg = compose(["experiment=gpt_image_edit_8xa100", "data.train.hqedit.weight=0.3"])
    assert dict(set_names(cfg.data))["hqedit"] == 0.3
