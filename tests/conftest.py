import os

# Tests never reach a hub or a wandb server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402
from editflow.config import compose, register  # noqa: E402

register()
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return compose(["model=tiny"]).model


@pytest.fixture(scope="session")
def tiny_models(tiny_model_cfg):
    from editflow.models.build import build_models

    return build_models(tiny_model_cfg, seed=0)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The main job, once per session: `editflow train` with no overrides (a few minutes)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("default")
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "train", f"hydra.run.dir={root / 'run'}"],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "stdout.txt").write_text(result.stdout)  # what the user saw (tests of the start and the summary)
    (root / "stderr.txt").write_text(result.stderr)
    return root


@pytest.fixture(scope="session")
def quick_model(tmp_path_factory):
    """A few-step run: enough for testing the mechanics of edit/eval, not their quality."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("quick")
    env = dict(os.environ, EDITFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    overrides = ["trainer.max_steps=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                 "data.toy.num_train=16", "data.toy.num_val=8", "data.toy.samples_per_shard=8", "eval.num_samples=2",
                 "eval.steps=1", f"hydra.run.dir={root / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "editflow.train", *overrides], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root
