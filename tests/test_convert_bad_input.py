"""Messy input to convert and verify (issue 13): a clear reject or error naming file, record and field; unique keys;
workers that die with their parent."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import webdataset as wds
from release_fixtures import png

from editflow.data.convert import convert, verify
from editflow.data.errors import DataError
from editflow.data.shards import shard_urls


def images(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(png(i))
    return folder


def lines(path, *records, raw: bytes = b""):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records) + raw)
    return path


def rejects(out) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def keys(out) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(shard_urls(out), shardshuffle=False, empty_check=False)]


def test_a_byte_that_is_not_utf8_rejects_one_record_naming_file_line_and_field(tmp_path):
    images(tmp_path, "a.png", "b.png")
    meta = lines(tmp_path / "m.jsonl", {"source": "a.png", "target": "b.png", "instruction": "one"},
                 b'{"source": "a.png", "target": "b.png", "instruction": "caf\xe9"}\n',
                 {"source": "a.png", "target": "b.png", "instruction": "three"}, raw=b"\xff\xfe garbage\n")
    manifest = convert("jsonl", [meta], tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 2
    bad = rejects(tmp_path / "out")
    assert [(r["location"], r["reason"]) for r in bad] == [(f"{meta}:2", "not_utf8"), (f"{meta}:4", "not_utf8")]
    assert "field 'instruction'" in bad[0]["detail"] and "0xe9" in bad[0]["detail"]
    # the same inside a JSON list (one numbering convention: the record's number from 1)
    (tmp_path / "list.json").write_bytes(b'[{"source": "a.png", "target": "b.png", "instruction": "ok"},\n'
                                         b' {"source": "a.png", "target": "b\xff.png", "instruction": "x"}]')
    convert("jsonl", [tmp_path / "list.json"], tmp_path / "out2", progress=False)
    [bad] = rejects(tmp_path / "out2")
    assert bad["location"] == f"{tmp_path / 'list.json'}:2" and "field 'target'" in bad["detail"]


def test_colliding_ids_get_unique_keys_and_exact_duplicates_are_rejected(tmp_path):
    images(tmp_path, "a.png", "b.png", "c.png")
    rec = lambda i, t="b.png", text="x": {"id": i, "source": "a.png", "target": t, "instruction": text}  # noqa: E731
    first = lines(tmp_path / "one.jsonl", rec("v1.0"), rec("v1_0"), rec("编辑一"), rec("编辑二"), rec("same"),
                  rec(7), rec("twice", text="first variant"))
    second = lines(tmp_path / "two.jsonl", rec("same"), rec("twice", "c.png", "second variant"))
    manifest = convert("jsonl", [first, second], tmp_path / "out", samples_per_shard=3, progress=False)
    written = keys(tmp_path / "out")
    assert len(written) == len(set(written)) == manifest["num_samples"] == 8
    assert "v1_0" in written and "7" in written and "twice" in written
    [dup] = rejects(tmp_path / "out")
    assert dup["reason"] == "duplicate_record" and dup["location"] == f"{second}:1" and f"{first}:5" in dup["detail"]
    assert manifest["ids_reused"] == 1
    assert verify(tmp_path / "out", progress=False) == []  # no false count mismatch


def test_verify_names_stray_shards_and_refuses_an_empty_manifest(tmp_path):
    images(tmp_path, "a.png", "b.png")
    meta = lines(tmp_path / "m.jsonl", {"source": "a.png", "target": "b.png", "instruction": "x"})
    convert("jsonl", [meta], tmp_path / "out", progress=False)
    (tmp_path / "out" / "shard-000007.tar").write_bytes((tmp_path / "out" / "shard-000000.tar").read_bytes())
    [problem] = verify(tmp_path / "out", progress=False)
    assert problem.startswith("shard-000007.tar: a shard file not listed in manifest.json")
    # a conversion whose every record was rejected: convert fails, verify and readers refuse the result
    lines(tmp_path / "none.jsonl", {"source": "a.png", "target": "gone.png", "instruction": "x"})
    with pytest.raises(DataError, match="0 samples written: all 1 records were rejected"):
        convert("jsonl", [tmp_path / "none.jsonl"], tmp_path / "empty", progress=False)
    assert any("lists 0 samples" in p for p in verify(tmp_path / "empty", progress=False))
    with pytest.raises(ValueError, match="lists 0 samples"):
        shard_urls(tmp_path / "empty")


@pytest.mark.parametrize("content, message", [
    (b"id,source,target\n1,a.png,b.png\n", r"is not JSON metadata: it starts with b'id,source"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not JSON metadata"),
    (b'{\n  "source": "a.png",\n  "target": "b.png"\n}\n', "holds a pretty-printed JSON object, not records"),
    (b'[{"source": "a.png", "target": "b.png", "instruction": "x"},\n {"source": "a.png"',
     "ends inside record 2 of the JSON list: it is truncated"),
    ('[{"x": 1}]'.encode("utf-16"), "is UTF-16-encoded; metadata must be UTF-8"),
])
def test_metadata_files_that_cannot_be_read_fail_before_any_image(tmp_path, content, message):
    images(tmp_path, "a.png", "b.png")
    (tmp_path / "m.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        convert("jsonl", [tmp_path / "m.jsonl"], tmp_path / "out", progress=False)
    assert str(tmp_path / "m.jsonl") in str(err.value)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_suffix_bom_and_layout_do_not_matter(tmp_path):
    images(tmp_path, "a.png", "b.png")
    record = {"source": "a.png", "target": "b.png", "instruction": "x"}
    (tmp_path / "list.jsonl").write_text(json.dumps([record, record | {"instruction": "y"}]))  # a list named .jsonl
    (tmp_path / "lines.json").write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(record | {"instruction": t}).encode()
                                                                     for t in "zw"))  # JSON lines with a BOM
    manifest = convert("jsonl", [tmp_path / "list.jsonl", tmp_path / "lines.json"], tmp_path / "out", progress=False)
    assert manifest["num_samples"] == 4 and manifest["num_rejected"] == 0


def test_messy_image_references_are_rejected_naming_the_file(tmp_path):
    pics = images(tmp_path / "pics", "a.png", "b.png")
    (pics / "link.png").symlink_to(pics / "b.png")
    (pics / "dangling.png").symlink_to(pics / "nowhere.png")
    (pics / "folder.png").mkdir()
    (pics / "empty.png").write_bytes(b"")
    (pics / "text.png").write_text("not an image")
    (pics / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 1234\n")
    (pics / "page.png").write_text("<!DOCTYPE html><html><body>Too many requests</body></html>")
    records = [("link.png", "ok"), (str(pics / "b.png"), "absolute path"), ("dangling.png", "link to"),
               ("folder.png", "is a folder"), ("empty.png", "empty (0 bytes)"), ("text.png", "not an image file PIL can read (12 bytes, starting b'not an image')"),
               ("lfs.png", "Git LFS pointer, not the image: fetch the LFS objects"), ("page.png", "an HTML page"),
               ("missing.png", "not found")]
    meta = lines(tmp_path / "m.jsonl", *[{"source": "a.png", "target": t, "instruction": i} for t, i in records],
                 {"source": "a.png", "target": ["b.png", "a.png"], "instruction": "two targets"},
                 {"source": "a.png", "target": "b.png", "instruction": ["a", "list"]},
                 {"source": "a.png", "target": {"path": "b.png"}, "instruction": "dict"},
                 {"source": "a.png", "instruction": "no target"}, ["a", "list"])
    manifest = convert("jsonl", [meta], tmp_path / "out", image_root=pics, progress=False)
    assert manifest["num_samples"] == 2
    got = {r["location"].rsplit(":", 1)[1]: r for r in rejects(tmp_path / "out")}
    for number, (target, words) in enumerate(records[2:], start=3):
        assert words in got[str(number)]["detail"] and target in got[str(number)]["detail"], got[str(number)]
        assert got[str(number)]["images"][1].endswith(target)
    assert got["10"]["reason"] == "bad_field"  # two targets: the user's jsonl takes one
    assert got["11"]["reason"] == "bad_field" and "field 'instruction' is a JSON list" in got["11"]["detail"]
    assert got["12"]["reason"] == "bad_field" and "field 'target'" in got["12"]["detail"]
    assert got["13"]["reason"] == "missing_field" and "'target'" in got["13"]["detail"]
    assert got["14"]["reason"] == "bad_json" and "record is a JSON list" in got["14"]["detail"]


def test_inputs_with_nothing_to_convert_are_named(tmp_path):
    images(tmp_path / "pics", "a.png")
    with pytest.raises(DataError, match=r"no GPT-IMAGE-EDIT-1.5M metadata .* found no .json/.jsonl files, 1 images "
                                        r"outside input/output/images folders, 0 archives"):
        convert("gpt-image-edit", [tmp_path / "pics" / ".."], tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="input not found: .*nope"):
        convert("jsonl", [tmp_path / "nope.jsonl"], tmp_path / "out", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="--out .* is a file"):
        convert("jsonl", [tmp_path / "file"], tmp_path / "file", progress=False)


def test_kill_9_of_convert_leaves_no_worker_behind(tmp_path):
    """A worker blocked reading one image (a FIFO) and one idle on the job pipe: both must exit with the parent."""
    pics = images(tmp_path / "pics", "a.png", "b.png")
    os.mkfifo(pics / "blocked.png")
    meta = lines(tmp_path / "m.jsonl", *[{"source": "a.png", "target": t, "instruction": "x"}
                                         for t in ("blocked.png", "b.png", "b.png", "b.png")])
    main = subprocess.Popen([sys.executable, "-m", "editflow.cli", "data", "convert", "--format", "jsonl", str(meta),
                             "--out", str(tmp_path / "out"), "--image-root", str(pics), "--workers", "2",
                             "--samples-per-shard", "1", "--max-instruction-tokens", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.2)
            workers = psutil.Process(main.pid).children(recursive=True)
        assert len(workers) >= 2, "the conversion never started its workers"
        time.sleep(1.0)  # the other shards done: one worker idle on the pipe, one blocked on the FIFO
        main.send_signal(signal.SIGKILL)
        main.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()


def data_convert(capsys, *args) -> tuple[int, str, str]:
    """`editflow data convert ARGS` in this process, tokens not counted: (exit code, stdout, stderr)."""
    from editflow.commands.data import main

    code = 0
    try:
        main(["convert", "--format", "jsonl", "--workers", "1", "--max-instruction-tokens", "0", *map(str, args)])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("option, value, named", [
    ("--workers", "0", "--workers must be at least 1, got 0"),
    ("--workers", "-1", "--workers must be at least 1, got -1"),
    ("--min-side", "-5", "--min-side must be at least 0 (pixels), got -5"),
    ("--max-aspect-change", "-1", "--max-aspect-change must be at least 0 (0: the same shape), got -1.0"),
])
def test_convert_options_that_cannot_work_are_usage_errors(tmp_path, capsys, option, value, named):
    images(tmp_path, "a.png", "b.png")
    meta = lines(tmp_path / "m.jsonl", {"source": "a.png", "target": "b.png", "instruction": "x"})
    code, _, err = data_convert(capsys, meta, "--out", tmp_path / "out", option, value)
    assert code == 2 and f"editflow data convert: error: {named}" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_an_explicit_source_key_missing_from_a_record_is_a_reject_naming_it(tmp_path, capsys):
    images(tmp_path, "a.png", "b.png")
    meta = lines(tmp_path / "m.jsonl", {"source": "a.png", "target": "b.png", "instruction": "one"},
                 {"source": "a.png", "target": "b.png", "instruction": "two"})
    code, _, err = data_convert(capsys, meta, "--out", tmp_path / "out", "--source-key", "before")
    assert code == 1 and "all 2 records were rejected (2 missing_field)" in err
    assert f"{meta}:1: no field 'before' (--source-key); the record has 'source', 'target', 'instruction'" in err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_samples"] == 0  # no sample stored
    # one record without the named key: rejected; the others are kept as edits
    mixed = lines(tmp_path / "mixed.jsonl", {"before": "a.png", "target": "b.png", "instruction": "one"},
                  {"target": "b.png", "instruction": "two"})
    code, out, _ = data_convert(capsys, mixed, "--out", tmp_path / "mixed", "--source-key", "before")
    assert code == 0 and "text-to-image (no source image): 0 of the 1 samples" in out
    [bad] = rejects(tmp_path / "mixed")
    assert bad["location"] == f"{mixed}:2" and bad["reason"] == "missing_field" and "'before'" in bad["detail"]


def test_without_source_key_a_record_without_source_is_text_to_image_and_counted(tmp_path, capsys):
    images(tmp_path, "a.png", "b.png")
    meta = lines(tmp_path / "m.jsonl", {"source": "a.png", "target": "b.png", "instruction": "an edit"},
                 {"target": "b.png", "instruction": "a picture"}, {"source": "", "target": "a.png", "instruction": "x"})
    code, out, _ = data_convert(capsys, meta, "--out", tmp_path / "out")
    assert code == 0 and "text-to-image (no source image): 2 of the 3 samples" in out
    assert "0 records rejected" in out and json.loads((tmp_path / "out" / "manifest.json").read_text())[
        "text_to_image"] == 2
