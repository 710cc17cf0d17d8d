"""`editflow bench train` and `editflow bench data` smoke tests on the CPU: the schemas, and that both train
variants step the same model."""

import json
import subprocess
import sys

import pytest


def test_bench_train_writes_the_result_schema(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "bench", "train", "--steps", "2", "--warmup", "1",
                             "--text-tokens", "16", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"].startswith("cpu") and data["peak_tflops"] > 0 and "bench train" in data["command"]
    for variant in ("editflow", "reference"):
        numbers = data[variant]
        assert {"samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb"} <= numbers.keys()
        assert numbers["samples_per_s"] > 0 and 0 < numbers["mfu"] < 1 and numbers["flops_per_step"] > 0
        # tokens/s counts target + source image tokens and the text tokens of every sample
        assert numbers["tokens_per_s"] == pytest.approx(numbers["samples_per_s"] * (2 * (64 // 16) ** 2 + 16))
    # same architecture, weights and inputs, and on the CPU the same kernels: the same trajectory
    assert data["editflow"]["final_loss"] == pytest.approx(data["reference"]["final_loss"], rel=1e-5)
    assert data["editflow"]["flops_per_step"] == data["reference"]["flops_per_step"]


def test_bench_rejects_a_bad_resolution(tmp_path):
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "bench", "train", "--resolution", "100",
                             "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--resolution must be a multiple of 16" in result.stderr


@pytest.mark.parametrize("loader", [["data.decode_threads=1"], ["data.num_workers=1"]], ids=["threads", "workers"])
def test_bench_data_writes_the_result_schema(tmp_path, loader):
    out = tmp_path / "data.json"
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "bench", "data", "--pairs", "6", "--side", "64",
                             "--samples", "4", "--rounds", "2", "--profile", "3", "--workdir", str(work), "model=tiny",
                             "data.bucket_base=64", *loader, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["command"].startswith("editflow bench data --pairs 6") and data["device"].startswith("cpu")
    threads = loader[0].startswith("data.decode_threads")
    assert (data["workers"], data["decode_threads"]) == ((0, 1) if threads else (1, 0))
    assert data["cpu"] >= 1 and data["cores_used"] == 1
    assert ("(1 decode thread)" if threads else "(1 worker process)") in result.stderr
    names = ("loader", "loader_one_thread", "decode", "encoded")
    assert all(data[f"{n}_samples_per_s"] > 0 and data["samples_per_cpu_s"][n] > 0 for n in names)
    assert len(data["rounds"]) == 2
    for row in data["rounds"]:  # the ratios are those of one round's measurements, not of different runs
        assert row["ratio_per_core"] == pytest.approx(row["loader_samples_per_cpu_s"] / row["decode_samples_per_cpu_s"])
        assert row["ratio_per_core_wall"] == pytest.approx(row["loader_samples_per_s"] / row["decode_samples_per_s"])
    ratios = [r["ratio_per_core"] for r in data["rounds"]]
    assert data["ratio_per_core"] == {"median": pytest.approx(sum(ratios) / 2), "min": min(ratios), "max": max(ratios)}
    assert data["setup"]["sizes"] == [[64, 64], [64, 96], [96, 64]] and data["setup"]["bucket_base"] == 64
    assert len(data["profile_one_thread"]) == 3
    assert not any(work.iterdir())  # the generated shards are removed


def test_bench_data_rejects_bad_sizes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "bench", "data", "--side", "100",
                             "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--side must be a multiple of 16" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/nonexistent-editflow"], "--workdir /nonexistent-editflow is not a directory"),
    (["--out", "FILE/x.json"], "FILE is not a writable directory")])
def test_bench_data_refuses_outputs_it_could_not_write_before_timing(tmp_path, monkeypatch, capsys, args, message):
    from editflow.commands.bench import bench_data_main

    (tmp_path / "FILE").write_text("")
    monkeypatch.setattr("editflow.bench_data.run", lambda *a: pytest.fail("the benchmark ran"))
    args = [str(tmp_path / a) if a.startswith("FILE") else a for a in args]
    with pytest.raises(SystemExit) as exit_:
        bench_data_main([*args, "--pairs", "2"])
    assert exit_.value.code == 2 and message.replace("FILE", str(tmp_path / "FILE")) in capsys.readouterr().err


@pytest.mark.parametrize("command, override, key", [
    ("train", "model.trainable=bogus", "model.trainable"), ("train", "+trainer.max_step=5", "trainer.max_step"),
    ("data", "data.decode_threads=-1", "data.decode_threads")])
def test_bench_refuses_a_bad_value_naming_its_key(tmp_path, command, override, key):
    """The benches check the groups they read, as training does: nothing is timed on a config that would not run."""
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "bench", command, override,
                             "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and not (tmp_path / "x.json").exists()
    assert f"{key}:" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
