"""Local model directories (`model.transformer/vae/qwen.pretrained`) checked before any model loads.

from_pretrained on a directory without config.json, or with another class's, does not fail cleanly: Qwen
without config.json is built at Qwen2.5-VL-7B's default size (tens of GB, the machine runs out of memory),
and FLUX given a VAE's config fails on meta tensors. So a directory is checked for its config, its class and
a weights file first; each problem is a ConfigError naming the key and the path. Hub ids are left to the
loader (build.py names the component when one cannot be fetched).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from editflow.errors import ConfigError
from editflow.models.build import relocate_asset

# key -> (what it is, how its config.json says so, the value)
EXPECTED = {
    "transformer": ("a FLUX transformer (diffusers FluxTransformer2DModel)", "_class_name", "FluxTransformer2DModel"),
    "vae": ("a VAE (diffusers AutoencoderKL)", "_class_name", "AutoencoderKL"),
    "qwen": ("Qwen2.5-VL (transformers)", "model_type", "qwen2_5_vl"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # single files, shards and their index


def is_local(path: str) -> bool:
    """A path that names a directory on this machine, not a hub id (`org/name`): it exists, or is written as
    a path (absolute, ./, ../, ~, or deeper than org/name)."""
    return os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def check_local_model(key: str, path: str, subfolder: str | None, expected: tuple[str, str, str]) -> None:
    what, field, value = expected
    root = Path(relocate_asset(path)).expanduser()
    folder = root / subfolder if subfolder else root
    name = f"model.{key}.pretrained={path}" + (f" (subfolder {subfolder})" if subfolder else "")
    if not root.is_dir():
        raise ConfigError(f"{name}: {'not a directory' if root.exists() else 'no such directory'}; give a local "
                          f"directory holding {what}, or a hub id")
    if not folder.is_dir():
        raise ConfigError(f"{name}: {root} has no {subfolder}/ folder (model.{key}.subfolder)")
    config = folder / "config.json"
    if not config.is_file():
        listing = sorted(p.name for p in folder.iterdir())[:6]
        raise ConfigError(f"{name}: {folder} has no config.json (it holds {listing or 'nothing'}); give the "
                          f"directory of {what}, as save_pretrained writes it")
    try:
        found = json.loads(config.read_text()).get(field)
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{name}: {config} is not a JSON object ({err})") from None
    if found != value:
        raise ConfigError(f"{name}: {config} describes {field}={found!r}, not {what} ({field}={value!r}): is this "
                          f"the folder of another component?")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise ConfigError(f"{name}: {folder} has config.json but no weights (*.safetensors or *.bin); was the "
                          "download or copy cut short?")


def check_local_models(model: DictConfig, keys: tuple[str, ...] = tuple(EXPECTED)) -> None:
    """Those of `model` (a `model/` node)'s pretrained components (`keys`) that are local directories."""
    for key in keys:
        node, expected = model[key], EXPECTED[key]
        if node.pretrained and is_local(str(node.pretrained)):
            check_local_model(key, str(node.pretrained), node.get("subfolder"), expected)
