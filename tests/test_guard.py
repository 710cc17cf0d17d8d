"""Skipping non-finite optimizer steps (editflow/guard.py)."""

import pytest
import torch

from editflow.ema import EMA
from editflow.guard import NonFiniteGuard


def make(sync_free: bool, max_in_row: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    return model, optimizer, NonFiniteGuard(optimizer, max_in_row, "cpu", sync_free=sync_free, window=4)


def step(model, optimizer, guard, n: int, finite: bool) -> None:
    model.zero_grad()
    model(torch.randn(2, 4)).pow(2).sum().backward()
    if guard.verdict(torch.tensor(float(finite)), n, [f"key{n}"]):
        optimizer.step()


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync_free", "host"])
def test_a_non_finite_step_changes_neither_weights_nor_optimizer_state(sync_free):
    model, optimizer, guard = make(sync_free)
    step(model, optimizer, guard, 1, True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state.items()}
    step(model, optimizer, guard, 2, False)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[p][n], t) for p, s in optimizer.state.items() for n, t in s.items())
    assert guard.skipped_steps == 1
    step(model, optimizer, guard, 3, True)  # and the next finite step updates again
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_the_sync_free_verdict_never_reads_the_device(monkeypatch):
    model, optimizer, guard = make(sync_free=True)

    def host_read(*args):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", host_read)
    monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
    guard.verdict(torch.tensor(0.0), 1, ["k"])
    guard.verdict(torch.tensor(1.0), 2, ["k"])
    _, _, host = make(sync_free=False)
    with pytest.raises(AssertionError, match="host sync"):  # the other mode does read it
        host.verdict(torch.tensor(1.0), 1, ["k"])


@pytest.mark.parametrize("sync_free", [True, False], ids=["sync_free", "host"])
def test_too_many_in_a_row_stop_with_step_and_keys(sync_free):
    model, optimizer, guard = make(sync_free, max_in_row=3)
    for n, finite in enumerate([True, False, False, True, True], start=1):  # a run of 2: fine
        step(model, optimizer, guard, n, finite)
    guard.check()
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .* at step 8 \(samples \['key8'\]\)"):
        for n in (6, 7, 8):
            step(model, optimizer, guard, n, False)
        guard.check()
    assert guard.skipped_steps == 5


def test_ema_skips_with_the_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.5, warmup=False)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, weight=torch.tensor(0.0))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow))
    ema.update(model, weight=torch.tensor(1.0))
    reference = EMA(model, 0.5, warmup=False)
    reference.shadow = before
    reference.update(model)
    assert all(torch.allclose(a, b) for a, b in zip(reference.shadow, ema.shadow))


def test_ema_weights_are_applied_inside_the_block_and_the_trained_ones_come_back():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.5, warmup=False)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # shadow = halfway between the start and the moved weights
    moved = [p.detach().clone() for p in model.parameters()]
    with ema.applied(model):
        for p, start in zip(model.parameters(), trained):
            torch.testing.assert_close(p, start + 0.5)
    for p, weights in zip(model.parameters(), moved):
        assert torch.equal(p, weights)


def test_ema_warm_up_follows_the_weights_early_and_resumes_where_it_was():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update is mostly the weights
    for _ in range(9000):
        ema.update(model)
    assert ema.current_decay() == 0.999  # (1 + n) / (10 + n) has passed the configured decay
    state = ema.state_dict()
    assert int(state["num_updates"]) == 9000
    restored = EMA(model, 0.999)
    restored.load_state_dict(state)
    assert restored.num_updates == 9000
    legacy = {k: v for k, v in state.items() if k != "num_updates"}  # saved before the warm-up existed
    restored.load_state_dict(legacy)
    assert restored.current_decay() == 0.999
