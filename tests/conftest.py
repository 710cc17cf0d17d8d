import os

# Tests never reach a hub or a wandb server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from editflow.config import CONFIG_DIR, register_resolvers  # noqa: E402

register_resolvers()
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return OmegaConf.load(CONFIG_DIR / "model" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_models(tiny_model_cfg):
    from editflow.models.build import build_models

    return build_models(tiny_model_cfg, seed=0)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
