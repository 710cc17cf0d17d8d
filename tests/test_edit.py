import io
import json

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


def test_bad_inputs_fail_before_sampling_with_a_clear_message(quick_model, source, tmp_path, capsys):
    out = tmp_path / "o.png"
    message = error_of(quick_model, capsys, "--image", tmp_path / "missing.png", "--instruction", "x", "--out", out)
    assert "source image not found" in message and "missing.png" in message
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
