"""The run config: where the Hydra configs live, composing one outside a run, checking one before any model
loads, and reading back one a run saved. Its keys, types, defaults and checks: config_schema.py."""

from __future__ import annotations

import argparse
import copy
import logging
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from editflow.config_schema import EditflowConfig
from editflow.errors import ConfigError
from editflow.models.build import asset_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
KEYS_HINT = "`editflow train --cfg job` prints every key with its value"

log = logging.getLogger(__name__)


def register() -> None:
    """What composing needs besides conf/: the schema in Hydra's ConfigStore (conf/config.yaml's `schema`) and
    the `${asset:tiny/vae}` resolver (the path of a file shipped in editflow/assets)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=EditflowConfig)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


def compose(overrides: list[str]) -> DictConfig:
    """The config `editflow train` would run with these Hydra overrides, for commands that do not start a
    Hydra run of their own (no run directory). A bad override is a ConfigError naming its key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise config_error(err) from None


def config_error(err: Exception) -> ConfigError:
    """A Hydra or OmegaConf error about the config (a wrong type, an unknown key, a missing group option, bad
    override syntax) as one paragraph that starts with the key, like the schema's own checks."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and key:
        reason = str(cause).splitlines()[0]
        if "does not support deletion" in reason:
            return ConfigError(cannot_delete(key))
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
            return ConfigError(f"{key}: unknown key ({reason}); {KEYS_HINT}")
        return ConfigError(f"{key}: {reason}")
    if isinstance(err, OverrideParseException):
        return ConfigError(f"{err.override}: {str(err).splitlines()[0]} (Hydra override syntax: "
                           "https://hydra.cc/docs/advanced/override_grammar/basic)")
    if isinstance(err, MissingConfigException) and err.options is not None:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        return ConfigError(f"{group}={name}: there is no {CONFIG_DIR / group / name}.yaml; the options: "
                           f"{', '.join(err.options)}")
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    quoted = re.search(r"'([\w.]+)'", message)
    if message.startswith("Could not delete from config") and quoted:  # `~key`: the schema has every key
        return ConfigError(cannot_delete(quoted[1]))
    if message.startswith("Could not append to config") and quoted:  # `+key` for a key the schema has
        return ConfigError(f"{quoted[1]}: is already a key; set it without the + ({quoted[1]}=VALUE)")
    return ConfigError(message)


def cannot_delete(key: str) -> str:
    return (f"{key}: keys cannot be deleted (the schema, editflow/config_schema.py, types every key); set "
            f"{key}=null or another value instead")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `node` (a typed config) and its typed children that their dataclass lacks: Hydra adds them with
    `+key=value` whatever the schema says."""
    kind = OmegaConf.get_type(node)
    if not is_dataclass(kind):
        return []
    known = {f.name for f in fields(kind)}
    found = []
    for key, value in node.items_ex(resolve=False):
        if key not in known:
            found.append(f"{prefix}{key}")
        elif isinstance(value, DictConfig):
            found += unknown_keys(value, f"{prefix}{key}.")
    return found


def refuse_unknown_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (not in the schema, editflow/config_schema.py); {KEYS_HINT}")


def validate_groups(cfg: DictConfig, groups: tuple[str, ...]) -> None:
    """`validate` for commands that read only some groups (`editflow bench`): unknown keys anywhere, then
    those groups' own checks, not the ones that span groups."""
    refuse_unknown_keys(cfg)
    try:
        for group in groups:
            OmegaConf.to_object(cfg[group])
    except OmegaConfBaseException as err:
        raise config_error(err) from None


def validate(cfg: DictConfig, training: bool = True, files: bool = True) -> None:
    """Check a composed config before any model loads: unknown keys, then every dataclass's checks (run as
    `OmegaConf.to_object` builds them), each failure a ConfigError naming the key. `training=False`
    (`editflow encode`) skips what only a training run needs (a stage-2 preset's `model.connector.init_from`).
    `files`: also read the local model directories and the connector's init_from (not `editflow slurm`, whose
    job resolves relative paths on another machine and in its --workdir)."""
    refuse_unknown_keys(cfg)
    try:
        OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # a required value not set, an interpolation that does not resolve
        raise config_error(err) from None
    if training and cfg.model.connector.init_from == "required":
        raise ConfigError(
            "model.connector.init_from: this preset is stage 2 of the two-stage recipe and starts from the connector "
            "that stage 1 trained: run `editflow train experiment=align_connector ...` first and pass its run "
            "directory (or a checkpoint, an export, or the public GPT-Image-Edit projector file with "
            "model.connector.kind=reference) as model.connector.init_from=PATH; model.connector.init_from=null "
            "starts from a fresh connector instead (README: the two-stage recipe)")
    if files:
        from editflow.models.connector_start import check_init_from
        from editflow.models.local_models import check_local_models

        check_local_models(cfg.model)
        if training:
            check_init_from(cfg.model.connector)


def check_world_size(cfg: DictConfig, world_size: int) -> int:
    """Gradient accumulation for this world size; the global batch must split evenly."""
    t = cfg.trainer
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"trainer.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size={t.micro_batch_size} x world size {world_size} = {per_step}")
    return t.global_batch_size // per_step


def saved_config(saved: dict, source: str) -> DictConfig:
    """A config a run saved (a checkpoint's train_state.json, an export's editflow.json) on today's schema:
    keys added since it was saved get their defaults (what the run did without them); keys since removed
    are dropped with a warning. `source` names the file in messages."""
    saved, dropped = copy.deepcopy(saved), []
    while True:
        try:
            config = OmegaConf.merge(OmegaConf.structured(EditflowConfig), saved)
            break
        except ConfigKeyError as err:  # a key this version does not have
            *parents, leaf = err.full_key.split(".")
            node = saved
            for part in parents:
                node = node[part]
            del node[leaf]
            dropped.append(err.full_key)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: its config does not fit this version of editflow: {config_error(err)}") \
                from None
    if dropped:
        log.warning("%s: ignoring keys this version of editflow does not have: %s", source, ", ".join(dropped))
    return config


def is_override(arg: str) -> bool:
    """Hydra override syntax: key=value, +key=value, ++key=value, ~key (no leading dash)."""
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The parser's flags and Hydra overrides in any order on one command line (`--` still ends the flags:
    everything after it is an override)."""
    tail: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, tail = argv[:split], argv[split + 1:]
    args, rest = parser.parse_known_args(argv)
    bad = [arg for arg in rest + tail if not is_override(arg)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (Hydra overrides look like key=value)")
    return args, rest + tail
