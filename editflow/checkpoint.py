"""Checkpoints: `checkpoints/step-NNNNNNN/` committed atomically.

Files are written into `step-NNNNNNN.tmp/`, flushed to disk, a `COMPLETE`
marker is written last, and the directory is renamed into place. A checkpoint
counts only when it has its final name and the marker, so a crash mid-save
leaves the previous checkpoint as the newest valid one. A checkpoint damaged
afterwards (a copy cut short, a disk that lost data) is found by `check_files`
before anything is loaded from it, and readers fall back to the newest one
that loads (`first_loadable`), saying which they skipped and why.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from editflow.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    """Flush every file (and directory entry) under `directory`: the marker must not reach the disk before
    the data it vouches for."""
    for folder, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def commit(tmp: Path, step: int, keep_last: int | None = None) -> Path:
    """Flush, write the marker, rename `tmp` into place, then drop all but the newest `keep_last` checkpoints."""
    final = step_dir(tmp.parent, step)
    _sync_tree(tmp)
    (tmp / MARKER).write_text(str(step))
    _fsync(tmp / MARKER)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(tmp.parent)
    if keep_last:
        for old in complete_checkpoints(tmp.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).exists() and (Path(path) / "train_state.json").exists()


def check_files(checkpoint: str | os.PathLike) -> None:
    """Cheap integrity check of every file of a checkpoint (headers and zip directories, which a truncated
    file loses): CheckpointError naming the file, before anything is loaded from it."""
    checkpoint = Path(checkpoint)
    for required in ("train_state.json", MODEL_FILE):
        if not (checkpoint / required).is_file():
            raise CheckpointError(f"{checkpoint}: {required} is missing")
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".pt", ".bin", ".pth"):
                zipfile.ZipFile(path).close()  # torch.save's format: its directory sits at the end of the file
        except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is unusable
            raise CheckpointError(f"{path} is damaged ({type(err).__name__}: {err})") from None


def first_loadable(checkpoints: list[Path], load: Callable[[Path], T]) -> tuple[Path, T]:
    """`load` the first checkpoint of `checkpoints` (newest first) that loads; each one skipped is logged
    with the reason. CheckpointError listing them all when none loads."""
    reasons = []
    for path in checkpoints:
        try:
            return path, load(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            reasons.append(str(err))
    raise CheckpointError("no checkpoint loads: " + "; ".join(reasons) if reasons else "no checkpoint given")


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the newest checkpoint of a run directory whose files are intact
    (older ones are tried when the newest is damaged)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_checkpoint(path):
        check_files(path)
        return path
    found = complete_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"{path}: not a checkpoint (model.safetensors + train_state.json) and not a run "
                              f"directory with a complete checkpoints/step-NNNNNNN/{unfinished(path / 'checkpoints')}")
    return first_loadable(found[::-1], check_files)[0]


def unfinished(root: Path) -> str:
    """The interrupted saves (no marker, or still `.tmp`) under `root`, as a note for messages."""
    complete = set(complete_checkpoints(root))
    partial = sorted(p.name for p in root.iterdir() if STEP_DIR.match(p.name.removesuffix(".tmp"))
                     and p not in complete) if root.is_dir() else []
    return f" (only unfinished saves, ignored: {', '.join(partial)})" if partial else ""


# Keys of the model config that decide which tensors a checkpoint holds and their shapes.
WEIGHT_KEYS = ("transformer.config", "connector", "trainable", "lora.rank", "lora.target_modules")


def config_mismatch(saved_model_cfg, model_cfg) -> list[str]:
    """`key: saved -> now` for each WEIGHT_KEYS value of a checkpoint's model config that differs from this run's."""
    from omegaconf import OmegaConf

    now = OmegaConf.to_container(model_cfg, resolve=True)
    saved = OmegaConf.to_container(saved_model_cfg, resolve=True)

    def get(tree, key):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    return [f"model.{key}: {get(saved, key)!r} in the checkpoint, {get(now, key)!r} now" for key in WEIGHT_KEYS
            if get(saved, key) != get(now, key)]


def inference_weights(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights to edit with: the trained ones, with the EMA's average in their place when the run kept
    one (`trainer.ema_decay`; `ema.pt`), the weights the run's own evaluation scored."""
    state = load_file(Path(checkpoint) / MODEL_FILE)
    ema = Path(checkpoint) / "ema.pt"
    if ema.exists():
        averaged = torch.load(ema, map_location="cpu", weights_only=True)
        state.update({name: weights for name, weights in averaged.items() if name in state})
    elif decay := _ema_decay(checkpoint):  # e.g. a checkpoint copied without it
        log.warning("%s has no ema.pt although its run averaged its weights (trainer.ema_decay=%s): editing with "
                    "the raw weights, which are not the ones the run's evaluation scored; copy ema.pt beside "
                    "%s", checkpoint, decay, MODEL_FILE)
    return state


def _ema_decay(checkpoint) -> float | None:
    """The trainer.ema_decay a checkpoint's run trained with (None when it kept no average or is unreadable)."""
    try:
        return load_config(checkpoint).trainer.get("ema_decay")
    except (OSError, ValueError, KeyError):  # a ConfigError is a ValueError
        return None


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike,
                       state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a checkpoint's trainable weights and buffers (read from `checkpoint`, or `state` already read) into
    `model`; every saved tensor must find a parameter or buffer of its shape."""
    state = load_file(Path(checkpoint) / MODEL_FILE) if state is None else state
    params = model.state_dict(keep_vars=True)  # parameters and persistent buffers (the connector's pooled base)
    unknown = [k for k in state if k not in params]
    if unknown:
        raise CheckpointError(f"{checkpoint}: {len(unknown)} saved tensors have no parameter in the model, e.g. "
                              f"{unknown[:3]}: it was trained with another model config")
    shapes = [f"{k} {tuple(v.shape)} saved, {tuple(params[k].shape)} now" for k, v in state.items()
              if v.shape != params[k].shape]
    if shapes:
        raise CheckpointError(f"{checkpoint}: {len(shapes)} tensors differ in shape ({'; '.join(shapes[:3])}): it "
                              "was trained with another model config")
    model.load_state_dict(state, strict=False)


class ProcessRNG:
    """Every random generator a training step draws from (this process's), for an exact resume."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def load_extra(checkpoint: str | os.PathLike, name: str):
    return torch.load(Path(checkpoint) / f"{name}.pt", map_location="cpu", weights_only=False)


def load_train_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / "train_state.json").read_text())


def load_config(checkpoint: str | os.PathLike):
    """The config a checkpoint's run trained with, on today's schema (keys added since get their defaults)."""
    from editflow.config import saved_config

    return saved_config(load_train_state(checkpoint)["config"], str(Path(checkpoint) / "train_state.json"))


def check_writable(root: Path, run_dir: Path, rank: int) -> None:
    """Checkpoints go under the run directory: a directory that cannot take them fails now, not at the
    first save hours later."""
    probe = root / f".write-test-{socket.gethostname()}-{rank}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"the run directory {run_dir} cannot hold checkpoints ({err}); give a writable "
                              "hydra.run.dir") from None


def resume_candidates(resume: str | None, root: Path, model_cfg) -> list[Path]:
    """The checkpoints trainer.resume may continue from, newest first: `auto` (this run's under `root`), a run
    directory or one checkpoint; checked against this run's model config before any model loads. Without
    resume, a run directory that already holds checkpoints is refused: the new run would overwrite them."""
    if not resume:
        earlier = complete_checkpoints(root)
        if earlier:  # a new run would overwrite them (and the metrics, the config and the eval beside them)
            raise CheckpointError(f"{root.parent} already holds a run (checkpoints up to {earlier[-1].name}); "
                                  "continue it with trainer.resume=auto, or give a new hydra.run.dir")
        return []
    path = root if resume == "auto" else Path(resume).expanduser()
    if resume != "auto" and is_checkpoint(path):
        candidates = [path]
    else:
        root = path if resume == "auto" else path / "checkpoints"
        if resume != "auto" and not root.is_dir():
            raise CheckpointError(f"trainer.resume={resume}: not a checkpoint (model.safetensors + "
                                  "train_state.json) nor a run directory with checkpoints/")
        candidates = complete_checkpoints(root)[::-1]
        if not candidates:
            if resume != "auto":
                raise CheckpointError(f"trainer.resume={resume}: no complete checkpoint in {root}{unfinished(root)}")
            log.info("trainer.resume=auto: no complete checkpoint in %s%s; starting at step 0", root, unfinished(root))
    for candidate in candidates:  # the newest readable record of the config decides
        try:
            saved = load_config(candidate)
        except ConfigError as err:  # readable, but its config does not fit this version's schema
            raise CheckpointError(f"trainer.resume={resume}: {err}") from None
        except (OSError, ValueError, KeyError):
            continue  # damaged: skipped, with the reason, when loading
        mismatch = config_mismatch(saved.model, model_cfg)
        if mismatch:
            raise CheckpointError(f"trainer.resume={resume}: {candidate} was trained with another model config "
                                  f"({'; '.join(mismatch)}); resume with that run's settings or start a new run "
                                  "directory")
        break
    return candidates
