"""Small copies of the published dataset layouts, made by the tests (see issue 12 for the facts they follow).

GPT-IMAGE-EDIT-1.5M: `<source>/<task>/{input,output}/<id>.png` and `<source>/<task>/metadata/<source>_<task>.json`
(a JSON list; paths relative to the task folder), shipped as `gpt-edit/<source>.tar.gz.partNNN` whose members
start with `<source>/`. ShareGPT-4o-Image: `text_to_image.json`, `text_and_image_to_image.json` beside
`*_part_<k>.tar` holding `image/...`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = {"hqedit": ["edit", "generate"], "omniedit": ["addition"], "ultraedit": ["change_color"]}


def png(seed: int, size=(300, 300)) -> bytes:
    """A distinct RGB PNG per seed: a flat colour with a noisy corner (so sizes are not trivial)."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3, dtype=np.uint8)
    pixels[:48, :48] = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def gpt_image_edit_members(source: str, per_task: int = 3, seed: int = 0) -> list[tuple[str, bytes]]:
    """One source's archive members in the release's order: a task's inputs, then its outputs, then its
    metadata (the worst order for memory: every input is read before the output that completes it)."""
    members = []
    for t, task in enumerate(TASKS[source]):
        ids = [f"{seed * 1000 + t * 100 + i:08d}" for i in range(per_task)]
        members += [(f"{source}/{task}/input/{i}.png", png(int(i) * 2)) for i in ids]
        members += [(f"{source}/{task}/output/{i}.png", png(int(i) * 2 + 1)) for i in ids]
        records = [{"id": f"{source}_{task}_{i}", "dataset_source": source, "task": task, "input": f"input/{i}.png",
                    "output": f"output/{i}.png", "instruction": f"{task} edit number {int(i)}",
                    "instruction_type": "original", "input_description": f"picture {i}"} for i in ids]
        if source == "omniedit":
            for r in records:
                r["instruction_original"] = r["instruction"].upper()
        members.append((f"{source}/{task}/metadata/{source}_{task}.json", json.dumps(records, indent=1).encode()))
    return members


def write_files(root: Path, members: list[tuple[str, bytes]]) -> Path:
    for name, data in members:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def tar_bytes(members: list[tuple[str, bytes]], gzip: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_split(folder: Path, name: str, data: bytes, parts: int) -> list[Path]:
    """`name.partNNN` files that concatenate to `data`, as the release ships its archives."""
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // parts)
    paths = []
    for k in range(parts):
        paths.append(folder / f"{name}.part{k:03d}")
        paths[-1].write_bytes(data[k * step:(k + 1) * step])
    return paths


def gpt_image_edit_download(root: Path, per_task: int = 3, parts: int = 4) -> Path:
    """The downloaded release: `root/gpt-edit/<source>.tar.gz.partNNN` for every source."""
    for s, source in enumerate(TASKS):
        write_split(root / "gpt-edit", f"{source}.tar.gz", tar_bytes(gpt_image_edit_members(source, per_task, s), True),
                    parts)
    return root


def sharegpt4o_release(root: Path, extracted: bool = False) -> dict:
    """ShareGPT-4o-Image in miniature: 3 text-to-image and 3 edit records (one with two input images), images in
    two edit tar parts (an edit's input in part 1, its output in part 2) and one text-to-image part."""
    t2i = [{"input_prompt": f"a picture of thing {n}", "output_image": f"image/{n}.png",
            "output_image_resolution": [300, 300]} for n in range(3)]
    edits = [{"input_prompt": f"edit {n}", "input_image": [f"image/v2v_{n}_in.png"],
              "output_image": f"image/v2v_{n}.png", "input_image_resolution": [[300, 300]],
              "output_image_resolution": [300, 300]} for n in range(3)]
    edits[1]["input_image"].append("image/v2v_1_in2.png")
    edits[2]["input_image"] = []  # an edit record with no input: text-to-image after all
    images = {f"image/{n}.png": png(100 + n) for n in range(3)}
    images.update({f"image/v2v_{n}_in.png": png(200 + n) for n in range(3)})
    images.update({f"image/v2v_{n}.png": png(300 + n) for n in range(3)})
    images["image/v2v_1_in2.png"] = png(400)
    root.mkdir(parents=True, exist_ok=True)
    (root / "text_to_image.json").write_text(json.dumps(t2i))
    (root / "text_and_image_to_image.json").write_text(json.dumps(edits))
    if extracted:
        write_files(root, list(images.items()))
    else:
        part1 = [(n, d) for n, d in images.items() if n.startswith("image/v2v_") and "_in" in n]
        part2 = [(n, d) for n, d in images.items() if n.startswith("image/v2v_") and "_in" not in n]
        (root / "text_and_image_to_image_part_1.tar").write_bytes(tar_bytes(part1, False))
        (root / "text_and_image_to_image_part_2.tar").write_bytes(tar_bytes(part2, False))
        (root / "text_to_image_part_1.tar").write_bytes(
            tar_bytes([(n, d) for n, d in images.items() if not n.startswith("image/v2v_")], False))
    return images
