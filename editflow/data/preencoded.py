"""Pre-encoded shards: what the frozen VAE and Qwen make of each sample, stored once.

A sample of an encoded shard holds `{key}.json` (the source sample's metadata
plus the bucket it was encoded at) and `{key}.enc.safetensors` with
`target` and `source` latents (`source` absent for text-to-image), the
changed region at latent resolution (`region`, uint8, see data/regions.py) and the
unpadded Qwen states: `states`, plus `states_drop_text|image|both` for the
condition-dropout outcomes the encoding was asked for. Tensors keep the
frozen models' own dtype, so training on them equals encoding on the fly.

The directory's manifest records the settings that shaped the tensors
(`encoding`); a run whose settings differ is refused, naming the keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from editflow.data.batches import EncodedBatch
from editflow.data.samples import SampleError
from editflow.errors import ConfigError

TENSORS_EXT = "enc.safetensors"


@dataclasses.dataclass
class EncodedSample:
    key: str
    url: str
    tensors: dict[str, torch.Tensor]


def _model_id(path: str | None) -> str | None:
    """A model's identity for comparison: hub ids as given, shipped assets by name, local dirs resolved."""
    if not path:
        return path
    marker = "/editflow/assets/"
    if marker in str(path):
        return "asset:" + str(path).split(marker, 1)[1]
    return str(Path(path).expanduser().resolve()) if os.path.isdir(path) else str(path)


def encoding_settings(cfg: DictConfig) -> dict:
    """The config values that decide the stored tensors, under their config key names."""
    m, d = cfg.model, cfg.data
    return {
        "model.vae.pretrained": _model_id(m.vae.pretrained),
        "model.vae.subfolder": m.vae.subfolder,
        "model.qwen.pretrained": _model_id(m.qwen.pretrained),
        "model.qwen.hidden_layer": m.qwen.hidden_layer,
        "model.qwen.min_pixels": m.qwen.min_pixels,
        "model.qwen.max_pixels": m.qwen.max_pixels,
        "model.frozen_dtype": m.frozen_dtype,
        "data.bucket_base": d.bucket_base,
        "data.source_pixels": d.source_pixels,
        "data.square_only": d.square_only,
    }


def drawn_drops(objective) -> list[str]:
    """The condition-dropout outcomes a run's `objective` draws (those with a probability above 0)."""
    return [d for d in ("text", "image", "both") if objective[f"drop_{d}"] > 0]


def check_pre_encoded(sets: list, cfg: DictConfig) -> bool:
    """Whether the training sets are pre-encoded; refuses sets encoded with settings other than this run's,
    or without the Qwen states of a condition-dropout outcome the run draws."""
    if not any(s.encoding for s in sets):
        return False
    current = encoding_settings(cfg)
    needed = drawn_drops(cfg.objective)
    for s in sets:
        where = f"data.pre_encoded set {s.name!r} ({os.path.dirname(s.urls[0])})"
        if s.encoding is None:
            raise ConfigError(f"{where} is not pre-encoded while others are")
        stored = s.encoding["settings"]
        differ = [f"{k} (encoded with {stored.get(k)!r}, this run has {v!r})" for k, v in current.items()
                  if stored.get(k) != v]
        if differ:
            raise ConfigError(f"{where} was encoded with other settings: {'; '.join(differ)}. Re-run "
                             "`editflow encode` with this run's overrides, or train with those settings")
        missing = [d for d in needed if d not in s.encoding["drops"]]
        if missing:
            raise ConfigError(f"{where} holds no Qwen states for dropping {missing} (objective.drop_*); re-run "
                             f"`editflow encode` with this run's objective, or encode.drops=[text,image,both]")
    return True


def encoded_sample(key: str, meta: dict, bucket: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict:
    """A webdataset sample dict for an encoded shard."""
    # text_tokens: the stream groups batches by the length of the conditioning (frozen_encoders.TextBucketKey)
    meta = {**meta, "encoded_bucket": list(bucket), "text_tokens": int(tensors["states"].shape[0])}
    blob = save_tensors({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})
    return {"__key__": key, "json": json.dumps(meta).encode(), TENSORS_EXT: blob}


def decode_encoded(raw: dict) -> EncodedSample:
    """A raw sample of an encoded shard -> EncodedSample, or SampleError naming shard, key and field."""
    where = f"shard {raw.get('__url__', '?')}, key {raw.get('__key__', '?')}"
    if "json" not in raw:
        raise SampleError("missing_field", f"{where}: no json field")
    if TENSORS_EXT not in raw:
        raise SampleError("missing_field", f"{where}: no {TENSORS_EXT} field (not a pre-encoded shard?)")
    try:
        json.loads(raw["json"])  # unreadable metadata makes a bad sample, as unreadable tensors do
        tensors = load_tensors(raw[TENSORS_EXT])
    except (ValueError, UnicodeDecodeError, SafetensorError) as err:
        raise SampleError("bad_encoding", f"{where}: unreadable json or {TENSORS_EXT} ({err})") from err
    for field in ("target", "states"):
        if field not in tensors:
            raise SampleError("missing_field", f"{where}, field {TENSORS_EXT}: no {field} tensor")
    return EncodedSample(raw["__key__"], raw.get("__url__", "?"), tensors)


def collate_encoded(samples: list[EncodedSample]) -> EncodedBatch:
    """The batch of encoded samples of one bucket."""
    return EncodedBatch(keys=[s.key for s in samples], samples=samples)
