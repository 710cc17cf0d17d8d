"""`editflow bench data`: the training data loader against a bare PIL decode loop over the same files, and the
pre-encoded shard reader, in one run on data the bench writes itself.

    editflow bench data                                 # 1024-px JPEG pairs, the 8xA100 preset's loader settings
    editflow bench data data.bucket_base=512            # LoRA at 512^2 from 1024-px data
    editflow bench data data.num_workers=8 --rounds 7 --out bench/results/data.json   # worker processes

The data: JPEG pairs (quality 95, as `editflow data convert` re-encodes) of 1024x1024, 1536x1024 and
1024x1536 (GPT-Image-Edit-1.5M's sizes), photo-like content, written with the project's shard writer; and the
same samples pre-encoded (random latents and Qwen states of the configured model's shapes and dtype, with the
dropout outcomes its objective draws). Both live in a temporary directory removed at the end.

Timed, in rounds whose order rotates so that the machine's other load falls on all alike:
- loader: the training loader (BucketStream + ResumableLoader: read, decode, validate, bucket, fit, batch,
  hand over; the source images Qwen reads made on the training side) with the config's decode threads or
  worker processes and batch size; start-up (threads or workers starting, the shuffle buffer filling, the
  batches prefetched meanwhile) is reported apart, the rate is the steady state after it;
- loader_one_thread: the same in the training loop's own thread alone (no decode thread, no worker);
- decode: a bare loop reading the same shards with tarfile and decoding both JPEGs of each pair with PIL;
- encoded: the training loader over the pre-encoded shards.
A sample is one pair. Per core means per CPU-second: user + system time of the process (all its threads)
and its workers over the timed stretch, which other load on a shared machine changes far less than it
changes wall-clock rates. The figure of merit is `ratio_per_core`, the loader's pairs per CPU-second over
the bare loop's (target >= 0.8); `ratio_per_core_wall` is the wall-clock version (the loader's rate over the
cores its threads or workers can use, against the bare loop on one core), meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import json
import os
import platform
import pstats
import re
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))  # GPT-Image-Edit-1.5M's sizes, scaled by --side / 1024
JPEG_QUALITY = 95  # what `editflow data convert` re-encodes JPEGs at
LATENT_CHANNELS, VAE_FACTOR = 16, 8  # the FLUX VAE
QWEN_PIXELS_PER_TOKEN = 28 * 28  # Qwen2.5-VL: one merged token per 28x28 pixels
INSTRUCTION_TOKENS = 32  # chat template tail + a typical instruction
TARGET_RATIO = 0.8
RESULTS = Path("bench") / "results"


# ------------------------------------------------------------------------------------------ data
def _photo_like(rng: np.random.Generator, size: tuple[int, int], grain: np.ndarray) -> Image.Image:
    """Smooth colour fields plus film grain: compresses and decodes like a photograph (pure noise decodes
    slower, flat colour faster)."""
    w, h = size
    field = rng.integers(0, 256, (max(1, h // 32), max(1, w // 32), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(field).resize(size, Image.BICUBIC), dtype=np.int16)
    y, x = rng.integers(0, grain.shape[0] - h + 1), rng.integers(0, grain.shape[1] - w + 1)
    return Image.fromarray((smooth + grain[y:y + h, x:x + w]).clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _pair_sizes(pairs: int, side: int) -> list[tuple[int, int]]:
    return [(w * side // 1024, h * side // 1024) for w, h in (SIZES[i % len(SIZES)] for i in range(pairs))]


def _write_shards(directory: Path, samples, per_shard: int) -> list[str]:
    from editflow.data.shards import write_manifest, write_shard

    directory.mkdir(parents=True)
    samples, entries = list(samples), []
    for start in range(0, len(samples), per_shard):
        entries.append(write_shard(directory / f"bench-{start // per_shard:06d}.tar", samples[start:start + per_shard]))
    write_manifest(directory, {"shards": entries, "num_samples": len(samples)})
    return [str(directory / e["file"]) for e in entries]


def write_image_shards(directory: Path, sizes: list[tuple[int, int]], per_shard: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    longest = max(max(s) for s in sizes)
    grain = rng.normal(0, 6, (longest + 64, longest + 64, 3)).astype(np.int16)

    def sample(i: int, size: tuple[int, int]) -> dict:
        meta = {"instruction": "Make the sky look like a sunset.", "target_size": list(size),
                "source_size": list(size), "text_to_image": False}
        return {"__key__": f"pair-{i:06d}", "src.jpg": _jpeg(_photo_like(rng, size, grain)),
                "tgt.jpg": _jpeg(_photo_like(rng, size, grain)), "json": json.dumps(meta).encode()}

    return _write_shards(directory, (sample(i, size) for i, size in enumerate(sizes)), per_shard)


def encoded_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(tokens, width) of each stored Qwen state: the source at Qwen's max_pixels plus the instruction, for
    the full condition and each dropout outcome the objective draws."""
    from editflow.data.preencoded import drawn_drops
    from editflow.frozen_encoders import states_field
    from editflow.models.build import qwen_hidden_size

    image_tokens = (cfg.model.qwen.max_pixels or 1024 * 1024) // QWEN_PIXELS_PER_TOKEN
    tokens = {None: image_tokens + INSTRUCTION_TOKENS, "text": image_tokens + 8, "image": INSTRUCTION_TOKENS, "both": 8}
    width = qwen_hidden_size(cfg.model.qwen.pretrained)
    return {states_field(d): (tokens[d], width) for d in [None, *drawn_drops(cfg.objective)]}


def write_encoded_shards(directory: Path, sizes: list[tuple[int, int]], per_shard: int, cfg, seed: int) -> list[str]:
    """What `editflow encode` would store for the image shards, with random tensors of the real shapes."""
    from editflow.data.buckets import nearest_bucket
    from editflow.data.preencoded import encoded_sample
    from editflow.data.stream import fit_sizes
    from editflow.models.build import torch_dtype

    d, g = cfg.data, torch.Generator().manual_seed(seed)
    dtype = torch_dtype(cfg.model.frozen_dtype)
    states = encoded_shapes(cfg)
    latent = lambda wh: torch.randn(LATENT_CHANNELS, wh[1] // VAE_FACTOR, wh[0] // VAE_FACTOR, generator=g).to(dtype)

    def sample(i: int, size: tuple[int, int]) -> dict:
        bucket = (d.bucket_base,) * 2 if d.square_only else nearest_bucket(*size, d.bucket_base)
        fitted = fit_sizes(bucket, d.source_pixels)
        tensors = {"target": latent(fitted["tgt"]), "source": latent(fitted["src"]),
                   **{field: torch.randn(*shape, generator=g).to(dtype) for field, shape in states.items()}}
        return encoded_sample(f"pair-{i:06d}", {"instruction": "Make the sky look like a sunset."}, bucket, tensors)

    return _write_shards(directory, (sample(i, size) for i, size in enumerate(sizes)), per_shard)


# ------------------------------------------------------------------------------------------ timing
def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers) so far."""
    import psutil  # a dependency of accelerate

    total = time.process_time()  # this process, all threads, at nanosecond resolution
    for child in psutil.Process().children(recursive=True):  # at the kernel's tick resolution (10 ms)
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:  # a worker that just exited
            pass
    return total


class Window:
    """Wall-clock and CPU time of a measured stretch: pairs per second and pairs per CPU-second (per core)."""

    def __enter__(self) -> Window:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu

    def rates(self, samples: int) -> dict:
        return {"rate": samples / self.wall, "per_cpu_s": samples / self.cpu}


def decode_rate(urls: list[str], samples: int) -> dict:
    """The bare loop: tar members read in order, every JPEG decoded by PIL, nothing else."""
    images = 0
    with Window() as window:
        while images < 2 * samples:
            for url in urls:
                with tarfile.open(url, mode="r:") as tar:
                    for member in tar:
                        if member.name.endswith(".jpg"):
                            Image.open(io.BytesIO(tar.extractfile(member).read())).load()
                            images += 1
                if images >= 2 * samples:
                    break
    return window.rates(images // 2)


def make_loader(urls: list[str], cfg, shuffle_buffer: int, encoded: bool = False, serial: bool = False):
    """The training loader as the trainer builds it from `cfg.data`; `serial`: with no thread or worker."""
    from editflow.data.stream import BucketStream, ResumableLoader, ShardSet

    d = cfg.data
    stream = BucketStream([ShardSet("bench", urls)], cfg.trainer.micro_batch_size, seed=cfg.trainer.seed,
                          shuffle_buffer=shuffle_buffer, bucket_base=d.bucket_base,
                          source_pixels=d.source_pixels, max_skip_rate=d.max_skip_rate,
                          square_only=d.square_only, encoded=encoded,
                          decode_threads=0 if serial else d.decode_threads)
    return ResumableLoader(stream, num_workers=0 if serial else d.num_workers)


def parallelism(cfg) -> int:
    """How many batches the configured loader makes at once: its workers, or else its decode threads (at most
    one per usable CPU, as the stream runs them)."""
    from editflow.data.threads import usable_cpus

    return cfg.data.num_workers or min(cfg.data.decode_threads, usable_cpus()) or 1


def loader_rate(urls: list[str], cfg, shuffle_buffer: int, samples: int, encoded: bool = False,
                serial: bool = False) -> dict:
    """Steady-state pairs per second of a fresh training loader, and its start-up time.

    Start-up ends once the batches the threads or workers could prefetch while starting (2 each) have been
    taken: after that every batch timed was made while the clock ran."""
    from editflow.data.batches import ImageBatch

    start = time.perf_counter()
    loader = make_loader(urls, cfg, shuffle_buffer, encoded, serial)
    for _ in range(1 if serial else 2 * parallelism(cfg) + 1):
        next(loader)
    startup, count = time.perf_counter() - start, 0
    with Window() as window:
        while count < samples:
            batch = next(loader)
            count += len(batch)
            if isinstance(batch, ImageBatch):  # the PIL images Qwen reads are made on this side
                list(batch.source_images)
    del loader  # shuts its threads or workers down
    gc.collect()
    return {**window.rates(count), "startup_s": startup}


def profile_loader(urls: list[str], cfg, shuffle_buffer: int, samples: int, top: int) -> list[dict]:
    """Where the one-thread loader spends its time: the `top` functions by own time, with their share."""
    loader = make_loader(urls, cfg, shuffle_buffer, serial=True)
    next(loader)
    profiler = cProfile.Profile()
    count = 0
    profiler.enable()
    while count < samples:
        batch = next(loader)
        count += len(batch)
        list(batch.source_images)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    total = sum(s[2] for s in stats.values())
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    where = lambda file, line, name: name if file == "~" else f"{Path(file).name}:{line}({name})"  # noqa: E731
    return [{"function": where(*key), "calls": s[1], "own_s": round(s[2], 4), "share": round(s[2] / total, 4)}
            for key, s in rows]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _commit() -> str | None:
    """The git commit of the code measured (+ "-dirty" with uncommitted changes), where it is a checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace, overrides: list[str]) -> dict:
    from editflow.config import compose, validate_groups
    from editflow.data.threads import usable_cpus

    if not any(o.split("=", 1)[0].lstrip("+~") == "experiment" for o in overrides):
        overrides = ["experiment=gpt_image_edit_8xa100", *overrides]  # the full-scale preset's loader settings
    commit = _commit()  # before anything runs: the code that is measured
    cfg = compose(overrides)
    validate_groups(cfg, ("data",))
    workers, threads = cfg.data.num_workers, cfg.data.decode_threads
    cpus = usable_cpus()
    cores = min(parallelism(cfg), cpus)
    shuffle_buffer = min(cfg.data.shuffle_buffer, args.shuffle_buffer)
    torch.set_num_threads(1)  # the loader's work is PIL's and numpy's; the one-thread figure is one thread
    sizes = _pair_sizes(args.pairs, args.side)
    with tempfile.TemporaryDirectory(prefix="editflow-bench-data-", dir=args.workdir) as tmp:
        print(f"[bench] writing {args.pairs} JPEG pairs and their pre-encoded form to {tmp} ...", file=sys.stderr)
        images = write_image_shards(Path(tmp) / "images", sizes, args.samples_per_shard, args.seed)
        encoded = write_encoded_shards(Path(tmp) / "encoded", sizes, args.samples_per_shard, cfg, args.seed)
        pair_bytes = sum(os.path.getsize(u) for u in images) / args.pairs
        timers = {
            "loader": lambda: loader_rate(images, cfg, shuffle_buffer, args.samples),
            "loader_one_thread": lambda: loader_rate(images, cfg, shuffle_buffer, args.samples, serial=True),
            "decode": lambda: decode_rate(images, args.samples),
            "encoded": lambda: loader_rate(encoded, cfg, shuffle_buffer, args.samples, encoded=True),
        }
        names, rounds = list(timers), []
        for r in range(args.rounds):
            measured = {}
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
                measured[name] = timers[name]()
            row = {f"{n}_samples_per_s": measured[n]["rate"] for n in names}
            row.update({f"{n}_samples_per_cpu_s": measured[n]["per_cpu_s"] for n in names})
            row.update({f"{n}_startup_s": m["startup_s"] for n, m in measured.items() if "startup_s" in m})
            decode = measured["decode"]
            row["ratio_per_core"] = measured["loader"]["per_cpu_s"] / decode["per_cpu_s"]
            row["ratio_per_core_wall"] = measured["loader"]["rate"] / cores / decode["rate"]
            row["ratio_one_thread"] = measured["loader_one_thread"]["per_cpu_s"] / decode["per_cpu_s"]
            rounds.append(row)
            print(f"[bench] round {r + 1}/{args.rounds}: pairs/s (per CPU-second): "
                  + ", ".join(f"{n.replace('_', ' ')} {measured[n]['rate']:.1f} ({measured[n]['per_cpu_s']:.1f})"
                              for n in names)
                  + f"; loader/decode per core {row['ratio_per_core']:.2f}x", file=sys.stderr)
        profile = profile_loader(images, cfg, shuffle_buffer, args.samples, args.profile) if args.profile else None
    median = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    result = {
        "device": f"cpu ({_cpu_model()}, {cpus} cores)",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["editflow bench data", *args.argv]).strip(),
        "commit": commit,
        **{f"{n}_samples_per_s": median(f"{n}_samples_per_s") for n in names},
        "samples_per_cpu_s": {n: median(f"{n}_samples_per_cpu_s") for n in names},
        "workers": workers, "decode_threads": 0 if workers else threads, "cpu": cpus, "cores_used": cores,
        "ratio_per_core": _spread([r["ratio_per_core"] for r in rounds]),
        "ratio_per_core_wall": _spread([r["ratio_per_core_wall"] for r in rounds]),
        "ratio_one_thread": _spread([r["ratio_one_thread"] for r in rounds]),
        "target_ratio_per_core": TARGET_RATIO,
        "loader_startup_s": median("loader_startup_s"),
        "rounds": rounds,
        "setup": {"pairs": args.pairs, "sizes": sorted(set(sizes)), "jpeg_quality": JPEG_QUALITY,
                  "bytes_per_pair": round(pair_bytes), "samples_per_round": args.samples, "rounds": args.rounds,
                  "batch": cfg.trainer.micro_batch_size, "bucket_base": cfg.data.bucket_base,
                  "source_pixels": cfg.data.source_pixels, "square_only": cfg.data.square_only,
                  "shuffle_buffer": shuffle_buffer, "encoded_states": encoded_shapes(cfg),
                  "encoded_dtype": cfg.model.frozen_dtype, "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "pillow": PIL.__version__, "overrides": overrides},
    }
    if profile is not None:
        result["profile_one_thread"] = profile
    return result


def default_out(result: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")[:40]
    return RESULTS / f"{result['date']}-data-{slug}.json"
