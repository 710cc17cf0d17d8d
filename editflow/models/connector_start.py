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

from editflow.errors import CheckpointError, ConfigError
from editflow.models.base_text import empty_prompt_pooled, t5_token_rms
from editflow.models.connector import Connector, reference_projector_state

log = logging.getLogger(__name__)

KEY = "model.connector.init_from"


def _fail(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"{KEY}={path}: {problem}")


def _file_format(path: Path) -> str | None:
    """"safetensors" or "torch" from the file's first bytes (the suffix may say anything: `.bin`, `.pt`)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or its legacy pickle
        return "torch"
    header_bytes = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 0 < header_bytes < path.stat().st_size:  # u64 header length, then json
        return "safetensors"
    return None


def _read_tensors(path: Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch file whose names `keep` accepts (a stage-2 checkpoint's
    transformer is not read); ConfigError naming the file when it is neither, or damaged."""
    kind = _file_format(path)
    if kind is None:
        raise _fail(path, "is neither a safetensors nor a torch file (it starts with "
                          f"{path.read_bytes()[:16]!r}); give a stage-1 run directory, a checkpoint, an export or a "
                          "GPT-Image-Edit projector file")
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the reader says, the file is unusable
        lines = str(err).splitlines() or [""]
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise _fail(path, f"cannot read it as a {kind} file ({type(err).__name__}: {reason[:300]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise _fail(path, f"holds a {type(state).__name__}, not a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and keep(k)}


def connector_state(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors under the connector's own names, what `path` was) from a run, checkpoint, export or file;
    ConfigError naming the key and the path when it holds none."""
    from editflow.checkpoint import MODEL_FILE
    from editflow.model_paths import EXPORT_FILE, resolve_checkpoint

    path = Path(str(path)).expanduser()
    if not path.exists():
        raise _fail(path, "no such file or directory (give a stage-1 run directory, a checkpoint, an export or a "
                          "GPT-Image-Edit projector file)")
    if path.is_dir() and (path / EXPORT_FILE).exists():
        file = path / "connector" / "model.safetensors"
        if not file.is_file():
            raise _fail(path, "an export without connector/model.safetensors: it was copied incompletely")
        return _read_tensors(file), f"export {path}"
    if path.is_dir():
        try:
            checkpoint = resolve_checkpoint(path)
        except CheckpointError as err:  # an empty folder, a run with no complete checkpoint
            raise _fail(path, str(err).removeprefix(f"{path}: ")) from None
        state = _read_tensors(checkpoint / MODEL_FILE, keep=lambda k: k.startswith("connector."))
        return {k.removeprefix("connector."): v for k, v in state.items()}, f"checkpoint {checkpoint}"
    state = _read_tensors(path)
    reference = reference_projector_state(state)
    if reference is not None:
        return reference, f"GPT-Image-Edit projector {path}"
    if any(k.startswith("connector.") for k in state):
        return {k.removeprefix("connector."): v for k, v in state.items() if k.startswith("connector.")}, str(path)
    return state, str(path)


def _problem(state: dict[str, torch.Tensor], cfg: DictConfig) -> str | None:
    """What in `state` (connector_state's) a connector of `cfg` (model.connector) cannot take, judged by tensor
    names (the same for any width) and the configured hidden_dim; None when it fits."""
    with torch.device("meta"):  # only the names: no memory, any sizes
        own = Connector(8, 8, 8, kind=cfg.kind, hidden_dim=cfg.hidden_dim or 8, refiner_layers=cfg.refiner_layers,
                        refiner_heads=1).state_dict()
    if not state:
        return "holds no connector weights"
    unknown = sorted(set(state) - set(own))
    if not any(k.startswith("mlp.") for k in state):
        more = ", ..." if len(unknown) > 4 else ""
        return f"holds no connector weights (its tensors: {', '.join(unknown[:4])}{more})"
    kind = "mlp" if any(k.startswith("norm.") for k in state) else "reference"  # only kind=mlp has the LayerNorm
    if kind != cfg.kind:
        return f"holds a kind={kind} connector and this run's model.connector.kind={cfg.kind}"
    layers = len({k.split(".")[1] for k in state if k.startswith("refiner.")})
    if layers != cfg.refiner_layers:
        return f"holds a connector with {layers} refiner layers and this run's model.connector.refiner_layers=" \
               f"{cfg.refiner_layers}"
    hidden = state["mlp.0.weight"].shape[0] if "mlp.0.weight" in state else None
    if cfg.kind == "mlp" and cfg.hidden_dim and hidden not in (None, cfg.hidden_dim):
        return f"holds a connector of hidden_dim {hidden} and this run's model.connector.hidden_dim={cfg.hidden_dim}"
    if unknown:
        return f"has tensors a connector lacks: {unknown[:4]}"
    return None


def check_init_from(cfg: DictConfig) -> None:
    """Before any model loads: `cfg.init_from` (model.connector) exists, reads, and holds a connector of this
    run's kind, refiner depth and hidden_dim; the widths set by Qwen and the transformer are checked at load."""
    if not cfg.init_from or cfg.init_from == "required":  # `required`: refused by config.validate
        return
    state, what = connector_state(cfg.init_from)
    problem = _problem(state, cfg)
    if problem:
        raise ConfigError(f"{KEY}: {what} {problem}; set model.connector.kind/hidden_dim/refiner_layers to the "
                          "stage-1 run's values")


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
        raise ConfigError(f"{KEY}: {what} {problem}. This run's connector is {connector.sizes}; set "
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
            raise ConfigError(f"model.connector.text_encoders: the CLIP at {cfg.text_encoders} gives a pooled "
                              f"vector of {pooled.shape[0]}, the transformer takes {connector.pooled_base.shape[0]}")
        connector.pooled_base.copy_(pooled)
    if cfg.get("pooled", "learned") == "base":
        dropped = connector.hold_pooled_()
        log.info("connector: the pooled vector is held at the base's CLIP \"\" (model.connector.pooled=base)%s",
                 "; the loaded correction is dropped" if dropped else "")
    if not any(k.startswith("mlp.") for k in loaded):
        target = cfg.token_std
        if target == "from_base":
            if not cfg.text_encoders:
                raise ConfigError("model.connector.token_std=from_base needs model.connector.text_encoders (the "
                                  "base's folder with text_encoder_2/ and tokenizer_2/), or give a number")
            target = t5_token_rms(cfg.text_encoders)
        states, mask = calibration()
        param = connector.mlp[0].weight
        before = connector.calibrate_(states.to(param.device, param.dtype), mask.to(param.device), float(target))
        log.info("connector: token RMS %.4g -> %.4g (model.connector.token_std)", before, float(target))
