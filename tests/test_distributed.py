"""Multi-process training on the CPU: DDP gradients, DeepSpeed ZeRO-2 and ZeRO-3 runs, checkpoints and resume."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from test_train import EXACT, read_metrics, run_train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def test_two_process_gradients_equal_one_process_with_accumulation_two(tmp_path):
    probe = str(ROOT / "tests" / "grad_probe.py")
    subprocess.run([sys.executable, probe, str(tmp_path / "one.pt"), "2"], check=True, timeout=300)
    subprocess.run([*LAUNCH, "--config_file", str(ROOT / "launch/accelerate/cpu_2proc.yaml"), probe,
                    str(tmp_path / "two.pt"), "1"], check=True, timeout=300, capture_output=True)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["sync"] and two["sync"]
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def deepspeed_runs(request, tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp(f"deepspeed_{request.param}")
    config = ROOT / f"launch/accelerate/cpu_deepspeed_{request.param}.yaml"
    launch = [*LAUNCH, "--config_file", str(config), "-m", "editflow.train"]
    common = ("trainer.micro_batch_size=1", *EXACT)  # 2 ranks x 1 x accumulation 2 = global batch 4
    run_train(launch, root / "straight", root / "cache", *common)
    # stop_after acts like SIGUSR1; through DeepSpeed's launcher the requeue code arrives as a failure (1)
    run_train(launch, root / "resumed", root / "cache", *common, "trainer.stop_after=2", code=1)
    assert (root / "resumed" / "PREEMPTED").read_text() == "2"
    run_train(launch, root / "resumed", root / "cache", *common, "trainer.resume=auto")
    return root


def test_deepspeed_checkpoints_hold_every_ranks_shard_and_whole_weights(deepspeed_runs):
    from editflow.models.build import build_models

    checkpoint = deepspeed_runs / "straight" / "checkpoints" / "step-0000004"
    shards = sorted(p.name for p in (checkpoint / "engine").rglob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    weights = load_file(checkpoint / "model.safetensors")
    # gathered from the partitions (ZeRO-3 splits every weight across the ranks): full shapes, every tensor of
    # the model the run trained (its own config: the default's tiny base)
    run_model = build_models(OmegaConf.load(deepspeed_runs / "straight" / "config.yaml").model, seed=0)
    expected = {k: v.shape for k, v in run_model.editor.state_dict().items()}
    assert {k: v.shape for k, v in weights.items()} == expected
    assert (deepspeed_runs / "straight" / "eval.json").exists()  # evaluation ran (all ranks, under ZeRO-3)
    metrics = read_metrics(deepspeed_runs / "straight")
    assert [m["step"] for m in metrics] == [2, 4] and metrics[-1]["samples_seen"] == 16
    optim = OmegaConf.load(deepspeed_runs / "straight" / "config.yaml").optim
    assert metrics[0]["lr"] == pytest.approx(optim.lr * 2 / optim.warmup_steps)  # DeepSpeed steps it once per step


def test_deepspeed_resume_is_bit_identical(deepspeed_runs):
    a = load_file(deepspeed_runs / "straight" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(deepspeed_runs / "resumed" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = read_metrics(deepspeed_runs / "straight"), read_metrics(deepspeed_runs / "resumed")
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
