import json
import subprocess
import sys

import numpy as np

from editflow.data.shards import read_manifest, read_samples, sha256_file, shard_urls
from editflow.data.toy import make_edit
from editflow.data.toy_shards import write_toy_shards


def test_toy_shards_round_trip_exactly(tmp_path):
    out = write_toy_shards(tmp_path / "toy", num=25, seed=5, samples_per_shard=10, progress=False)
    manifest = read_manifest(out)
    assert [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    for entry in manifest["shards"]:
        assert sha256_file(out / entry["file"]) == entry["sha256"]
    samples = read_samples(shard_urls(out))
    assert len(samples) == 25
    for i, sample in enumerate(samples):
        edit = make_edit(i, seed=5)
        assert sample.key == edit.key and sample.instruction == edit.instruction
        assert np.array_equal(np.asarray(sample.source), np.asarray(edit.source))
        assert np.array_equal(np.asarray(sample.target), np.asarray(edit.target))
        assert np.array_equal(np.asarray(sample.mask), np.asarray(edit.mask))
        assert sample.meta["task"] == edit.meta["task"]


def test_rerun_keeps_finished_shards_and_rejects_other_params(tmp_path):
    out = write_toy_shards(tmp_path / "toy", num=20, seed=0, samples_per_shard=10, progress=False)
    first = out / "toy-000000.tar"
    stamp = first.stat().st_mtime_ns
    (out / "toy-000001.tar").unlink()  # as if the run had died before finishing shard 1
    write_toy_shards(out, num=20, seed=0, samples_per_shard=10, progress=False)
    assert first.stat().st_mtime_ns == stamp
    assert len(read_samples(shard_urls(out))) == 20
    try:
        write_toy_shards(out, num=20, seed=1, samples_per_shard=10, progress=False)
    except ValueError as err:
        assert "seed" in str(err)
    else:
        raise AssertionError("different parameters into the same directory must be refused")


def test_cli_writes_shards(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "editflow.cli", "data", "toy", "--out", str(out), "--num", "12",
                    "--seed", "2", "--samples-per-shard", "5"], check=True, capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 12
    assert len(list(out.glob("*.tar"))) == 3 and not list(out.glob("*.tmp"))
