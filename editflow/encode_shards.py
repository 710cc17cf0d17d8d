"""Writing pre-encoded shards (`editflow encode`, whose help in editflow/commands/encode.py says why):
each training set becomes `DIR/<set name>/`, one encoded shard per source shard in the same order; the
processes split the shards, and a stopped encode keeps the shards it finished."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from editflow.data.preencoded import drawn_drops, encoded_sample, encoding_settings
from editflow.data.regions import latent_region
from editflow.data.samples import SampleError
from editflow.data.shards import iter_tar, listed_sha256, write_manifest, write_shard
from editflow.data.sources import train_sets
from editflow.data.stream import bucket_of, collate_images, decode_in_bucket
from editflow.errors import ConfigError
from editflow.frozen_encoders import FrozenEncoder, drop_inputs, states_field
from editflow.models.build import build_frozen

log = logging.getLogger(__name__)
CHUNK = 64  # samples read ahead per shard, grouped by bucket into encoder batches


def drops_to_store(cfg: DictConfig) -> list[str]:
    """The condition-dropout outcomes whose Qwen states are stored: the run's (auto) or an explicit list."""
    spec = cfg.encode.drops  # checked by the schema (config_schema.EncodeConfig)
    return drawn_drops(cfg.objective) if spec == "auto" else list(spec)


class ShardEncoder:
    """Encodes one source shard into one encoded shard."""

    def __init__(self, encoder: FrozenEncoder, cfg: DictConfig, drops: list[str]):
        self.encoder, self.drops = encoder, drops
        self.data = cfg.data
        self.batch_size = cfg.encode.batch_size

    def _encode_batch(self, samples: list, bucket: tuple[int, int]) -> list[dict]:
        batch = collate_images(samples, bucket, self.data.source_pixels, self.data.square_only,
                               regions=True)
        target, source = self.encoder.latents(batch.target), self.encoder.latents(batch.source)
        # the changed region at latent resolution, for objective.region_weighting (whatever the run's setting)
        region = latent_region(batch.region, target.shape[-2:]).to(torch.uint8)
        out = [{"target": target[j], "region": region[j]} if source is None else
               {"target": target[j], "source": source[j], "region": region[j]} for j in range(len(samples))]
        for drop in [None, *self.drops]:
            inputs = [drop_inputs(t, im, drop) for t, im in zip(batch.instructions, batch.source_images)]
            for row, states in zip(out, self.encoder.states([im for _, im in inputs], [t for t, _ in inputs])):
                row[states_field(drop)] = states
        return out

    def _encode_or_reject(self, url: str, samples: list, bucket: tuple[int, int], rejected: Counter) -> list:
        """Rows for `samples`; a sample the encoders refuse (e.g. conditioning over model.qwen.max_length)
        is rejected and counted (None), the others encoded."""
        try:
            return self._encode_batch(samples, bucket)
        except ValueError as err:
            if len(samples) > 1:  # find which sample it was
                return [row for s in samples for row in self._encode_or_reject(url, [s], bucket, rejected)]
            rejected["unencodable"] += 1
            log.warning("skipping sample: shard %s, key %s: %s", url, samples[0].key, err)
            return [None]
        except RuntimeError as err:
            raise RuntimeError(f"shard {url}, keys {[s.key for s in samples]}: encoding failed: {err}") from err

    def _encoded(self, url: str, rejected: Counter):
        def decoded():
            for raw in iter_tar(url):
                try:
                    bucket = bucket_of(raw, self.data.bucket_base, self.data.square_only)
                    yield bucket, decode_in_bucket(raw, bucket, self.data.source_pixels)
                except SampleError as err:
                    rejected[err.reason] += 1
                    log.warning("skipping sample: %s", err)

        stream = decoded()
        while chunk := list(itertools.islice(stream, CHUNK)):
            groups: dict[tuple, list[int]] = {}
            for index, (bucket, _) in enumerate(chunk):
                groups.setdefault(bucket, []).append(index)
            tensors: dict[int, dict | None] = {}
            for bucket, indices in groups.items():
                for start in range(0, len(indices), self.batch_size):
                    part = indices[start: start + self.batch_size]
                    tensors.update(zip(part, self._encode_or_reject(url, [chunk[i][1] for i in part], bucket[:2],
                                                                    rejected)))
            for index, (bucket, sample) in enumerate(chunk):  # the source shard's order
                if (row := tensors.pop(index)) is not None:
                    yield encoded_sample(sample.key, sample.meta, bucket[:2], row)

    def __call__(self, url: str, path: Path) -> dict:
        rejected: Counter = Counter()
        entry = write_shard(path, self._encoded(url, rejected))
        # training checks that data.train still names these shards: by path, or by sha256 where the same
        # shards are mounted elsewhere
        return {**entry, "source": os.path.realpath(url), "source_sha256": listed_sha256([url])[0],
                "rejected": dict(rejected)}


def encoded_shard_name(index: int, url: str) -> str:
    """The encoded shard of a set's `index`-th source shard (the index keeps same-named shards apart)."""
    return f"{index:06d}-{os.path.basename(url)}"


def _check_claim(directory: Path, encoding: dict) -> None:
    """A set directory belongs to one encoding: resuming with other settings would mix two in one set. Only the
    keys of `encoding` are compared, so the settings can be checked before the models load."""
    marker = directory / "encoding.json"
    if not marker.exists():
        return

    def flat(e: dict) -> dict:  # the settings by their config key, then the stored drops and qwen_hidden_size
        return {**e.get("settings", {}), **{"encode.drops" if k == "drops" else k: v for k, v in e.items()
                                            if k != "settings"}}

    stored, wanted = flat(json.loads(marker.read_text())), flat(encoding)
    differ = [f"{k} (encoded with {stored.get(k)!r}, this run has {v!r})" for k, v in wanted.items()
              if stored.get(k) != v]
    if differ:
        raise ConfigError(f"encode.out: {directory} holds shards encoded with other settings: {'; '.join(differ)}. "
                          "Use another encode.out, or delete that directory to start over")


def _claim_directory(directory: Path, encoding: dict) -> None:
    """Records `encoding` as the set directory's, or checks it against the one recorded there."""
    _check_claim(directory, encoding)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "encoding.json"
    if not marker.exists():
        marker.write_text(json.dumps(encoding, indent=1, sort_keys=True))


def encode(cfg: DictConfig) -> Path:
    """Encode every training set of `cfg` into `cfg.encode.out`; returns that directory."""
    from accelerate import PartialState

    if not cfg.encode.out:
        raise ConfigError("encode.out is not set: give the output directory (e.g. encode.out=/data/encoded/run)")
    data = cfg.data.copy()
    data.pre_encoded = None  # encoding reads the source shards, whatever the run will train on
    state = PartialState(cpu=not torch.cuda.is_available())
    out = Path(cfg.encode.out).expanduser()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"encode.out={out}: {existing} is a file; give a directory for the encoded shards")
    drops = drops_to_store(cfg)
    with state.main_process_first():  # the main process makes the toy set; bad data fails before the models load
        sets = train_sets(data, progress=state.is_main_process)
    for shard_set in sets:  # a rerun with other settings, before the models load (qwen_hidden_size is checked after)
        _check_claim(out / shard_set.name, {"settings": encoding_settings(cfg), "drops": drops})
    conditioner, codec = build_frozen(cfg.model)
    conditioner.to(state.device)
    codec.vae.to(state.device)
    # qwen_hidden_size: the connector's input width, so training need not load Qwen to build it
    encoding = {"settings": encoding_settings(cfg), "drops": drops, "qwen_hidden_size": conditioner.hidden_size}
    with state.main_process_first():  # the main process claims the directories, the others check them
        for shard_set in sets:
            _claim_directory(out / shard_set.name, encoding)
    shard_encoder = ShardEncoder(FrozenEncoder(codec, conditioner), cfg, drops)

    jobs = [(s, i, url) for s in sets for i, url in enumerate(s.urls)]
    mine = jobs[state.process_index:: state.num_processes]
    bar = tqdm(mine, desc=f"encode -> {out}", unit="shard", disable=not state.is_main_process, dynamic_ncols=True)
    for shard_set, index, url in bar:
        path = out / shard_set.name / encoded_shard_name(index, url)
        done = Path(f"{path}.done.json")
        if done.exists() and path.exists():  # finished by an earlier, interrupted encode
            continue
        entry = shard_encoder(url, path)
        tmp = done.with_name(done.name + ".tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, done)
        bar.set_postfix(samples=entry["count"])
    state.wait_for_everyone()
    if state.is_main_process:
        for shard_set in sets:
            directory = out / shard_set.name
            entries = [json.loads(Path(f"{directory / encoded_shard_name(i, u)}.done.json").read_text())
                       for i, u in enumerate(shard_set.urls)]
            rejected = sum((Counter(e["rejected"]) for e in entries), Counter())
            write_manifest(directory, {"shards": entries, "num_samples": sum(e["count"] for e in entries),
                                       "encoding": encoding, "rejected": dict(rejected)})
            log.info("%s: %d samples encoded, %d rejected %s", directory, sum(e["count"] for e in entries),
                     sum(rejected.values()), dict(rejected) or "")
    state.wait_for_everyone()
    return out
