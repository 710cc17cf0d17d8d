"""Config helpers: where the Hydra configs live and the resolvers they use."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from editflow.models.build import asset_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_resolvers() -> None:
    """`${asset:tiny/vae}` -> path of a file shipped in editflow/assets."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)


def compose(overrides: list[str]):
    """The config `editflow train` would run with these Hydra overrides, for commands that do not start a
    Hydra run of their own (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


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
