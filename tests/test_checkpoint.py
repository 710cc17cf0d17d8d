import pytest
import torch
from accelerate import Accelerator
from torch import nn

from editflow import checkpoint as ckpt
from editflow.checkpointer import Checkpointer
from editflow.errors import CheckpointError


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def checkpointer(root, model, keep_last=None, **entries):
    """The training run's own save/restore path, on one process."""
    saver = Checkpointer(root, Accelerator(cpu=True), model, sharded=False, keep_last=keep_last, config={})
    for name, obj in entries.items():
        saver.register(name, obj)
    return saver


def save(root, step, model, **entries):
    return checkpointer(root, model, **(entries or {"counter": Counter(step)})).save(step)


def test_crash_mid_save_leaves_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    save(tmp_path, 10, model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(CheckpointError, match="disk full.*newest complete checkpoint is .*step-0000010"):
        save(tmp_path, 20, model)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000010"
    assert not (tmp_path / "step-0000020.tmp").exists()  # the half-written save is removed, not a checkpoint
    (tmp_path / "step-0000020.tmp").mkdir()  # a crashed process's leftovers: the next save of that step replaces them
    save(tmp_path, 20, model)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000020" and not (tmp_path / "step-0000020.tmp").exists()


def test_keep_last_and_a_round_trip_of_weights_and_registered_state(tmp_path):
    model = nn.Linear(3, 2)
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpointer(tmp_path, model, keep_last=2, counter=Counter(step * 10)).save(step)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]
    fresh, counter = nn.Linear(3, 2), Counter()
    path = checkpointer(tmp_path, fresh, counter=counter).restore(ckpt.complete_checkpoints(tmp_path)[::-1])
    assert path.name == "step-0000004" and counter.value == 40
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


def test_state_that_does_not_fit_names_the_entry(tmp_path):
    model = nn.Linear(3, 2)
    saved = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    saved.step()
    path = checkpointer(tmp_path, model, optimizer=saved).save(1)
    other = torch.optim.AdamW([*model.parameters(), nn.Parameter(torch.ones(2))])
    with pytest.raises(CheckpointError, match="its optimizer state does not fit"):
        checkpointer(tmp_path, model, optimizer=other).restore([path])


def test_per_rank_state_of_another_world_size_is_judged_by_its_object_or_passed_over(tmp_path):
    """Required per-rank state (the data position) reaches the object, which refuses what does not fit;
    optional per-rank state (the RNG) of another number of processes is not restored."""
    import json

    model = nn.Linear(3, 2)
    saver = checkpointer(tmp_path, model)
    saver.register("position", Counter(7), json=True, per_rank=True)
    saver.register("noise", Counter(8), per_rank=True, optional=True)
    path = saver.save(1)
    state = json.loads((path / "train_state.json").read_text())
    state["position"] = [{"value": 5}, {"value": 6}]  # as written by two processes
    (path / "train_state.json").write_text(json.dumps(state))
    torch.save([{"value": 1}, {"value": 2}], path / "noise.pt")
    position, noise = Counter(), Counter()
    restorer = checkpointer(tmp_path, model)
    restorer.register("position", position, json=True, per_rank=True)
    restorer.register("noise", noise, per_rank=True, optional=True)
    restorer.restore([path])
    assert position.value == 5 and noise.value == 0


def test_editing_weights_are_the_ema_average_when_the_run_kept_one(tmp_path):
    from safetensors.torch import save_file

    from editflow.checkpoint import inference_weights

    trained = {"connector.mlp.0.weight": torch.ones(2, 2), "connector.pooled_base": torch.zeros(2)}
    save_file(trained, tmp_path / "model.safetensors")
    assert all(torch.equal(inference_weights(tmp_path)[k], v) for k, v in trained.items())  # no EMA: as trained
    torch.save({"connector.mlp.0.weight": torch.full((2, 2), 0.5)}, tmp_path / "ema.pt")
    weights = inference_weights(tmp_path)
    assert torch.equal(weights["connector.mlp.0.weight"], torch.full((2, 2), 0.5))  # the average
    assert torch.equal(weights["connector.pooled_base"], torch.zeros(2))  # a buffer: as saved


def test_a_checkpoint_missing_the_ema_its_run_kept_says_so(tmp_path, caplog):
    import json
    import logging

    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from editflow.checkpoint import inference_weights
    from editflow.config import compose

    trained = {"connector.mlp.0.weight": torch.ones(2, 2)}
    save_file(trained, tmp_path / "model.safetensors")
    for decay, warned in ((None, False), (0.995, True)):
        cfg = compose([f"trainer.ema_decay={'null' if decay is None else decay}"])
        (tmp_path / "train_state.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            weights = inference_weights(tmp_path)
        assert torch.equal(weights["connector.mlp.0.weight"], trained["connector.mlp.0.weight"])
        assert ("no ema.pt although its run averaged its weights (trainer.ema_decay=0.995)" in caplog.text) == warned
