"""What a `--model` path is: a run directory, a checkpoint, or an `editflow export`, told apart and checked
without loading a model (so that commands fail fast on a wrong path)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from editflow import checkpoint as ckpt
from editflow.errors import CheckpointError

EXPORT_FILE = "editflow.json"  # what makes a directory an `editflow export`
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, what load_lora_weights(DIR) looks for


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory (its newest intact checkpoint; a damaged newer one is
    skipped with a warning) or a checkpoint path; CheckpointError saying what `path` is instead."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; give a run directory, a checkpoint directory "
                              "(checkpoints/step-NNNNNNN) or an `editflow export` directory")
    if path.is_dir() and not ckpt.is_checkpoint(path) and not (path / "checkpoints").is_dir():
        if (path / "model_index.json").exists():
            raise CheckpointError(f"{path} is a diffusers pipeline, not an editflow model: editflow conditions "
                                  "FLUX on Qwen2.5-VL through a trained connector, which `editflow export` writes "
                                  f"beside the weights (with {EXPORT_FILE}); export a run or checkpoint first")
        raise CheckpointError(f"{path}: not an export ({EXPORT_FILE}), a checkpoint (model.safetensors + "
                              "train_state.json) or a run directory (checkpoints/step-NNNNNNN/)")
    return ckpt.resolve(path)


def read_export(path: Path) -> dict:
    """The `editflow.json` of an export, checked to be one this version reads."""
    try:
        export = json.loads((path / EXPORT_FILE).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / EXPORT_FILE} is damaged ({err}); export the run again") from None
    if export.get("format") != "editflow-export" or export.get("kind") not in ("full", "lora") \
            or "config" not in export:
        raise CheckpointError(f"{path / EXPORT_FILE}: not an editflow export description (format "
                              f"{export.get('format')!r}, kind {export.get('kind')!r}); export the run again")
    needed = ["connector/model.safetensors", LORA_FILE if export["kind"] == "lora" else "transformer"]
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"{path}: a {export['kind']} export without {', '.join(missing)}; it was copied "
                              "incompletely: copy or export it again")
    return export


def read_model_config(model: str | os.PathLike):
    """(training config, path to load) of a `--model`, without loading it: an export's editflow.json, or the
    checkpoint's train_state.json (a run directory resolves to its newest intact checkpoint)."""
    from editflow.config import saved_config

    path = Path(model)
    if (path / EXPORT_FILE).exists():
        return saved_config(read_export(path)["config"], str(path / EXPORT_FILE)), path
    checkpoint = resolve_checkpoint(path)
    return ckpt.load_config(checkpoint), checkpoint
