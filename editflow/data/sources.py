"""Where a run's shards come from: the cached toy set, or shard directories/URLs given in the config."""

from __future__ import annotations

import os
from pathlib import Path

from braceexpand import braceexpand
from filelock import FileLock
from omegaconf import DictConfig

from editflow.data.shards import MANIFEST, listed_sha256, read_manifest
from editflow.data.stream import ShardSet
from editflow.data.toy import EDIT_KINDS, weighted_kinds
from editflow.data.toy_shards import write_toy_shards
from editflow.errors import ConfigError, DataError


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDITFLOW_CACHE", Path.home() / ".cache" / "editflow"))


def toy_kinds(cfg: DictConfig, split: str) -> tuple[str, ...]:
    """The cycle of edit kinds of a toy split: data.toy.kind_weights for training; the held-out split stays
    balanced, so its per-kind scores are comparable across runs."""
    weights = cfg.get("kind_weights") if split == "train" else None
    return weighted_kinds(dict(weights) if weights else None)


def toy_dir(cfg: DictConfig, split: str) -> Path:
    cache = Path(cfg.cache_dir or default_cache_dir()).expanduser()
    num = cfg.num_train if split == "train" else cfg.num_val
    seed = cfg.seed if split == "train" else cfg.seed + 1  # held-out scenes come from a different seed
    kinds = toy_kinds(cfg, split)
    mix = "" if kinds == EDIT_KINDS else "-" + "".join(f"{k[:3]}{kinds.count(k)}" for k in EDIT_KINDS)
    return cache / f"toy-{split}-s{seed}-n{num}-px{cfg.size}{mix}"


def ensure_toy(cfg: DictConfig, split: str, progress: bool = True) -> Path:
    """The toy split's shard directory, generated once into the cache."""
    directory = toy_dir(cfg, split)
    num = cfg.num_train if split == "train" else cfg.num_val
    seed = cfg.seed if split == "train" else cfg.seed + 1
    if read_manifest(directory).get("num_samples") != num:
        # runs started together on one cache (a sweep, the ranks of several jobs): one writes, the others wait
        locks = directory.parent / ".locks"  # beside the datasets, not among them (a glob of the cache finds none)
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{directory.name}.lock")):
            if read_manifest(directory).get("num_samples") != num:
                write_toy_shards(directory, num, seed=seed, size=cfg.size, samples_per_shard=cfg.samples_per_shard,
                                 progress=progress, kinds=toy_kinds(cfg, split))
    return directory


def recorded_encoding(spec) -> dict | None:
    """The `editflow encode` record of shard directories (None for source shards)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    records = [read_manifest(p).get("encoding") for p in (Path(str(i)).expanduser() for i in specs) if p.is_dir()]
    if any(r != records[0] for r in records):
        raise ConfigError(f"{specs}: these directories mix pre-encoded and source shards, or two encodings")
    return records[0] if records else None


def directory_urls(directory: Path, key: str) -> list[str]:
    """The finished shards of a directory written by `editflow data convert` or `editflow encode`, checked
    against its manifest: it lists shards, they exist, and they hold samples."""
    manifest = read_manifest(directory)
    if not manifest["shards"]:
        raise ConfigError(f"{key}: {directory} has no {MANIFEST} listing finished shards; give the --out directory "
                          "of `editflow data convert` (or of `editflow encode`), a list of them, or .tar files")
    counts = [entry.get("count") for entry in manifest["shards"]]
    total = manifest.get("num_samples", sum(counts) if None not in counts else None)
    if total == 0:
        rejects = directory / "rejects.jsonl"
        why = f"; {rejects} says why each record was rejected" if rejects.exists() else ""
        raise DataError(f"{key}: {directory}/{MANIFEST} lists 0 samples in {len(counts)} shard(s): nothing to read"
                        f"{why}. Fix the input and convert again, or leave this set out")
    urls = [str(directory / entry["file"]) for entry in manifest["shards"]]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"{key}: {len(missing)} shard(s) listed in {directory}/{MANIFEST} are missing, e.g. "
                          f"{missing[0]}; copy them back (`editflow data verify {directory}` checks every shard)")
    return urls


def resolve_urls(spec, key: str) -> list[str]:
    """Shard paths from a directory with a manifest, a list of directories, or tar paths/brace patterns
    (`shard-{000000..000099}.tar`); anything that does not exist is an error naming `key`."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in specs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            urls += directory_urls(path, key)
            continue
        if "://" in text or text.startswith("pipe:"):
            raise ConfigError(f"{key}: {text} is a URL; shards are read from local or mounted storage: copy or "
                              "mount them and give their directory")
        expanded = [str(Path(u).expanduser()) for u in braceexpand(text)]
        missing = [u for u in expanded if not os.path.isfile(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"{key}: {missing[0]} does not exist{more}; give a shard directory with {MANIFEST} "
                              "(`editflow data convert --out`), a list of them, or existing .tar files")
        urls += expanded
    if not urls:
        raise ConfigError(f"{key}: no shards given")
    return urls


def split_urls(cfg: DictConfig, split: str, progress: bool = True) -> list[str]:
    """Shard URLs of `split` ("train" or "val", when set) for a `data/` config node."""
    if cfg.kind == "toy":
        return resolve_urls(str(ensure_toy(cfg.toy, split, progress)), f"data.toy ({split})")
    return resolve_urls(cfg[split], f"data.{split}")


def set_names(cfg: DictConfig) -> list[tuple[str, float | None]]:
    """(name, explicit weight or None) of each training set, as `train_sets` names them (the schema has checked
    data.train's shape and weights)."""
    spec = cfg.train
    if cfg.kind == "toy" or not isinstance(spec, DictConfig):
        return [("toy" if cfg.kind == "toy" else "train", 1.0)]
    named = []
    for name, node in spec.items():
        weight = node.get("weight")  # left out: the set's share of all samples
        named.append((str(name), None if weight is None else float(weight)))
    return named


def set_size(directories) -> int | None:
    """Samples in a set's shard directories, from their manifests (None when one has no count: tar paths)."""
    total = 0
    for item in [directories] if isinstance(directories, (str, os.PathLike)) else list(directories):
        count = read_manifest(Path(str(item)).expanduser()).get("num_samples")
        if count is None:
            return None
        total += count
    return total


def mixture(named: list[tuple[str, float | None]], sizes: list[int | None]) -> list[float]:
    """The mixing weights: an explicit weight as given; a set without one gets its share of all samples,
    so leaving every weight out draws each sample equally often (the natural mixture)."""
    known = sum(size for size in sizes if size)
    weights = []
    for (name, weight), size in zip(named, sizes):
        if weight is None and size is None:
            raise ConfigError(f"data.train.{name}: no weight, and its size is unknown (no manifest.json with "
                             f"num_samples: given as tar files?): give data.train.{name}.weight")
        weights.append(weight if weight is not None else size / known if known else 0.0)
    if not any(weights):
        raise ConfigError(f"data.train: every set has weight 0 or no samples ({', '.join(n for n, _ in named)})")
    return weights


def _check_encoded_from(cfg: DictConfig, name: str, root: Path, manifest: dict) -> None:
    """Pre-encoded shards stand in for data.train: refuse shards encoded from other source shards than the
    ones data.train names. The same shards mounted elsewhere pass: they match by their absolute paths, or
    by the sha256s their manifests list (convert writes them). Checked where both are known: the source
    shards still exist and the encoding recorded them (encodings from before it did are taken on trust)."""
    if cfg.kind == "toy" or cfg.train is None:
        return
    key = "data.train" if not isinstance(cfg.train, DictConfig) else f"data.train.{name}.path"
    spec = cfg.train if key == "data.train" else cfg.train[name].path
    recorded = manifest.get("shards", [])
    if not recorded or not all(os.path.isabs(entry.get("source", "")) for entry in recorded):
        return
    try:
        wanted = resolve_urls(spec, key)
    except ConfigError:  # the source shards are gone: the encoding is all there is
        return
    if sorted(map(os.path.realpath, wanted)) == sorted(entry["source"] for entry in recorded):
        return
    found, encoded = listed_sha256(wanted), [entry.get("source_sha256") for entry in recorded]
    if None not in found and None not in encoded and sorted(found) == sorted(encoded):
        return
    dirs = lambda urls: ", ".join(sorted({os.path.dirname(os.path.realpath(u)) for u in urls}))
    raise ConfigError(f"data.pre_encoded={root}: set {name!r} was encoded from "
                      f"{dirs(entry['source'] for entry in recorded)}, but {key} is {dirs(wanted)} (other shards, "
                      f"or copies whose manifest.json sha256s do not match); re-run `editflow encode` for this "
                      f"{key}, or point {key} at the shards it was encoded from")


def encoded_sets(cfg: DictConfig) -> list[ShardSet]:
    """The training sets as `editflow encode` wrote them under `data.pre_encoded` (same names and weights)."""
    root = Path(str(cfg.pre_encoded)).expanduser()
    named, manifests = set_names(cfg), []
    for name, _ in named:
        manifest = read_manifest(root / name)
        if "encoding" not in manifest:
            raise ConfigError(f"data.pre_encoded={root}: no finished encoding of set {name!r} (no "
                              f"{root / name}/manifest.json); run `editflow encode encode.out={root}` with "
                              "this run's overrides")
        _check_encoded_from(cfg, name, root, manifest)
        manifests.append(manifest)
    weights = mixture(named, [m.get("num_samples") for m in manifests])
    return [ShardSet(name, directory_urls(root / name, f"data.pre_encoded ({name})"), weight,
                     encoding=manifest["encoding"]) for (name, _), weight, manifest in zip(named, weights, manifests)]


def train_sets(cfg: DictConfig, progress: bool = True) -> list[ShardSet]:
    """The weighted shard sets to mix for training.

    `data.train` is a directory, a list of them, or a mapping name -> {path(s), weight}
    (e.g. the three GPT-IMAGE-EDIT origins, or text-to-image next to edits); a set without a weight is
    drawn in proportion to its size. With `data.pre_encoded` the same sets come from `editflow
    encode`'s output instead.
    """
    if cfg.pre_encoded:
        return encoded_sets(cfg)
    if cfg.kind == "toy":
        return [ShardSet("toy", split_urls(cfg, "train", progress))]
    spec = cfg.train
    if not isinstance(spec, DictConfig):
        return [ShardSet("train", resolve_urls(spec, "data.train"), encoding=recorded_encoding(spec))]
    named = set_names(cfg)
    urls = [resolve_urls(spec[name].path, f"data.train.{name}.path") for name, _ in named]  # checks each set
    weights = mixture(named, [set_size(spec[name].path) for name, _ in named])
    return [ShardSet(name, set_urls, weight, encoding=recorded_encoding(spec[name].path))
            for (name, _), set_urls, weight in zip(named, urls, weights)]
