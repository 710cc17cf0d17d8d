import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from editflow.data.toy import make_edit
from editflow.commands.edit import main as edit_main
from editflow.models.packing import image_ids


@pytest.fixture()
def source(tmp_path):
    path = tmp_path / "src.png"
    make_edit(4, seed=31).source.save(path)
    return path


def edit(model, *args):
    edit_main(["--model", str(model / "run"), "--steps", "2", *map(str, args)])


def error_of(model, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        edit(model, *args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_variants_are_named_seeded_and_different(quick_model, source, tmp_path):
    edit(quick_model, "--image", source, "--instruction", "Make the background navy.", "--out",
         tmp_path / "a" / "out.png", "--num-images", "3", "--seed", "7")
    outputs = [tmp_path / "a" / f"out-{i}.png" for i in (1, 2, 3)]
    assert all(p.exists() for p in outputs) and not (tmp_path / "a" / "out.png").exists()
    pixels = [np.asarray(Image.open(p)) for p in outputs]
    assert not np.array_equal(pixels[0], pixels[1])  # variants differ
    edit(quick_model, "--image", source, "--instruction", "Make the background navy.", "--out",
         tmp_path / "b" / "out.png", "--num-images", "3", "--seed", "7")
    assert all(np.array_equal(p, np.asarray(Image.open(tmp_path / "b" / f"out-{i}.png")))
               for i, p in zip((1, 2, 3), pixels))  # same seed, same images


@pytest.mark.parametrize("size,expected", [("48x32", (48, 32)), ("auto", (64, 64))])
def test_sizes(quick_model, source, tmp_path, size, expected):
    out = tmp_path / "out.jpg"
    edit(quick_model, "--image", source, "--instruction", "Remove the circle.", "--out", out, "--size", size,
         "--quality", "80")
    image = Image.open(out)
    assert image.format == "JPEG" and image.size == expected


def test_auto_size_follows_the_source_aspect(quick_model, tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (96, 64), (10, 200, 30)).save(wide)
    edit(quick_model, "--image", wide, "--instruction", "Add a red circle.", "--out", tmp_path / "o.webp")
    assert Image.open(tmp_path / "o.webp").size == (96, 64)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_mask_keeps_every_pixel_outside_it(quick_model, source, tmp_path, with_alpha):
    editable = np.zeros((64, 64), dtype=bool)
    editable[8:40, 20:60] = True
    if with_alpha:  # transparent = editable
        rgba = np.zeros((64, 64, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(editable, 0, 255)
        Image.fromarray(rgba, "RGBA").save(tmp_path / "mask.png")
    else:  # white = editable
        Image.fromarray(editable.astype(np.uint8) * 255, "L").save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    edit(quick_model, "--image", source, "--instruction", "Make the background navy.", "--out", out, "--mask",
         tmp_path / "mask.png")
    result, original = np.asarray(Image.open(out)), np.asarray(Image.open(source).convert("RGB"))
    assert np.array_equal(result[~editable], original[~editable])
    assert not np.array_equal(result[editable], original[editable])


def test_reference_images_get_their_own_position_index(quick_model, source, tmp_path):
    from editflow.pipeline import EditPipeline

    pipe = EditPipeline.from_pretrained(quick_model / "run")
    seen = []
    hook = pipe.editor.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["img_ids"].clone()), with_kwargs=True)
    reference = Image.new("RGB", (64, 64), "white")
    pipe(Image.open(source), "Add a circle.", num_inference_steps=1, references=[reference, reference])
    hook.remove()
    ids = seen[0]
    n = (64 // pipe.size_multiple) ** 2  # packed tokens of a 64 px image
    assert ids.shape[0] == 4 * n  # target + source + 2 references
    assert [int(ids[i * n, 0]) for i in range(4)] == [0, 1, 2, 3]
    assert torch.equal(ids[n:2 * n, 1:], ids[:n, 1:])  # same grid, distinct first coordinate
    assert torch.equal(image_ids(8, 8, 2)[:, 0], torch.full((16,), 2.0))


def test_batch_mode(quick_model, source, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(source), "instruction": "Remove the circle.", "out": str(tmp_path / "one.png")},
        {"images": [str(source)], "instruction": "Add a red square.", "out": str(tmp_path / "two.png"),
         "num_images": 2, "seed": 3},
    ]))
    edit(quick_model, "--batch", requests)
    assert (tmp_path / "one.png").exists() and (tmp_path / "two-1.png").exists() and (tmp_path / "two-2.png").exists()


def test_bad_inputs_fail_before_sampling_with_a_clear_message(quick_model, source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o.png"
    message = error_of(quick_model, capsys, "--image", tmp_path / "missing.png", "--instruction", "x", "--out", out)
    assert "source image not found" in message and "missing.png" in message
    assert "relative paths" not in message  # an absolute path needs no note
    monkeypatch.chdir(tmp_path)
    message = error_of(quick_model, capsys, "--image", "gone.png", "--instruction", "x", "--out", out)
    assert f"source image not found: gone.png (relative paths are read from the current directory, {tmp_path})" \
        in message
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "unsupported or unreadable" in error_of(quick_model, capsys, "--image", text, "--instruction", "x",
                                                   "--out", out)
    small_mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(small_mask)
    message = error_of(quick_model, capsys, "--image", source, "--instruction", "x", "--out", out,
                       "--mask", small_mask)
    assert "32x32" in message and "64x64" in message and "same size" in message
    assert "multiples of 16" in error_of(quick_model, capsys, "--image", source, "--instruction", "x", "--out", out,
                                         "--size", "50x64")
    assert "over the text encoder's limit" in error_of(quick_model, capsys, "--image", source, "--instruction",
                                                        "paint it " * 400, "--out", out)
    assert "unsupported format" in error_of(quick_model, capsys, "--image", source, "--instruction", "x",
                                            "--out", tmp_path / "o.gif")
    assert not out.exists()


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("editflow.pipeline.EditPipeline.from_pretrained", refuse)


def test_inputs_are_checked_before_the_model_loads(quick_model, source, tmp_path, capsys, no_model_load):
    out = tmp_path / "o.png"
    cut = tmp_path / "cut.png"
    cut.write_bytes(source.read_bytes()[:200])
    assert "cut.png: cannot read" in error_of(quick_model, capsys, "--image", cut, "--instruction", "x", "--out", out)
    assert "source image not found" in error_of(quick_model, capsys, "--image", tmp_path / "nope.png",
                                                "--instruction", "x", "--out", out)
    assert "over the text encoder's limit" in error_of(quick_model, capsys, "--image", source, "--instruction",
                                                        "paint it " * 400, "--out", out)
    (tmp_path / "file").write_text("")
    assert "not a writable directory" in error_of(quick_model, capsys, "--image", source, "--instruction", "x",
                                                  "--out", tmp_path / "file" / "o.png")
    (tmp_path / "dir.png").mkdir()
    assert "is a directory" in error_of(quick_model, capsys, "--image", source, "--instruction", "x",
                                        "--out", tmp_path / "dir.png")
    assert "--steps must be a positive integer" in error_of(quick_model, capsys, "--image", source,
                                                            "--instruction", "x", "--out", out, "--steps", "0")
    message = error_of(quick_model, capsys, "--image", source, "--instruction", "x", "--out", out,
                       "--size", "4096x4096")
    assert "over 4.2 MP" in message and "--allow-large" in message
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps({"image": str(source), "instruction": "x", "out": str(out)})
                                  for _ in range(2)))
    message = error_of(quick_model, capsys, "--batch", requests)
    assert message.startswith("editflow edit: error: request 2: output") and "also written by request 1" in message
    assert not out.exists()


def test_a_model_path_of_another_kind_is_named(quick_model, source, tmp_path, capsys, no_model_load):
    def model_error(model):
        with pytest.raises(SystemExit):
            edit_main(["--model", str(model), "--image", str(source), "--instruction", "x", "--out",
                       str(tmp_path / "o.png")])
        return capsys.readouterr().err

    diffusers_dir = tmp_path / "kontext"
    diffusers_dir.mkdir()
    (diffusers_dir / "model_index.json").write_text("{}")
    assert "is a diffusers pipeline, not an editflow model" in model_error(diffusers_dir)
    assert "does not exist" in model_error(tmp_path / "missing")
    weights = quick_model / "run" / "checkpoints"
    single = sorted(weights.iterdir())[-1] / "model.safetensors"
    assert "is a file" in model_error(single)
    export = tmp_path / "export"
    export.mkdir()
    (export / "editflow.json").write_text(json.dumps({"format": "editflow-export", "kind": "full", "config": {}}))
    assert "without connector/model.safetensors, transformer" in model_error(export)


def test_a_large_source_is_edited_at_the_bucket_size_with_a_note(quick_model, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (1024, 768), (20, 120, 200)).save(big)
    out = tmp_path / "o.png"
    edit(quick_model, "--image", big, "--instruction", "Add a red circle.", "--out", out)
    note = capsys.readouterr().err
    assert "big.png is 1024x768; it is edited at 96x64" in note and "--size WxH" in note
    assert Image.open(out).size == (96, 64)


MODES = {  # mode -> (image, the RGB pixel every reader must see)
    "16-bit": (Image.fromarray(np.full((64, 64), 0x8080, np.uint16)), (128, 128, 128)),
    "palette+transparency": (Image.new("P", (64, 64), 0), (255, 255, 255)),
    "CMYK": (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), (255, 0, 0)),
    "RGBA": (Image.new("RGBA", (64, 64), (255, 0, 0, 0)), (255, 255, 255)),
    "LA": (Image.new("LA", (64, 64), (0, 255)), (0, 0, 0)),
    "grey": (Image.new("L", (64, 64), 77), (77, 77, 77)),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_reads_the_same_in_edit_training_and_convert(mode, tmp_path):
    from editflow.data.convert import Validation, load_image
    from editflow.data.samples import decode_sample
    from editflow.edit import EditRequest, ModelLimits, prepare

    image, expected = MODES[mode]
    path = tmp_path / ("in.tif" if mode == "CMYK" else "in.png")
    if mode == "palette+transparency":
        image.putpalette([10, 20, 30] * 256)
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    else:
        image.save(path)
    edited = prepare(EditRequest([str(path)], "x", str(tmp_path / "o.png")), ModelLimits(64, 512)).source
    trained = decode_sample({"__key__": "k", "json": b'{"instruction": "x"}', "src.png": path.read_bytes(),
                             "tgt.png": path.read_bytes()}).source
    stored, _, _ = load_image(str(path), "source", {}, {}, Validation(min_side=1))
    converted = Image.open(io.BytesIO(stored))
    for seen in (edited, trained, converted):
        assert seen.mode == "RGB" and seen.getpixel((5, 5)) == expected, (mode, seen.mode, seen.getpixel((5, 5)))


def test_an_output_that_is_an_input_is_refused_before_the_model_loads(quick_model, source, tmp_path, capsys,
                                                                     no_model_load, monkeypatch):
    original = source.read_bytes()
    (tmp_path / "link.png").symlink_to(source)
    mask, reference = tmp_path / "mask.png", tmp_path / "ref.png"
    Image.new("L", (64, 64), 255).save(mask)
    Image.new("RGB", (64, 64), "white").save(reference)
    monkeypatch.chdir(tmp_path)
    for image, out in [(source, source), (source, tmp_path / "link.png"), (tmp_path / "link.png", source),
                       ("src.png", "a/../src.png")]:  # the same file, by symlink or relative path
        message = error_of(quick_model, capsys, "--image", image, "--instruction", "x", "--out", out)
        assert f"output {out} is the source image ({image})" in message and "overwritten" in message
    message = error_of(quick_model, capsys, "--image", source, "--image", reference, "--instruction", "x",
                       "--out", reference)
    assert f"output {reference} is the reference image 1" in message
    message = error_of(quick_model, capsys, "--image", source, "--mask", mask, "--instruction", "x", "--out", mask)
    assert f"output {mask} is the mask" in message
    requests = tmp_path / "requests.jsonl"  # request 2 would write over request 1's source
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(source), "instruction": "x", "out": str(tmp_path / "one.png")},
        {"image": str(reference), "instruction": "x", "out": "src.png"}]))
    message = error_of(quick_model, capsys, "--batch", requests)
    assert message.startswith("editflow edit: error: request 2: output src.png is the source image of request 1")
    assert source.read_bytes() == original and not (tmp_path / "one.png").exists()


BAD_FIELDS = [  # field, value, what the message must say it expects
    ("guidance", "abc", "a finite number"), ("text_guidance", "3", "a finite number"),
    ("image_guidance", float("nan"), "a finite number"), ("guidance", float("inf"), "a finite number"),
    ("seed", "7", "an integer"), ("size", 512, "a string"), ("mask", 5, "an image file path"),
    ("steps", True, "a positive integer"), ("num_images", 2.0, "a positive integer"),
    ("images", [5], "one image file path"),
]


@pytest.mark.parametrize("field,value,expected", BAD_FIELDS)
def test_every_batch_field_is_checked_before_the_model_loads(quick_model, source, tmp_path, capsys, no_model_load,
                                                             field, value, expected):
    requests = tmp_path / "requests.jsonl"  # a good request, a blank line, then the bad one on line 3
    requests.write_text(json.dumps({"image": str(source), "instruction": "x", "out": str(tmp_path / "one.png")})
                        + "\n\n" + json.dumps({"images": [str(source)], "instruction": "x",
                                               "out": str(tmp_path / "two.png"), field: value}))
    text = requests.read_text()
    message = error_of(quick_model, capsys, "--batch", requests)
    assert f'error: {requests}:3: "{field}" must be {expected}' in message, message
    assert requests.read_text() == text and not (tmp_path / "one.png").exists()


def test_a_batch_names_unknown_fields_and_flags_it_takes_defaults_from(quick_model, source, tmp_path, capsys,
                                                                      no_model_load):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"image": str(source), "instruction": "x", "out": str(tmp_path / "o.png"),
                                    "guidence": 3}))
    message = error_of(quick_model, capsys, "--batch", requests)
    assert f"{requests}:1: unknown fields ['guidence']; known:" in message and "guidance" in message
    requests.write_text(json.dumps({"image": str(source), "instruction": "x", "out": str(tmp_path / "o.png")}))
    message = error_of(quick_model, capsys, "--batch", requests, "--text-guidance", "nan")
    assert f'{requests}:1: --text-guidance (no "text_guidance" in the line) must be a finite number' in message


@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--text-guidance", "inf"),
                                        ("--image-guidance", "-inf")])
def test_non_finite_guidance_is_refused_before_the_model_loads(quick_model, source, tmp_path, capsys,
                                                               no_model_load, flag, value):
    message = error_of(quick_model, capsys, "--image", source, "--instruction", "x", "--out", tmp_path / "o.png",
                       f"{flag}={value}")
    assert f"{flag} must be a finite number" in message and f"got {float(value)!r}" in message
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc: a folder no file can be made in")
@pytest.mark.parametrize("out", ["/proc/edit.png", "/proc/new-folder/edit.png"])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(quick_model, source, capsys,
                                                                           no_model_load, out):
    message = error_of(quick_model, capsys, "--image", source, "--instruction", "x", "--out", out)
    assert f"output {out}: /proc is not a writable directory" in message


def test_a_failed_save_names_the_output_and_keeps_what_was_written(quick_model, source, tmp_path, capsys,
                                                                  monkeypatch):
    save = Image.Image.save

    def disk_full_for_two(image, fp, *args, **kwargs):
        if "two" in str(fp):  # half written, then the disk is full
            Path(fp).write_bytes(b"\x89PNG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_for_two)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps({"image": str(source), "instruction": "x", "out": str(tmp_path / name)})
                                  for name in ("one.png", "two.png")))
    message = error_of(quick_model, capsys, "--batch", requests)
    assert f"request 2: output {tmp_path / 'two.png'}: cannot write it (No space left on device)" in message
    assert (tmp_path / "one.png").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "one.png", "requests.jsonl", "src.png"]  # the first edit kept, no temporary file left
