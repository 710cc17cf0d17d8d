"""Checkpoints: `checkpoints/step-NNNNNNN/` committed atomically.

Files are written into `step-NNNNNNN.tmp/`, a `COMPLETE` marker is written
last, and the directory is renamed into place. A checkpoint counts only when
it has its final name and the marker, so a crash mid-save leaves the previous
checkpoint as the newest valid one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{7})$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def saved_names(model: nn.Module) -> set[str]:
    """What a checkpoint holds: the trainable parameters (all of them for a full fine-tune, adapters + connector
    for LoRA) and the persistent buffers, state the weights depend on (the connector's pooled base)."""
    return ({name for name, p in model.named_parameters() if p.requires_grad}
            | set(model.state_dict(keep_vars=True).keys() - dict(model.named_parameters()).keys()))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `saved_names`, contiguous on the CPU."""
    names = saved_names(model)
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict(keep_vars=True).items()
            if name in names}


def staging_dir(root: str | os.PathLike, step: int) -> Path:
    return step_dir(root, step).with_name(step_dir(root, step).name + ".tmp")


def stage(root: str | os.PathLike, step: int) -> Path:
    """A fresh `step-NNNNNNN.tmp/` to write into (leftovers of a crashed save of that step are removed)."""
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write(tmp: Path, step: int, weights: dict[str, torch.Tensor], extra: dict[str, object], train_state: dict) -> None:
    """Model weights (safetensors), each `extra` object (torch.save) and `train_state.json` into `tmp`."""
    save_file(weights, tmp / MODEL_FILE, metadata={"format": "pt", "step": str(step)})
    for name, obj in extra.items():
        torch.save(obj, tmp / f"{name}.pt")
    (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1, sort_keys=True))


def commit(tmp: Path, step: int, keep_last: int | None = None) -> Path:
    """Write the marker, rename `tmp` into place, then drop all but the newest `keep_last` checkpoints."""
    final = step_dir(tmp.parent, step)
    (tmp / MARKER).write_text(str(step))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in complete_checkpoints(tmp.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, extra: dict[str, object],
                    train_state: dict, keep_last: int | None = None) -> Path:
    """One process writes everything, atomically (the trainer composes stage/write/commit itself so that
    DeepSpeed's sharded state can be written by every rank in between)."""
    tmp = stage(root, step)
    write(tmp, step, trainable_state(model), extra, train_state)
    return commit(tmp, step, keep_last)


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Committed checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint's trainable weights (and buffers) into `model`; every saved tensor must find its place."""
    state = load_file(Path(checkpoint) / MODEL_FILE)
    missing = [k for k in state if k not in model.state_dict(keep_vars=True)]
    if missing:
        raise KeyError(f"{checkpoint}: {len(missing)} saved tensors have no parameter in the model, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)


def rng_state() -> dict:
    """Every random generator a training step draws from, for an exact resume."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_extra(checkpoint: str | os.PathLike, name: str):
    return torch.load(Path(checkpoint) / f"{name}.pt", map_location="cpu", weights_only=False)


def load_train_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / "train_state.json").read_text())
