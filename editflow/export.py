"""`editflow export RUN_OR_CHECKPOINT --out DIR`: a diffusers-loadable model directory.

    DIR/model_index.json      FluxKontextPipeline layout (text encoders left empty: editflow conditions
    DIR/transformer/          with Qwen2.5-VL through the connector and passes prompt_embeds directly)
    DIR/vae/  DIR/scheduler/
    DIR/connector/            connector weights (safetensors) + its sizes
    DIR/pytorch_lora_weights.safetensors           a LoRA run: diffusers LoRA + adapter metadata
    DIR/pytorch_lora_weights_comfyui.safetensors   the same under FLUX's original (kohya/ComfyUI) names
    DIR/editflow.json         the training config (conditioner: which Qwen, which layer, ...) and provenance
    DIR/README.md             model card

`FluxKontextPipeline.from_pretrained(DIR, text_encoder=None, tokenizer=None, text_encoder_2=None,
tokenizer_2=None)` loads it; `EditPipeline.from_pretrained(DIR)` loads it with the
conditioner, and `EditPipeline.to_diffusers()` hands the same modules to diffusers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from editflow.errors import EditflowError
from editflow.models.build import relocate_asset
from editflow.model_paths import EXPORT_FILE, LORA_FILE, resolve_checkpoint

COMFYUI_LORA_FILE = "pytorch_lora_weights_comfyui.safetensors"  # kohya/FLUX-original keys


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before anything loads, an output that would destroy files or cannot be written: a non-empty
    directory is replaced only when it is an earlier export and `overwrite` is given."""
    if out.exists() and not out.is_dir():
        raise EditflowError(f"--out {out} is a file; give a directory for the export")
    if out.is_dir() and any(out.iterdir()):
        if not (out / EXPORT_FILE).exists():
            raise EditflowError(f"--out {out} is a non-empty directory that is not an editflow export; nothing "
                                "was written: give a new or empty directory")
        if not overwrite:
            raise EditflowError(f"--out {out} already holds an export; pass --overwrite to replace it, or give "
                                "another directory")
    parent = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise EditflowError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def export(source: str | Path, out: str | Path, merge_lora: bool = False, overwrite: bool = False) -> Path:
    """Write the export of a run or checkpoint into `out` (built in `out.tmp`, then renamed into place; an
    earlier export there is replaced only with `overwrite`)."""
    from editflow.pipeline import EditPipeline

    out = Path(out)
    check_destination(out, overwrite)
    if (Path(source) / EXPORT_FILE).exists():
        raise EditflowError(f"{source} is already an export; `editflow export` takes a run directory or a "
                            "checkpoint (`editflow edit --model` and `EditPipeline.from_pretrained` load exports)")
    checkpoint = resolve_checkpoint(source)
    pipe = EditPipeline.from_pretrained(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # an interrupted export's leftovers
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        _write_export(pipe, checkpoint, tmp, merge_lora)
    except OSError as err:  # a full disk, a quota: the partial export goes, `out` was not touched
        shutil.rmtree(tmp, ignore_errors=True)
        raise EditflowError(f"could not write the export ({err}); {out} was left as it was") from err
    except BaseException:  # any other failure (or Ctrl-C) leaves no half-written export behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # the earlier export stays whole until the new one is in place
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def _base_loads_as_pipeline(pretrained: str | None) -> bool:
    """Whether a LoRA export can name its base instead of holding it: a hub id, or a local folder diffusers
    loads as a pipeline (model_index.json). A random base, or a folder with only the transformer (the shipped
    tiny base), is written into the export."""
    if not pretrained:
        return False
    local = Path(relocate_asset(str(pretrained)))
    return not local.exists() or (local / "model_index.json").is_file()


def _write_export(pipe, checkpoint: Path, tmp: Path, merge_lora: bool) -> None:
    config = pipe.config
    transformer = pipe.editor.transformer
    kind = "lora" if config.model.trainable == "lora" else "full"
    if kind == "lora" and merge_lora:
        transformer.fuse_lora()
        transformer.unload_lora()
        config.model.trainable = "full"  # the merged weights load as a plain transformer
        kind = "full"
    if kind == "lora":
        _write_lora(transformer, tmp)
        transformer.unload_lora()  # the base weights from here on
    if kind == "full" or not _base_loads_as_pipeline(config.model.transformer.pretrained):
        # FluxKontextPipeline layout; for a LoRA this is the base (only when it was not loaded from a path)
        pipe.to_diffusers().save_pretrained(tmp, safe_serialization=True)
    else:
        pipe.codec.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        pipe.scheduler.save_pretrained(tmp / "scheduler")
    connector = pipe.editor.connector
    (tmp / "connector").mkdir()
    save_file({k: v.contiguous() for k, v in connector.state_dict().items()}, tmp / "connector" / "model.safetensors")
    (tmp / "connector" / "config.json").write_text(json.dumps(connector.sizes, indent=1))
    (tmp / EXPORT_FILE).write_text(json.dumps({
        "format": "editflow-export", "version": 1, "kind": kind,
        "guidance": {"sample": pipe.guidance, "train": float(config.objective.guidance)},
        "source_checkpoint": str(checkpoint.resolve()),
        "config": json.loads(json.dumps(dict(_to_container(config)))),
    }, indent=1))
    q = config.model.qwen
    base = config.model.transformer.pretrained if _base_loads_as_pipeline(config.model.transformer.pretrained) \
        else "THIS_DIR"
    usage = (LORA_USAGE if kind == "lora" else FULL_USAGE).format(base=base, guidance=pipe.guidance)
    (tmp / "README.md").write_text(MODEL_CARD.format(
        checkpoint=checkpoint, qwen=q.pretrained, layer=q.hidden_layer, kind=kind, usage=usage,
        guidance=pipe.guidance, train_guidance=config.objective.guidance, base=config.data.bucket_base))


def _write_lora(transformer, directory: Path) -> None:
    """diffusers' LoRA file (with adapter metadata, for load_lora_weights) and a ComfyUI/kohya-keyed copy.

    Each module's scale (PEFT's `scaling`: lora_alpha / r, or its alpha_pattern / rank_pattern entry) is
    folded into lora_B and the metadata says lora_alpha = r (alpha_pattern = rank_pattern): diffusers reads
    the same adapter, and so do readers that take a `transformer.*.lora_A/B` file without its metadata
    (ComfyUI's loader scales such a file by 1, not alpha / r)."""
    from diffusers import FluxKontextPipeline
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from editflow.lora_formats import diffusers_to_comfyui

    scales = {name: float(module.scaling["default"]) for name, module in transformer.named_modules()
              if isinstance(module, LoraLayer) and "default" in module.scaling}
    layers = {}
    for key, value in get_peft_model_state_dict(transformer).items():
        value = value.detach().cpu()
        if key.endswith(".lora_B.weight"):
            value = value * scales[key[: -len(".lora_B.weight")]]
        layers[key] = value.contiguous()
    lora_config = transformer.peft_config["default"]
    metadata = lora_config.to_dict()
    metadata.update(lora_alpha=lora_config.r, alpha_pattern=dict(lora_config.rank_pattern or {}), use_rslora=False)
    FluxKontextPipeline.save_lora_weights(directory, transformer_lora_layers=layers, weight_name=LORA_FILE,
                                          transformer_lora_adapter_metadata=metadata)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features if transformer.single_transformer_blocks \
        else 4 * inner
    comfy = diffusers_to_comfyui({f"transformer.{k}": v for k, v in layers.items()}, None, inner, mlp)
    save_file(comfy, directory / COMFYUI_LORA_FILE, metadata={
        "format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(lora_config.r),
        "ss_network_alpha": str(lora_config.r), "ss_base_model_version": "flux1",
        "editflow_note": "each module's alpha/rank folded into lora_up; alpha = rank"})


def _to_container(config):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: image-to-image
tags: [flux, kontext, image-editing, editflow]
---
# editflow export ({kind})

An instruction-based image editor: a FLUX.1-Kontext transformer fine-tuned with editflow, conditioned
on Qwen2.5-VL hidden states (the model sees the source image and the instruction) through a trained
connector instead of T5/CLIP.

- trained checkpoint: `{checkpoint}`
- conditioner: Qwen2.5-VL `{qwen}`, hidden layer {layer}, template prefix dropped, padding masked
- distilled guidance: sample with guidance_scale={guidance} (fed {train_guidance} while training); aspect buckets
  around {base}^2

```python
from editflow.pipeline import EditPipeline
pipe = EditPipeline.from_pretrained("THIS_DIR")
image = pipe(source, "make the sky purple", num_inference_steps=28)[0]
prompt_embeds, pooled, _ = pipe.encode([source], ["make the sky purple"])  # editflow's conditioning
```
{usage}"""

FULL_USAGE = """
In diffusers (the text encoders stay empty: pass editflow's embeddings):

```python
from diffusers import FluxKontextPipeline
kontext = FluxKontextPipeline.from_pretrained("THIS_DIR", text_encoder=None, tokenizer=None,
                                              text_encoder_2=None, tokenizer_2=None)
image = kontext(image=source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                guidance_scale={guidance}).images[0]  # this model's sampling guidance, not the pipeline's default
```
"""

LORA_USAGE = """
`pytorch_lora_weights.safetensors` is a diffusers LoRA (with adapter metadata) on `{base}`;
`pytorch_lora_weights_comfyui.safetensors` holds the same adapter under the original FLUX module names
(kohya-style keys, fused q/k/v) for ComfyUI and other tools; in diffusers load the first (diffusers' kohya
converter leaves out the final layer and the embedders).

```python
from diffusers import FluxKontextPipeline
kontext = FluxKontextPipeline.from_pretrained("{base}", text_encoder=None, tokenizer=None,
                                              text_encoder_2=None, tokenizer_2=None)
kontext.load_lora_weights("THIS_DIR")
image = kontext(image=source, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled,
                guidance_scale={guidance}).images[0]  # this model's sampling guidance, not the pipeline's default
```
"""
