"""Write the toy edit stream as WebDataset shards (`editflow data toy`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm import tqdm

from editflow.data.shards import png_bytes, read_manifest, write_manifest, write_shard
from editflow.data.toy import EDIT_KINDS, make_edit
from editflow.errors import ConfigError


def toy_sample(index: int, seed: int, size: int, kinds: tuple[str, ...] = EDIT_KINDS) -> dict:
    """One toy edit in the shard sample format: src/tgt images, json metadata, and the ground-truth mask."""
    edit = make_edit(index, seed=seed, size=size, kinds=kinds)
    return {
        "__key__": edit.key,
        "src.png": png_bytes(edit.source),
        "tgt.png": png_bytes(edit.target),
        "mask.png": png_bytes(edit.mask),
        "json": json.dumps(edit.meta).encode(),
    }


def write_toy_shards(
    out: str | os.PathLike,
    num: int,
    seed: int = 0,
    size: int = 64,
    samples_per_shard: int = 1000,
    progress: bool = True,
    kinds: tuple[str, ...] = EDIT_KINDS,
) -> Path:
    """Write `num` toy edits to `out` (their kinds in the cycle `kinds`); shards already listed in the
    manifest are kept, not rewritten."""
    out = Path(out)
    manifest = read_manifest(out)
    params = {"generator": "toy", "num": num, "seed": seed, "size": size, "samples_per_shard": samples_per_shard}
    if tuple(kinds) != EDIT_KINDS:  # recorded only when not the balanced cycle: older manifests stay valid
        params["kinds"] = list(kinds)
    made = manifest.get("params")
    # resuming is for the same toy set only: never mix two (a ConfigError is a ValueError, as before)
    if made != params and (made or manifest["shards"]):
        if not made or made.get("generator") != "toy":
            raise ConfigError(f"{out} holds other shards ({len(manifest['shards'])} listed in its manifest.json, not "
                              "toy edits); give a new or empty folder for the toy shards")
        differ = ", ".join(f"{k} {made.get(k)} (asked for {v})" for k, v in params.items() if made.get(k) != v)
        raise ConfigError(f"{out} holds toy shards made with other settings: {differ}; give another folder, or "
                          "delete this one to start over")
    out.mkdir(parents=True, exist_ok=True)
    done = {entry["file"]: entry for entry in manifest["shards"]}
    num_shards = (num + samples_per_shard - 1) // samples_per_shard
    shards = []
    bar = tqdm(total=num, desc=f"toy shards -> {out}", unit="sample", disable=not progress)
    for shard in range(num_shards):
        name = f"toy-{shard:06d}.tar"
        first, last = shard * samples_per_shard, min(num, (shard + 1) * samples_per_shard)
        if name in done and (out / name).exists():
            shards.append(done[name])
        else:
            shards.append(write_shard(out / name, (toy_sample(i, seed, size, kinds) for i in range(first, last))))
            # The manifest grows shard by shard, so an interrupted run resumes where it stopped.
            write_manifest(out, {"params": params, "shards": shards})
        bar.update(last - first)
    bar.close()
    write_manifest(out, {"params": params, "shards": shards, "num_samples": num})
    return out
