"""Where a run's connector starts (`model.connector.init_from`, `text_encoders`, `token_std`).

Stage 2 of the two-stage recipe starts from the stage-1 connector (`experiment=align_connector`): a run
directory (its newest checkpoint), a checkpoint, an export, or the public GPT-Image-Edit/UniWorld
projector file (`denoise_tower.denoise_projector.*` keys, `.bin`/`.pt`/`.safetensors`). A fresh connector
starts where FLUX.1-Kontext's own text inputs were: the pooled vector at the base's CLIP embedding of the
empty prompt, the tokens calibrated on real Qwen states to T5's RMS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from editflow.models.base_text import empty_prompt_pooled, t5_token_rms
from editflow.models.connector import Connector, reference_projector_state

log = logging.getLogger(__name__)

KEY = "model.connector.init_from"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def connector_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors under the connector's own names, what `path` was) from a run, checkpoint, export or file."""
    from editflow.checkpoint import MODEL_FILE
    from editflow.model_paths import resolve_checkpoint

    path = Path(str(path)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{KEY}={path}: no such file or directory (give a stage-1 run directory, a "
                                "checkpoint, an export or a GPT-Image-Edit projector file)")
    if path.is_dir() and (path / "editflow.json").exists():
        file, what = path / "connector" / "model.safetensors", f"export {path}"
        return _read_tensors(file), what
    if path.is_dir():
        checkpoint = resolve_checkpoint(path)
        state = _read_tensors(checkpoint / MODEL_FILE)
        return {k.removeprefix("connector."): v for k, v in state.items() if k.startswith("connector.")}, \
            f"checkpoint {checkpoint}"
    state = _read_tensors(path)
    reference = reference_projector_state(state)
    if reference is not None:
        return reference, f"GPT-Image-Edit projector {path}"
    if any(k.startswith("connector.") for k in state):
        return {k.removeprefix("connector."): v for k, v in state.items() if k.startswith("connector.")}, str(path)
    return state, str(path)


def load_connector_(connector: Connector, path: str | Path) -> set[str]:
    """Load what `path` holds into `connector`; returns the names loaded. Shapes must match exactly."""
    state, what = connector_state(path)
    own = connector.state_dict()
    unknown = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(v.shape)} (this connector: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if not state or unknown or wrong:
        problem = ("holds no connector weights" if not state else
                   f"has tensors this connector lacks: {unknown[:4]}" if unknown else f"shapes differ: {wrong[:3]}")
        raise ValueError(f"{KEY}: {what} {problem}. This run's connector is {connector.sizes}; set "
                         "model.connector.kind/hidden_dim/refiner_layers to the stage-1 run's values")
    connector.load_state_dict(state, strict=False)
    log.info("connector: loaded %d tensors from %s", len(state), what)
    return set(state)


def start_connector(connector: Connector, cfg: DictConfig,
                    calibration: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Initialise a run's connector from `cfg` (a `model.connector` node); `calibration()` gives real Qwen
    states (B, L, D) and their mask, read only when the token scale must be calibrated."""
    loaded = load_connector_(connector, cfg.init_from) if cfg.init_from else set()
    if "pooled_base" not in loaded and not cfg.text_encoders:
        log.info("connector: no model.connector.text_encoders (a randomly initialised transformer): the pooled "
                 "vector starts at zero")
    elif "pooled_base" not in loaded:
        pooled = empty_prompt_pooled(cfg.text_encoders)
        if pooled.shape != connector.pooled_base.shape:
            raise ValueError(f"model.connector.text_encoders: the CLIP at {cfg.text_encoders} gives a pooled "
                             f"vector of {pooled.shape[0]}, the transformer takes {connector.pooled_base.shape[0]}")
        connector.pooled_base.copy_(pooled)
    if not any(k.startswith("mlp.") for k in loaded):
        target = cfg.token_std
        if target == "from_base":
            if not cfg.text_encoders:
                raise ValueError("model.connector.token_std=from_base needs model.connector.text_encoders (the "
                                 "base's folder with text_encoder_2/ and tokenizer_2/), or give a number")
            target = t5_token_rms(cfg.text_encoders)
        states, mask = calibration()
        param = connector.mlp[0].weight
        before = connector.calibrate_(states.to(param.device, param.dtype), mask.to(param.device), float(target))
        log.info("connector: token RMS %.4g -> %.4g (model.connector.token_std)", before, float(target))
