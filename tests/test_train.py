import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

QUICK = [
    "trainer.max_steps=4", "trainer.log_every=2", "trainer.checkpoint_every=2", "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2", "data.toy.num_train=24", "data.toy.num_val=4", "data.toy.samples_per_shard=10",
    "eval.num_samples=4", "eval.steps=2", "eval.grid_rows=2", "eval.at_start=false",
]


# The encoding cache's contents depend on which batch first saw a sample (float rounding of batched
# Qwen/VAE calls), so exact-trajectory tests run without it.
EXACT = ("trainer.cache_encodings=false",)


def run_train(entry: list[str], run_dir: Path, cache: Path, *overrides: str, code: int = 0):
    env = dict(os.environ, EDITFLOW_CACHE=str(cache), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [*entry, *QUICK, *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == code, result.stderr[-3000:]
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    run_train([sys.executable, "-m", "editflow.cli", "train"], root / "run", root / "cache")
    return root


def test_run_directory_has_every_artifact(quick_run):
    run = quick_run / "run"
    assert (run / "config.yaml").exists()
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [2, 4]
    assert all({"step", "loss", "lr", "grad_norm"} <= m.keys() for m in metrics)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000004"]
    weights = load_file(run / "checkpoints" / "step-0000004" / "model.safetensors")
    assert any(k.startswith("transformer.") for k in weights) and any(k.startswith("connector.") for k in weights)
    assert (run / "checkpoints" / "step-0000004" / "COMPLETE").exists()
    assert list(run.glob("samples-step*.png"))
    result = json.loads((run / "eval.json").read_text())
    assert result["primary"] in result["model"] and result["primary"] in result["baseline"]
    assert isinstance(result["higher_is_better"], bool)
    # toy data was generated into the cache, not the run directory
    assert (quick_run / "cache").is_dir() and not list(run.glob("*.tar"))


def test_python_m_train_is_the_same_app(quick_run):
    run = quick_run / "run_m"
    run_train([sys.executable, "-m", "editflow.train"], run, quick_run / "cache")
    a, b = read_metrics(quick_run / "run"), read_metrics(run)
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)


def test_stopped_and_resumed_run_ends_bit_identical(quick_run):
    """A run stopped half-way and resumed with resume=auto follows the same trajectory exactly."""
    cache = quick_run / "cache"
    straight, resumed = quick_run / "straight", quick_run / "resumed"
    run_train([sys.executable, "-m", "editflow.train"], straight, cache, "trainer.max_steps=8", *EXACT)
    run_train([sys.executable, "-m", "editflow.train"], resumed, cache, "trainer.max_steps=8", "trainer.stop_after=4", *EXACT,
              code=42)  # the requeue exit code
    assert (resumed / "checkpoints" / "step-0000004").exists() and not (resumed / "eval.json").exists()
    run_train([sys.executable, "-m", "editflow.train"], resumed, cache, "trainer.max_steps=8", "trainer.resume=auto", *EXACT)
    a = load_file(straight / "checkpoints" / "step-0000008" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step-0000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(straight)] == [m["loss"] for m in read_metrics(resumed)]


def test_bad_batch_arithmetic_names_the_key(tmp_path):
    env = dict(os.environ, EDITFLOW_CACHE=str(tmp_path / "c"))
    result = subprocess.run(
        [sys.executable, "-m", "editflow.train", *QUICK, "trainer.global_batch_size=5", f"hydra.run.dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "trainer.global_batch_size" in result.stderr


@pytest.mark.parametrize("launcher", [
    ["--num_processes", "1", "--cpu"],
    ["--config_file", str(Path(__file__).resolve().parents[1] / "launch" / "accelerate" / "cpu_2proc.yaml")],
], ids=["1proc", "2proc"])
def test_accelerate_launch_runs_the_same_app(quick_run, launcher):
    run = quick_run / f"accelerate_{len(launcher)}"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "editflow.train"]
    result = run_train(accelerate, run, quick_run / "cache", "trainer.device=cpu")
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [2, 4]
    assert metrics[0]["lr"] == read_metrics(quick_run / "run")[0]["lr"]  # one schedule step per optimizer step
    processes = result.stderr.count("run directory:") + result.stdout.count("run directory:")
    assert processes == (2 if "cpu_2proc" in launcher[-1] else 1)
    assert (run / "checkpoints" / "step-0000004" / "COMPLETE").exists()
    # the summary's CPU time is the job's: every process's, said as such when there are several
    [time_line] = [line for line in (run / "summary.txt").read_text().splitlines() if line.startswith("Time:")]
    assert (" CPU (2 processes):" in time_line) == (processes == 2) and " CPU" in time_line


@pytest.mark.parametrize("name, code, marker", [("SIGUSR1", 42, True), ("SIGINT", 130, False)])
def test_a_signal_mid_run_checkpoints_at_the_step_boundary_and_resumes(quick_run, name, code, marker):
    """SLURM's warning signal: the run saves at the next step boundary, exits 42 with the PREEMPTED marker
    (the template requeues), and resume=auto finishes. Ctrl-C the same, but exits 130 with no marker."""
    import signal
    import time

    run = quick_run / f"stopped-{name}"
    env = dict(os.environ, EDITFLOW_CACHE=str(quick_run / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "editflow.train", *QUICK, "trainer.max_steps=100000", "trainer.log_every=1",
           "trainer.checkpoint_every=0", f"hydra.run.dir={run}"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert process.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    process.send_signal(getattr(signal, name))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == code, stderr[-2000:]
    assert f"received {name}: checkpointing at the next step boundary" in (run / "train.log").read_text()
    assert (run / "PREEMPTED").exists() == marker
    [checkpoint] = [p for p in (run / "checkpoints").iterdir()]
    assert (checkpoint / "COMPLETE").exists()
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 3 <= stopped_at < 100000
    run_train([sys.executable, "-m", "editflow.train"], run, quick_run / "cache", "trainer.resume=auto",
              f"trainer.max_steps={stopped_at + 2}", "trainer.checkpoint_every=0")
    assert read_metrics(run)[-1]["step"] == stopped_at + 2


def test_the_same_signal_twice_stops_at_once_but_slurms_warning_does_not(tmp_path):
    """A step can take minutes on a CPU: a second Ctrl-C or SIGTERM does not wait for its end."""
    import signal

    from accelerate import Accelerator

    from editflow.preemption import Preemption

    preemption = Preemption(Accelerator(cpu=True), tmp_path)
    outside = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN under `nohup ... &`
    for signum in (signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM):
        preemption._request(signum, None)
    assert preemption.requested and not preemption.interrupted
    with pytest.raises(KeyboardInterrupt, match="a second SIGTERM: stopped in the middle of a step"):
        preemption._request(signal.SIGTERM, None)
    with preemption.graceful_ctrl_c():
        assert signal.getsignal(signal.SIGINT) == preemption._request
        preemption._request(signal.SIGINT, None)
        assert preemption.interrupted
        with pytest.raises(KeyboardInterrupt, match="a second SIGINT"):
            preemption._request(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is outside  # Ctrl-C outside the steps: as before (at once)


def test_non_finite_steps_are_skipped_then_stop_the_run(quick_run):
    run = quick_run / "nan"
    result = run_train([sys.executable, "-m", "editflow.train"], run, quick_run / "cache", "optim.lr=1e30",
                       "trainer.max_bad_steps=3", "optim.grad_clip=1e30", "trainer.max_steps=50", code=1)
    assert "steps in a row had a non-finite loss or gradient norm" in result.stderr
    assert "samples [" in result.stderr


def test_logging_throughput_mfu_ema_and_offline_wandb(quick_run):
    run = quick_run / "logging"
    run_train([sys.executable, "-m", "editflow.train"], run, quick_run / "cache", "trainer.ema_decay=0.5",
              "trainer.ema_cpu=true", "trainer.peak_tflops=0.5")
    record = read_metrics(run)[-1]
    assert record["tflops_per_s"] > 0 and record["mfu"] == pytest.approx(record["tflops_per_s"] / 0.5)
    assert record["samples_per_s"] > 0 and any(k.startswith("loss/sigma_") for k in record)
    checkpoint = run / "checkpoints" / "step-0000004"
    ema = torch.load(checkpoint / "ema.pt")
    weights = load_file(checkpoint / "model.safetensors")
    assert set(weights) - set(ema) == {"connector.pooled_base"}  # every parameter averaged; a buffer is saved as is
    assert any(not torch.equal(ema[k], weights[k]) for k in weights if k in ema)  # an average, not a copy
    assert list((run / "wandb").glob("offline-run-*"))  # wandb is offline by default


def test_a_second_ctrl_c_exits_130_naming_the_newest_checkpoint(tmp_path, monkeypatch, capsys, cache_dir):
    """What `editflow train` prints when a step is cut short: no traceback, the checkpoint to continue from."""
    import editflow.trainer
    from editflow.commands.train import main

    class Checkpointer:
        def latest(self):
            return tmp_path / "run" / "checkpoints" / "step-0000040"

    class CutShort:
        preempted = interrupted = False
        checkpointer = Checkpointer()

        def __init__(self, cfg, run_dir):
            pass

        def train(self):
            raise KeyboardInterrupt("a second SIGINT: stopped in the middle of a step, without a checkpoint")

    monkeypatch.setattr(editflow.trainer, "Trainer", CutShort)
    with pytest.raises(SystemExit) as exit_:
        main([f"hydra.run.dir={tmp_path / 'run'}"])
    assert exit_.value.code == 130
    assert ("editflow train: interrupted (a second SIGINT: stopped in the middle of a step, without a checkpoint); "
            f"newest checkpoint: {tmp_path}/run/checkpoints/step-0000040 (continue with trainer.resume=auto)"
            ) in capsys.readouterr().err


def test_eval_at_start_keeps_the_untrained_scores_beside_the_final_ones(tmp_path):
    run = tmp_path / "run"
    result = run_train([sys.executable, "-m", "editflow.cli", "train"], run, tmp_path / "cache", "eval.at_start=true")
    report = json.loads((run / "eval.json").read_text())
    start, end = report["start"]["model"], report["model"]
    assert report["start"]["step"] == 0 and report["step"] == 4 and start.keys() == end.keys()
    assert start["mae"] != end["mae"]  # scored before the first step, not a copy of the end
    assert (run / "samples-step0000000.png").exists() and (run / "samples-step0000004.png").exists()
    # the start is reported once, in eval.json and the summary, not as the first logged step's evaluation
    assert not any(key.startswith("eval/") for key in read_metrics(run)[0])
    summary = (run / "summary.txt").read_text()
    assert "at step 0: mae" in summary and "samples-step0000000.png" in summary
    row = next(line.split() for line in summary.splitlines() if line.split()[:1] == ["all"])
    assert float(row[-2]) == pytest.approx(start["mae"], abs=1e-4) and float(row[1]) == pytest.approx(end["mae"], abs=1e-4)
    assert result.stdout.rstrip().endswith(summary.rstrip())
