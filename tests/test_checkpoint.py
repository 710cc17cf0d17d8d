import pytest
import torch
from torch import nn

from editflow import checkpoint as ckpt
from editflow.errors import CheckpointError


def save(root, step, model, **extra):
    return ckpt.save_checkpoint(root, step, model, extra=extra or {"optimizer": {"x": 1}}, train_state={"step": step})


def test_crash_mid_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    save(tmp_path, 10, model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        save(tmp_path, 20, model)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000010"
    assert (tmp_path / "step-0000020.tmp").exists()  # the half-written save is not a checkpoint
    save(tmp_path, 20, model)  # the next save of that step replaces the leftovers
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000020" and not (tmp_path / "step-0000020.tmp").exists()


def test_keep_last_and_weights_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        ckpt.save_checkpoint(tmp_path, step, model, extra={}, train_state={"step": step}, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    fresh = nn.Linear(3, 2)
    ckpt.load_model_weights(fresh, ckpt.latest_checkpoint(tmp_path))
    assert torch.equal(fresh.weight, torch.full((2, 3), 4.0)) and torch.equal(fresh.bias, model.bias)


def test_checkpoint_without_marker_is_ignored(tmp_path):
    model = nn.Linear(3, 2)
    path = save(tmp_path, 5, model)
    (path / ckpt.MARKER).unlink()
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_loading_into_the_wrong_model_names_the_tensors(tmp_path):
    path = save(tmp_path, 1, nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="no parameter"):
        ckpt.load_model_weights(nn.Sequential(nn.Linear(3, 2)), path)
