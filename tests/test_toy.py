import json
from pathlib import Path

import numpy as np
import pytest

from editflow.data.shards import read_manifest
from editflow.data.toy import EDIT_KINDS, make_edit, weighted_kinds


def test_same_seed_same_pixels_and_text():
    a, b = make_edit(7, seed=3), make_edit(7, seed=3)
    assert a.instruction == b.instruction
    assert np.array_equal(np.asarray(a.source), np.asarray(b.source))
    assert np.array_equal(np.asarray(a.target), np.asarray(b.target))


def test_other_seed_or_index_gives_other_samples():
    base = make_edit(0, seed=0)
    others = [make_edit(0, seed=1), make_edit(5, seed=0)]
    assert all(not np.array_equal(np.asarray(base.source), np.asarray(o.source)) for o in others)


def test_every_kind_appears_with_exact_changed_region():
    edits = [make_edit(i, seed=11) for i in range(50)]
    assert {e.meta["task"] for e in edits} == set(EDIT_KINDS)
    for e in edits:
        diff = np.any(np.asarray(e.source) != np.asarray(e.target), axis=-1)
        assert diff.any(), e.instruction  # every edit changes something
        assert np.array_equal(np.asarray(e.mask) > 0, diff)
        assert e.instruction.strip() and e.instruction[0].isupper()
        assert e.meta["changed_fraction"] == pytest.approx(diff.mean())


def test_instructions_are_varied_english():
    texts = {make_edit(i, seed=2).instruction for i in range(200)}
    first_words = {t.split()[0] for t in texts}
    assert len(texts) > 150 and len(first_words) >= 12
    assert not any(" a orange" in t or " a a" in t for t in texts)


def test_recolor_changes_only_the_named_object():
    edit = next(e for e in (make_edit(i, seed=4) for i in range(20)) if e.meta["task"] == "recolor")
    obj = edit.meta["edit"]["object"]
    assert obj["color"] in edit.instruction or obj["shape"] in edit.instruction
    assert edit.meta["edit"]["new_color"] in edit.instruction
    assert 0 < edit.meta["changed_fraction"] < 0.2


def test_kind_weights_set_each_kinds_share_of_the_stream():
    kinds = weighted_kinds({"recolor": 3, "move": 0})
    tasks = [make_edit(i, seed=5, kinds=kinds).meta["task"] for i in range(60)]
    assert {k: tasks.count(k) for k in EDIT_KINDS} == {"recolor": 30, "add": 10, "remove": 10, "move": 0,
                                                      "background": 10}
    assert weighted_kinds(None) == weighted_kinds({}) == EDIT_KINDS
    with pytest.raises(ValueError, match="unknown edit kind.*'recolour'"):
        weighted_kinds({"recolour": 2})


def test_weighted_training_split_is_cached_apart_and_the_held_out_split_stays_balanced(tmp_path):
    from omegaconf import OmegaConf

    from editflow.data.sources import ensure_toy, toy_dir

    def cfg(**weights):
        return OmegaConf.create({"cache_dir": str(tmp_path), "num_train": 12, "num_val": 10, "seed": 0, "size": 32,
                                 "samples_per_shard": 6, "kind_weights": {k: weights.get(k, 1) for k in EDIT_KINDS}})

    weighted, plain = cfg(recolor=2, background=0), cfg()
    assert toy_dir(weighted, "train") != toy_dir(plain, "train")
    assert toy_dir(weighted, "val") == toy_dir(plain, "val")  # one held-out set to compare runs on

    def tasks(directory):
        import webdataset as wds

        return [json.loads(s["json"])["task"] for s in wds.WebDataset(sorted(map(str, directory.glob("*.tar"))),
                                                                        shardshuffle=False)]

    train = tasks(ensure_toy(weighted, "train", progress=False))
    assert train.count("recolor") == 6 and "background" not in train  # 2 in every 5
    assert sorted(tasks(ensure_toy(weighted, "val", progress=False))) == sorted(EDIT_KINDS * 2)
    assert read_manifest(toy_dir(weighted, "train"))["params"]["kinds"].count("recolor") == 2


@pytest.mark.parametrize("size", [32, 128])
def test_other_sizes(size):
    edit = make_edit(1, size=size)
    assert edit.source.size == edit.target.size == edit.mask.size == (size, size)


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        make_edit(0, size=60)


def test_runs_started_together_on_one_cache_generate_the_toy_set_once(tmp_path):
    import subprocess
    import sys

    script = ("import sys; from omegaconf import OmegaConf; from editflow.data.sources import ensure_toy; "
              "print(ensure_toy(OmegaConf.create({'cache_dir': sys.argv[1], 'num_train': 300, 'num_val': 8, 'seed': 0, "
              "'size': 64, 'samples_per_shard': 5}), 'train', progress=False))")
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-1500:] for _, err in outputs]
    directory = Path(outputs[0][0].strip())
    assert read_manifest(directory)["num_samples"] == 300 and len(list(directory.glob("*.tar"))) == 60
    assert not list(directory.glob("*.tmp"))


def data_toy(capsys, *args) -> tuple[int, str]:
    """`editflow data toy ARGS` in this process: (exit code, stderr)."""
    from editflow.commands.data import main

    with pytest.raises(SystemExit) as info:
        main(["toy", *map(str, args)])
    message = capsys.readouterr().err
    assert "Traceback" not in message
    return info.value.code, message


@pytest.mark.parametrize("args, named", [
    (["--size", "63"], "--size must be a multiple of 8 and at least 24, got 63"),
    (["--size", "0"], "--size must be a multiple of 8 and at least 24, got 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be at least 1, got 0"),
    (["--num", "-3"], "--num must be at least 1, got -3"),
    (["--kind-weights", "recolour=2"], "--kind-weights recolour=2: unknown edit kind(s) ['recolour']"),
    (["--kind-weights", "recolor=two"], "--kind-weights recolor=two: 'recolor=two' is not KIND=N"),
    (["--kind-weights", "recolor=0,add=0,remove=0,move=0,background=0"],
     "--kind-weights recolor=0,add=0,remove=0,move=0,background=0: every edit kind has weight 0"),
])
def test_toy_options_that_cannot_work_are_usage_errors(tmp_path, capsys, args, named):
    code, message = data_toy(capsys, "--out", tmp_path / "toy", "--num", 5, *args)
    assert code == 2 and f"editflow data toy: error: {named}" in message
    assert not (tmp_path / "toy").exists()  # nothing written


def test_toy_out_that_is_a_file_or_holds_other_shards_is_refused(tmp_path, capsys):
    from editflow.data.shards import write_manifest
    from editflow.data.toy_shards import write_toy_shards

    (tmp_path / "file").write_text("")
    code, message = data_toy(capsys, "--out", tmp_path / "file", "--num", 5)
    assert code == 2 and f"--out {tmp_path / 'file'} is a file" in message
    converted = tmp_path / "converted"  # as `editflow data convert` leaves it
    converted.mkdir()
    write_manifest(converted, {"params": {"format": "jsonl"}, "shards": [{"file": "shard-000000.tar", "count": 3}]})
    code, message = data_toy(capsys, "--out", converted, "--num", 5)
    assert code == 1 and f"{converted} holds other shards (1 listed in its manifest.json, not toy edits)" in message
    toy = write_toy_shards(tmp_path / "toy", 4, progress=False)
    code, message = data_toy(capsys, "--out", toy, "--num", 6, "--seed", 3)
    assert code == 1 and f"{toy} holds toy shards made with other settings: num 4 (asked for 6), seed 0 " \
                         "(asked for 3);" in message
    code, message = data_toy(capsys, "--out", toy, "--num", 4, "--kind-weights", "recolor=2")
    assert code == 1 and "kinds None (asked for ['recolor', 'recolor', 'add', 'remove', 'move', 'background'])" \
        in message  # another mix of kinds is another toy set: never mixed into this one
    assert sorted(p.name for p in converted.iterdir()) == ["manifest.json"]  # nothing written
    assert sorted(p.name for p in toy.iterdir()) == ["manifest.json", "toy-000000.tar"]


def test_toy_command_writes_the_asked_mix_of_kinds(tmp_path, capsys):
    import webdataset as wds

    from editflow.commands.data import main

    main(["toy", "--out", str(tmp_path / "toy"), "--num", "8", "--size", "32", "--kind-weights", "recolor=3, move=0"])
    samples = wds.WebDataset(str(tmp_path / "toy" / "toy-000000.tar"), shardshuffle=False)
    assert [json.loads(s["json"])["task"] for s in samples] == ["recolor"] * 3 + ["add", "remove", "background"] + \
        ["recolor"] * 2
