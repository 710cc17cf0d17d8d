"""`editflow export RUN_OR_CHECKPOINT --out DIR`: a diffusers-loadable model directory.

    DIR/model_index.json      FluxKontextPipeline layout (text encoders left empty: editflow conditions
    DIR/transformer/          with Qwen2.5-VL through the connector and passes prompt_embeds directly)
    DIR/vae/  DIR/scheduler/
    DIR/connector/            connector weights (safetensors) + its sizes
    DIR/editflow.json         the training config (conditioner: which Qwen, which layer, ...) and provenance
    DIR/README.md             model card

`FluxKontextPipeline.from_pretrained(DIR, text_encoder=None, tokenizer=None, text_encoder_2=None,
tokenizer_2=None)` loads it; `EditPipeline.from_pretrained(DIR)` loads it with the
conditioner, and `EditPipeline.to_diffusers()` hands the same modules to diffusers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

EXPORT_FILE = "editflow.json"


def export(source: str | Path, out: str | Path) -> Path:
    from diffusers import FluxKontextPipeline

    from editflow.pipeline import EditPipeline, resolve_checkpoint

    checkpoint = resolve_checkpoint(source)
    pipe = EditPipeline.from_pretrained(checkpoint)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    diffusers_pipe = pipe.to_diffusers()
    diffusers_pipe.save_pretrained(tmp, safe_serialization=True)
    connector = pipe.editor.connector
    (tmp / "connector").mkdir()
    save_file({k: v.contiguous() for k, v in connector.state_dict().items()}, tmp / "connector" / "model.safetensors")
    (tmp / "connector" / "config.json").write_text(json.dumps(connector.sizes, indent=1))
    config = pipe.config
    (tmp / EXPORT_FILE).write_text(json.dumps({
        "format": "editflow-export", "version": 1, "kind": "full",
        "source_checkpoint": str(checkpoint.resolve()),
        "config": json.loads(json.dumps(dict(_to_container(config)))),
    }, indent=1))
    q = config.model.qwen
    (tmp / "README.md").write_text(MODEL_CARD.format(
        checkpoint=checkpoint, qwen=q.pretrained, layer=q.get("hidden_layer", -1),
        guidance=config.eval.get("guidance", config.objective.guidance), base=config.data.get("bucket_base", 1024)))
    assert isinstance(diffusers_pipe, FluxKontextPipeline)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _to_container(config):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: image-to-image
tags: [flux, kontext, image-editing, editflow]
---
# editflow export

An instruction-based image editor: a FLUX.1-Kontext transformer fine-tuned with editflow, conditioned
on Qwen2.5-VL hidden states (the model sees the source image and the instruction) through a trained
connector instead of T5/CLIP.

- trained checkpoint: `{checkpoint}`
- conditioner: Qwen2.5-VL `{qwen}`, hidden layer {layer}, template prefix dropped, padding masked
- distilled guidance used in training/eval: {guidance}; aspect buckets around {base}^2

```python
from editflow.pipeline import EditPipeline
pipe = EditPipeline.from_pretrained("THIS_DIR")
image = pipe(source, "make the sky purple", num_inference_steps=28)[0]
# or in diffusers, with editflow's conditioning:
from diffusers import FluxKontextPipeline
kontext = FluxKontextPipeline.from_pretrained("THIS_DIR", text_encoder=None, tokenizer=None,
                                              text_encoder_2=None, tokenizer_2=None)
prompt_embeds, pooled, _ = pipe.encode([source], ["make the sky purple"])
image = kontext(image=source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled).images[0]
```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="editflow export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run directory (newest checkpoint) or a checkpoint directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        out = export(args.source, args.out)
    except FileNotFoundError as err:
        print(f"editflow export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args.source} -> {out}")


if __name__ == "__main__":
    main()
