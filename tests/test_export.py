import json
import logging

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline

from editflow import quiet
from editflow.data.toy import make_edit
from editflow.commands.edit import main as edit_main
from editflow.export import export
from editflow.pipeline import EditPipeline


def test_export_loads_in_editflow_and_diffusers_with_identical_images(quick_model, tmp_path):
    out = export(quick_model / "run", tmp_path / "export")
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads((out / "editflow.json").read_text())["kind"] == "full"
    assert "editflow" in (out / "README.md").read_text()
    edit = make_edit(2, seed=9)
    run = lambda pipe: pipe(edit.source, edit.instruction, num_inference_steps=3, guidance_scale=2.0,
                            generator=torch.Generator().manual_seed(5), output_type="np")
    from_run = EditPipeline.from_pretrained(quick_model / "run")
    from_export = EditPipeline.from_pretrained(out)
    ours = run(from_export)
    np.testing.assert_array_equal(run(from_run), ours)

    prompt_embeds, pooled, _ = from_export.encode([edit.source], [edit.instruction])
    diffusers_pipe = FluxKontextPipeline.from_pretrained(  # the layout diffusers itself loads
        out, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    theirs = diffusers_pipe(
        image=edit.source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, height=64, width=64,
        max_area=64 * 64, _auto_resize=False, num_inference_steps=3, guidance_scale=2.0,
        generator=torch.Generator().manual_seed(5), output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    # to_diffusers() hands over the same modules
    assert from_export.to_diffusers().transformer is from_export.editor.transformer


def test_export_is_quiet_about_the_text_encoders_it_leaves_out(quick_model, tmp_path):
    quiet.install()  # as the CLI does
    notices = []
    handler = logging.Handler()
    handler.emit = notices.append  # sees what passes the logger's filters, as the terminal would
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        export(quick_model / "run", tmp_path / "export")
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in notices if "cannot be saved" in r.getMessage()]


def test_edit_cli_accepts_an_export(quick_model, tmp_path):
    out = export(quick_model / "run", tmp_path / "export")
    source = tmp_path / "src.png"
    make_edit(0).source.save(source)
    edit_main(["--model", str(out), "--image", str(source), "--instruction", "Remove the circle.", "--out",
               str(tmp_path / "o.png"), "--steps", "2"])
    assert (tmp_path / "o.png").exists()


def test_export_never_destroys_what_is_in_its_way(quick_model, tmp_path, monkeypatch):
    import errno

    from editflow.errors import EditflowError

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(EditflowError, match="non-empty directory that is not an editflow export"):
        export(quick_model / "run", taken)
    assert (taken / "notes.txt").read_text() == "mine"
    out = export(quick_model / "run", tmp_path / "export")
    with pytest.raises(EditflowError, match="already holds an export; pass --overwrite"):
        export(quick_model / "run", out)
    with pytest.raises(EditflowError, match="is already an export"):
        export(out, tmp_path / "again")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("editflow.export.save_file", full)
    with pytest.raises(EditflowError, match="No space left on device.*was left as it was"):
        export(quick_model / "run", out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and not (tmp_path / "export.tmp").exists()
    monkeypatch.undo()
    assert export(quick_model / "run", out, overwrite=True) == out and not (tmp_path / "export.old").exists()
