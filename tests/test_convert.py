import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from editflow.data.convert import convert, verify
from editflow.data.shards import read_samples, shard_urls
from editflow.data.tokens import budget_from_model


def save(path, size=(300, 300), mode="RGB", fmt=None, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(path)
        return path
    image = Image.new("RGB", size, color)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(0)  # fully transparent: must come out white
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


@pytest.fixture()
def gpt_edit_root(tmp_path):
    root = tmp_path / "gpt-edit"
    img = root / "images"
    save(img / "a_src.jpg"); save(img / "a_tgt.jpg", color=(10, 200, 10))
    save(img / "b_src.png"); save(img / "b_tgt.png", mode="RGBA")
    save(img / "c_src.jpg", mode="CMYK", fmt="JPEG"); save(img / "c_tgt.png", mode="P")
    save(img / "d_src.png", mode="L"); save(img / "d_tgt.png", mode="I;16")
    save(img / "tiny.png", size=(100, 100))
    save(img / "wide.png", size=(900, 300))
    (img / "broken.jpg").write_bytes(save(img / "tmp.jpg").read_bytes()[:200])
    lines = [
        {"source": "a_src.jpg", "target": "a_tgt.jpg", "instruction": "make it green", "task": "color",
         "instruction_type": "short", "dataset_source": "omniedit"},
        {"input": "b_src.png", "output": "b_tgt.png", "instruction": "make it white"},
        {"input": "images/c_src.jpg", "output": "c_tgt.png", "instruction": "cmyk and palette"},
        {"input": "d_src.png", "output": "d_tgt.png", "instruction": "gray and 16 bit"},
        "MALFORMED",
        {"input": "missing.png", "output": "a_tgt.jpg", "instruction": "x"},
        {"input": "tiny.png", "output": "a_tgt.jpg", "instruction": "x"},
        {"input": "wide.png", "output": "a_tgt.jpg", "instruction": "x"},
        {"input": "a_src.jpg", "output": "a_tgt.jpg", "instruction": "   "},
        {"input": "broken.jpg", "output": "a_tgt.jpg", "instruction": "x"},
    ]
    meta = root / "metadata"
    meta.mkdir(parents=True)
    (meta / "omniedit.jsonl").write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return root


def test_gpt_image_edit_conversion_validates_and_reports(gpt_edit_root, tmp_path):
    out = tmp_path / "shards"
    manifest = convert("gpt-image-edit", [gpt_edit_root], out, samples_per_shard=3, workers=2, progress=False)
    assert manifest["num_samples"] == 4
    assert manifest["reject_reasons"] == {"bad_json": 1, "missing_file": 1, "too_small": 1, "aspect_mismatch": 1,
                                          "empty_instruction": 1, "undecodable_image": 1}
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["location"].rsplit(":", 1)[1] for r in rejects] == ["5", "6", "7", "8", "9", "10"]
    assert all(r["location"].startswith(str(gpt_edit_root / "metadata" / "omniedit.jsonl")) for r in rejects)
    assert "missing.png" in rejects[1]["detail"]
    samples = {s.key: s for s in read_samples(shard_urls(out))}
    assert len(samples) == 4
    first = samples["omniedit_000000001"]
    assert first.meta["dataset"] == "omniedit" and first.meta["task"] == "color"
    assert first.meta["instruction_type"] == "short" and first.meta["source_size"] == [300, 300]
    # original JPEG bytes are kept
    raw = next(r for r in __import__("webdataset").WebDataset(shard_urls(out), shardshuffle=False)
               if r["__key__"] == "omniedit_000000001")
    assert raw["src.jpg"] == (gpt_edit_root / "images" / "a_src.jpg").read_bytes()
    # RGBA on white, CMYK/palette/gray/16-bit to RGB
    assert np.asarray(samples["omniedit_000000002"].target).min() == 255
    for key in ("omniedit_000000003", "omniedit_000000004"):
        assert samples[key].source.mode == "RGB" and samples[key].target.mode == "RGB"
    assert abs(int(np.asarray(samples["omniedit_000000004"].target)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    assert manifest["buckets"] == {"1024x1024": 4}
    assert verify(out, progress=False) == []


def test_rerun_skips_finished_shards_without_duplicates(gpt_edit_root, tmp_path):
    out = tmp_path / "shards"
    convert("gpt-image-edit", [gpt_edit_root], out, samples_per_shard=3, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000001.tar").unlink()  # as if the first run had crashed before shard 1
    manifest = convert("gpt-image-edit", [gpt_edit_root], out, samples_per_shard=3, progress=False)
    assert manifest["num_samples"] == 4
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamps["shard-000000.tar"]
    keys = [s.key for s in read_samples(shard_urls(out))]
    assert len(keys) == len(set(keys)) == 4
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 6


def test_checksum_mismatch_rejects_the_record(gpt_edit_root, tmp_path):
    good = hashlib.sha256((gpt_edit_root / "images" / "a_src.jpg").read_bytes()).hexdigest()
    (gpt_edit_root / "checksum.sha256").write_text(f"{good}  images/a_src.jpg\n{'0' * 64}  images/b_src.png\n")
    manifest = convert("gpt-image-edit", [gpt_edit_root], tmp_path / "s", progress=False)
    assert manifest["reject_reasons"]["checksum_mismatch"] == 1 and manifest["num_samples"] == 3


def test_verify_names_corrupted_and_missing_shards(gpt_edit_root, tmp_path):
    out = tmp_path / "shards"
    convert("gpt-image-edit", [gpt_edit_root], out, samples_per_shard=3, progress=False)
    data = bytearray((out / "shard-000000.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "shard-000000.tar").write_bytes(bytes(data))
    (out / "shard-000001.tar").unlink()
    problems = verify(out, progress=False)
    assert any("shard-000000.tar" in p and "sha256" in p for p in problems)
    assert any("shard-000001.tar" in p and "missing" in p for p in problems)
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "data", "verify", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "shard-000000.tar" in result.stderr


def test_llava_edit_last_image_is_the_target(tmp_path):
    for name in ("s.png", "r.png", "t.png"):
        save(tmp_path / "img" / name)
    records = [{"image": ["img/s.png", "img/r.png", "img/t.png"],
                "conversations": [{"from": "human", "value": "<image>\n<image>\nPut the hat on."},
                                  {"from": "gpt", "value": "<image>"}]},
               {"image": ["img/t.png"], "conversations": [{"from": "human", "value": "A red square."}]}]
    (tmp_path / "edit.json").write_text(json.dumps(records))
    manifest = convert("llava-edit", [tmp_path / "edit.json"], tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 2
    samples = read_samples(shard_urls(tmp_path / "out"))
    assert samples[0].instruction == "Put the hat on." and samples[0].source is not None
    assert samples[1].source is None and samples[1].meta["text_to_image"] is True


def test_sharegpt4o_text_to_image_and_edit_parts(tmp_path):
    save(tmp_path / "in.png"); save(tmp_path / "out.png")
    (tmp_path / "text_to_image.json").write_text(json.dumps([{"input_prompt": "a cat", "output_image": "out.png"}]))
    (tmp_path / "text_and_image_to_image.json").write_text(json.dumps(
        [{"input_prompt": "make it blue", "input_image": ["in.png"], "output_image": "out.png"}]))
    manifest = convert("sharegpt4o", [tmp_path], tmp_path / "out", progress=False)
    tasks = sorted(s.meta["task"] for s in read_samples(shard_urls(tmp_path / "out")))
    assert manifest["num_samples"] == 2 and tasks == ["text_and_image_to_image", "text_to_image"]


def test_user_jsonl_with_custom_keys_via_cli(tmp_path):
    save(tmp_path / "pics" / "1.png"); save(tmp_path / "pics" / "2.png")
    (tmp_path / "mine.jsonl").write_text(json.dumps({"uid": "x.1", "before": "1.png", "after": "2.png",
                                                      "prompt": "brighter"}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "editflow.cli", "data", "convert", "--format", "jsonl", str(tmp_path / "mine.jsonl"),
         "--out", str(tmp_path / "out"), "--image-root", str(tmp_path / "pics"), "--source-key", "before",
         "--target-key", "after", "--instruction-key", "prompt", "--id-key", "uid", "--workers", "1"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    [sample] = read_samples(shard_urls(tmp_path / "out"))
    assert sample.key.startswith("x_1-") and sample.meta["id"] == "x.1" and sample.instruction == "brighter"
    # the default model's tokenizer is not on this offline machine: said, and the conversion goes on
    assert "note: instruction tokens are not counted: cannot count instruction tokens: the tokenizer of " \
           "model.qwen.pretrained='Qwen/Qwen2.5-VL-7B-Instruct' does not load" in result.stderr


def test_instructions_over_the_token_budget_are_counted(tmp_path):
    """The budget of the model config (tiny: max_length 512 minus the template and its 64 image tokens)."""
    budget = budget_from_model(["model=tiny"])
    assert budget.with_image == 512 - 64 - 4 and budget.text_only == 512 - 2
    save(tmp_path / "a.png"); save(tmp_path / "b.png")
    long = " ".join(f"word{i}" for i in range(200))
    assert budget.count(long) > budget.with_image
    records = [{"source": "a.png", "target": "b.png", "instruction": text} for text in ("short", long)]
    records.append({"target": "b.png", "instruction": long})  # text-to-image: the larger budget
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = convert("jsonl", [tmp_path / "m.jsonl"], tmp_path / "out", progress=False, tokens=budget)
    assert manifest["num_samples"] == 3 and manifest["over_token_budget"] == 1 + (budget.count(long) > 510)
    location, tokens, limit = manifest["token_examples"][0]
    assert location == f"{tmp_path / 'm.jsonl'}:2" and tokens == budget.count(long) and limit == budget.with_image


def test_exif_rotated_photos_are_stored_upright(tmp_path):
    """The training decoder ignores EXIF: a phone photo tagged 'rotate 90' is stored with its pixels turned."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    Image.new("RGB", (400, 300), (200, 30, 30)).save(tmp_path / "photo.jpg", exif=exif)
    save(tmp_path / "edited.png", size=(300, 400))
    (tmp_path / "m.jsonl").write_text(json.dumps({"source": "photo.jpg", "target": "edited.png", "instruction": "x"}))
    convert("jsonl", [tmp_path / "m.jsonl"], tmp_path / "out", progress=False)
    [sample] = read_samples(shard_urls(tmp_path / "out"))
    assert sample.source.size == (300, 400) and sample.meta["source_size"] == [300, 400]
