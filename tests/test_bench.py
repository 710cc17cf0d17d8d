"""`editflow bench train` smoke test on the CPU: the schema, and that both variants step the same model."""

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
