import json

import numpy as np
import pytest
import torch
from PIL import Image

from editflow.data.toy import make_edit
from editflow.edit import main as edit_main
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
