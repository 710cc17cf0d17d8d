"""The two published releases convert as a user downloads them (issue 12): every layout, archives read in place."""

import json
import subprocess
import sys

import pytest
import webdataset as wds
from release_fixtures import (TASKS, gpt_image_edit_download, gpt_image_edit_members, sharegpt4o_release, tar_bytes,
                              write_files, write_split)

from editflow.data.convert import convert, verify
from editflow.data.errors import DataError
from editflow.data.shards import read_samples, shard_urls


def raw_samples(out) -> dict:
    return {s["__key__"]: s for s in wds.WebDataset(shard_urls(out), shardshuffle=False, empty_check=False)}


def expected_from(members: list) -> dict:
    """key -> (source bytes, target bytes, instruction) as the release's metadata pairs them."""
    files = dict(members)
    expected = {}
    for name, data in members:
        if "/metadata/" in name:
            task = name.split("/metadata/")[0]
            for r in json.loads(data):
                expected[r["id"]] = (files[f"{task}/{r['input']}"], files[f"{task}/{r['output']}"], r["instruction"])
    return expected


def assert_pairs(out, expected: dict) -> None:
    samples = raw_samples(out)
    assert sorted(samples) == sorted(expected)
    for key, (src, tgt, instruction) in expected.items():
        assert samples[key]["src.png"] == src and samples[key]["tgt.png"] == tgt
        assert json.loads(samples[key]["json"])["instruction"] == instruction


def all_members(per_task=2):
    return [m for s, source in enumerate(TASKS) for m in gpt_image_edit_members(source, per_task, s)]


@pytest.mark.parametrize("where", ["root", "source", "task", "doubled"])
def test_gpt_image_edit_extracted_metadata_found_at_any_depth(tmp_path, where):
    members = all_members()
    root = tmp_path / "GPT-Image-Edit"
    if where == "doubled":  # the card's `tar -xzf ... -C <out>/<source>` gives <source>/<source>/<task>
        for source in TASKS:
            write_files(root / source, [m for m in members if m[0].startswith(f"{source}/")])
    else:
        write_files(root, members)
    given = {"root": root, "source": root / "hqedit", "task": root / "hqedit" / "edit", "doubled": root}[where]
    prefix = {"source": "hqedit/", "task": "hqedit/edit/"}.get(where, "")
    manifest = convert("gpt-image-edit", [given], tmp_path / "out", samples_per_shard=3, workers=2, progress=False)
    assert_pairs(tmp_path / "out", expected_from([m for m in members if m[0].startswith(prefix)]))
    assert manifest["num_rejected"] == 0
    if where == "root":
        meta = {s.key: s.meta for s in read_samples(shard_urls(tmp_path / "out"))}
        omni = meta["omniedit_addition_00001000"]
        assert omni["dataset"] == "omniedit" and omni["task"] == "addition" and omni["instruction_type"] == "original"
        assert omni["instruction_original"] == "ADDITION EDIT NUMBER 1000"
        assert omni["id"] == "omniedit_addition_00001000"
        assert omni["origin"].endswith("omniedit/addition/metadata/omniedit_addition.json:1")


def test_gpt_image_edit_from_split_archives_with_metadata_last(tmp_path):
    """Converted straight from the `.tar.gz.partNNN` parts, never extracted: the same samples as the extracted
    layout, with images held within the memory budget and the rest spilled to a scratch folder removed at the end."""
    download = gpt_image_edit_download(tmp_path / "download", per_task=4, parts=5)
    extracted = write_files(tmp_path / "extracted", all_members(4))
    image = len(gpt_image_edit_members("hqedit", 4)[0][1])
    budget = 3 * image  # holds 3 of the 4 inputs a task reads before its first output
    manifest = convert("gpt-image-edit", [download], tmp_path / "out", samples_per_shard=3, workers=2,
                       progress=False, memory_budget=budget)
    assert_pairs(tmp_path / "out", expected_from(all_members(4)))
    stats = manifest["archives"]
    assert stats["peak_memory"] <= budget and stats["peak_scratch"] > 0
    assert [stats["peak_memory"], stats["peak_scratch"]] == stats["predicted_peaks"] and stats["unused_members"] == 0
    assert not (tmp_path / "out" / ".scratch").exists()
    first = json.loads(raw_samples(tmp_path / "out")["hqedit_edit_00000000"]["json"])
    assert first["origin"] == f"{download / 'gpt-edit' / 'hqedit.tar.gz'}:hqedit/edit/metadata/hqedit_edit.json:1"
    assert verify(tmp_path / "out", progress=False) == []
    convert("gpt-image-edit", [extracted], tmp_path / "from-files", progress=False)
    assert sorted(raw_samples(tmp_path / "from-files")) == sorted(raw_samples(tmp_path / "out"))
    # one source's set alone: a part file, or the archive's name standing for its parts
    one = convert("gpt-image-edit", [download / "gpt-edit" / "ultraedit.tar.gz"], tmp_path / "ultra", progress=False)
    part = convert("gpt-image-edit", [download / "gpt-edit" / "ultraedit.tar.gz.part002"], tmp_path / "ultra2",
                   progress=False)
    assert one["num_samples"] == part["num_samples"] == 4


def test_archive_conversion_resumes_after_a_crash(tmp_path):
    download = gpt_image_edit_download(tmp_path / "download", per_task=3, parts=3)
    out = tmp_path / "out"
    convert("gpt-image-edit", [download], out, samples_per_shard=4, progress=False, memory_budget=1)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    samples = raw_samples(out)
    (out / "shard-000002.tar").unlink()  # as if killed while writing shard 2
    manifest = convert("gpt-image-edit", [download], out, samples_per_shard=4, progress=False, memory_budget=1)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert set(after) == set(before) and len(before) == 3
    assert all(after[n] == before[n] for n in before if n != "shard-000002.tar")  # untouched
    again = raw_samples(out)
    assert sorted(again) == sorted(samples)  # shard 2 rewritten with the same samples, nothing duplicated
    assert all(again[k]["tgt.png"] == samples[k]["tgt.png"] and again[k]["json"] == samples[k]["json"] for k in again)
    assert manifest["num_samples"] == 12 and verify(out, progress=False) == []


def test_damaged_archives_are_named(tmp_path):
    data = tar_bytes(gpt_image_edit_members("hqedit", 2), gzip=True)
    parts = write_split(tmp_path / "gap", "hqedit.tar.gz", data, 4)
    parts[2].unlink()
    with pytest.raises(DataError, match=r"hqedit\.tar\.gz: part\(s\) 002 missing"):
        convert("gpt-image-edit", [tmp_path / "gap"], tmp_path / "out1", progress=False)
    parts = write_split(tmp_path / "short", "hqedit.tar.gz", data, 4)
    parts[-1].write_bytes(parts[-1].read_bytes()[:-200])  # download interrupted
    with pytest.raises(DataError, match=r"hqedit\.tar\.gz: cannot read the archive .* part .*part003.*incomplete"):
        convert("gpt-image-edit", [tmp_path / "short"], tmp_path / "out2", progress=False)
    parts = write_split(tmp_path / "corrupt", "hqedit.tar.gz", data, 4)
    broken = bytearray(parts[1].read_bytes())
    broken[100:140] = bytes(40)
    parts[1].write_bytes(bytes(broken))
    with pytest.raises(DataError, match=r"hqedit\.tar\.gz: cannot read the archive"):
        convert("gpt-image-edit", [tmp_path / "corrupt"], tmp_path / "out3", progress=False)


def test_archives_beside_their_extraction_are_refused(tmp_path):
    gpt_image_edit_download(tmp_path / "data", per_task=1, parts=1)
    write_files(tmp_path / "data" / "extracted", gpt_image_edit_members("hqedit", 1))
    with pytest.raises(DataError, match="both extracted metadata .* and archives"):
        convert("gpt-image-edit", [tmp_path / "data"], tmp_path / "out", progress=False)


def test_llava_data_list_with_an_image_root_per_json(tmp_path):
    """`data.txt` lines `image_root,json_file,need_weight` as the public training code reads them."""
    hq = write_files(tmp_path / "data" / "gpt-edit", gpt_image_edit_members("hqedit", 2))
    ultra = write_files(tmp_path / "data" / "gpt-edit", gpt_image_edit_members("ultraedit", 2, seed=2))
    (tmp_path / "training_json").mkdir()
    (tmp_path / "training_json" / "hqedit_gpt_edit.json").write_text(json.dumps([
        {"image": ["input/00000000.png", "output/00000000.png"],
         "conversations": [{"from": "human", "value": "<image>\nfirst"}, {"from": "gpt", "value": "ok"},
                           {"from": "human", "value": "<image>\nMake it blue."}, {"from": "gpt", "value": "<image>"}]},
        {"image": "output/00000001.png", "conversations": [{"from": "human", "value": "A red square."}]}]))
    (tmp_path / "training_json" / "ultraedit_gpt.json").write_text(json.dumps([
        {"image": ["change_color/input/00002000.png", "change_color/output/00002000.png"],
         "conversations": [{"from": "human", "value": "<image>\nrecolour"}]}]))
    (tmp_path / "data.txt").write_text("data/gpt-edit/hqedit/edit,training_json/hqedit_gpt_edit.json,false\n"
                                       "data/gpt-edit/ultraedit,training_json/ultraedit_gpt.json,false\n")
    manifest = convert("llava-edit", [tmp_path / "data.txt"], tmp_path / "out", progress=False)
    samples = {s.instruction: s for s in read_samples(shard_urls(tmp_path / "out"))}
    assert manifest["num_samples"] == 3 and set(samples) == {"Make it blue.", "A red square.", "recolour"}
    assert samples["A red square."].source is None and samples["A red square."].meta["text_to_image"] is True
    raw = raw_samples(tmp_path / "out")
    key = next(k for k, s in raw.items() if b"recolour" in s["json"])
    assert raw[key]["src.png"] == (ultra / "ultraedit/change_color/input/00002000.png").read_bytes()
    assert hq.exists()
    (tmp_path / "bad.txt").write_text("data/gpt-edit/hqedit/edit,training_json/missing.json,false\n")
    with pytest.raises(DataError, match=r"bad\.txt:1: json file training_json/missing\.json not found"):
        convert("llava-edit", [tmp_path / "bad.txt"], tmp_path / "out2", progress=False)


@pytest.mark.parametrize("extracted", [False, True])
def test_sharegpt4o_from_its_tar_parts(tmp_path, extracted):
    images = sharegpt4o_release(tmp_path / "ShareGPT-4o-Image", extracted=extracted)
    manifest = convert("sharegpt4o", [tmp_path / "ShareGPT-4o-Image"], tmp_path / "out", samples_per_shard=2,
                       progress=False, memory_budget=1)
    assert manifest["num_samples"] == 6 and manifest["num_rejected"] == 0
    raw = raw_samples(tmp_path / "out")
    by_prompt = {json.loads(s["json"])["instruction"]: s for s in raw.values()}
    t2i = json.loads(by_prompt["a picture of thing 0"]["json"])
    assert t2i["text_to_image"] is True and t2i["task"] == "text_to_image"
    assert "src.png" not in by_prompt["a picture of thing 0"]
    assert by_prompt["a picture of thing 0"]["tgt.png"] == images["image/0.png"]
    several = by_prompt["edit 1"]  # two input images: the first is the source, the next a reference
    assert several["src.png"] == images["image/v2v_1_in.png"] and several["ref0.png"] == images["image/v2v_1_in2.png"]
    assert several["tgt.png"] == images["image/v2v_1.png"]  # input in tar part 1, output in part 2
    assert json.loads(by_prompt["edit 2"]["json"])["text_to_image"] is True  # no input image: flagged
    assert verify(tmp_path / "out", progress=False) == []


def test_images_nowhere_to_be_found_fail_loudly(tmp_path):
    """The json without its images (tars not downloaded): exit 1 naming the cause; verify refuses the result."""
    sharegpt4o_release(tmp_path / "ShareGPT-4o-Image")
    for tar in (tmp_path / "ShareGPT-4o-Image").glob("*.tar"):
        tar.unlink()
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "editflow.cli", "data", "convert", "--format", "sharegpt4o",
                             str(tmp_path / "ShareGPT-4o-Image"), "--out", str(out), "--workers", "1",
                             "--max-instruction-tokens", "0"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "0 samples written: all 6 records were rejected (6 missing_file)" in result.stderr
    assert "still inside the downloaded archives" in result.stderr and "Traceback" not in result.stderr
    assert "text_and_image_to_image.json:1: target image not found: " in result.stderr
    assert "image/v2v_0.png" in result.stderr
    check = subprocess.run([sys.executable, "-m", "editflow.cli", "data", "verify", str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 1 and "0 samples" in check.stderr
