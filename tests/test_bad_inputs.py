"""Bad inputs to the stage-2 connector source, the local model directories, EditPipeline, `data verify` and
the config: each fails with an EditflowError naming the key, argument or file, before any model loads where
it can be checked up front (no traceback, no 7B-sized default model built from a folder without config.json)."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from editflow.config import compose, validate
from editflow.errors import ConfigError
from editflow.models.build import ASSETS

TINY = ASSETS / "tiny"


def fake_checkpoint(run, state: dict) -> None:
    checkpoint = run / "checkpoints" / "step-0000002"
    checkpoint.mkdir(parents=True)
    save_file({f"connector.{k}": v for k, v in state.items()}, checkpoint / "model.safetensors")
    (checkpoint / "train_state.json").write_text("{}")
    (checkpoint / "COMPLETE").write_text("2")


def mlp_connector_state(refiner_layers: int = 0, hidden: int = 128) -> dict:
    from editflow.models.connector import Connector

    connector = Connector(64, 128, 64, kind="mlp", hidden_dim=hidden, refiner_layers=refiner_layers, refiner_heads=4)
    return {k: v.contiguous() for k, v in connector.state_dict().items()}


def projector(path, rows: int = 384) -> None:
    torch.save({"denoise_tower.denoise_projector.0.weight": torch.zeros(rows, 64),
                "denoise_tower.denoise_projector.0.bias": torch.zeros(rows),
                "denoise_tower.denoise_projector.2.weight": torch.zeros(128, rows),
                "denoise_tower.denoise_projector.2.bias": torch.zeros(128)}, path)


def init_from_case(tmp_path, case: str) -> tuple[str, list[str]]:
    """(init_from, further overrides) for one bad source."""
    if case == "missing":
        return str(tmp_path / "nowhere"), []
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), []
    if case == "run_without_checkpoint":
        (tmp_path / "run" / "checkpoints" / "step-0000002.tmp").mkdir(parents=True)
        return str(tmp_path / "run"), []
    if case == "text_file":
        (tmp_path / "notes.bin").write_text("hello")
        return str(tmp_path / "notes.bin"), []
    if case == "damaged_safetensors":
        save_file(mlp_connector_state(), tmp_path / "c.safetensors")
        data = (tmp_path / "c.safetensors").read_bytes()
        (tmp_path / "c.safetensors").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "c.safetensors"), []
    if case == "not_a_dict":
        torch.save([1, 2], tmp_path / "list.pt")
        return str(tmp_path / "list.pt"), []
    if case == "unexpected_keys":
        torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
        return str(tmp_path / "other.pt"), []
    if case == "projector_into_mlp":
        projector(tmp_path / "denoise_projector.bin")
        return str(tmp_path / "denoise_projector.bin"), []
    if case == "mlp_run_into_reference":
        fake_checkpoint(tmp_path / "run", mlp_connector_state())
        return str(tmp_path / "run"), ["model.connector.kind=reference"]
    if case == "refiner_depth":
        fake_checkpoint(tmp_path / "run", mlp_connector_state(refiner_layers=2))
        return str(tmp_path / "run"), []
    if case == "hidden_dim":
        fake_checkpoint(tmp_path / "run", mlp_connector_state(hidden=96))
        return str(tmp_path / "run"), []
    raise AssertionError(case)


INIT_FROM_MESSAGES = {
    "missing": r"model.connector.init_from=.*nowhere: no such file or directory",
    "empty_dir": r"model.connector.init_from=.*empty: not an export .*, a checkpoint .* or a run directory",
    "run_without_checkpoint": r"model.connector.init_from=.*run: not a checkpoint .*only unfinished saves",
    "text_file": r"model.connector.init_from=.*notes.bin: is neither a safetensors nor a torch file \(it starts with "
                 r"b'hello'\)",
    "damaged_safetensors": r"model.connector.init_from=.*c.safetensors: cannot read it as a safetensors file",
    "not_a_dict": r"model.connector.init_from=.*list.pt: holds a list, not a dict of tensors",
    "unexpected_keys": r"model.connector.init_from: .*other.pt holds no connector weights \(its tensors: foo.weight\)",
    "projector_into_mlp": r"GPT-Image-Edit projector .* holds a kind=reference connector and this run's "
                          r"model.connector.kind=mlp",
    "mlp_run_into_reference": r"checkpoint .* holds a kind=mlp connector and this run's model.connector.kind=reference",
    "refiner_depth": r"holds a connector with 2 refiner layers and this run's model.connector.refiner_layers=0",
    "hidden_dim": r"holds a connector of hidden_dim 96 and this run's model.connector.hidden_dim=128",
}


@pytest.mark.parametrize("case", sorted(INIT_FROM_MESSAGES))
def test_a_bad_init_from_is_refused_by_validate_naming_the_key(tmp_path, case):
    init_from, overrides = init_from_case(tmp_path, case)
    cfg = compose([f"model.connector.init_from={init_from}", *overrides])
    with pytest.raises(ConfigError, match=INIT_FROM_MESSAGES[case]):
        validate(cfg)
    validate(cfg, training=False)  # `editflow encode` needs no connector
    validate(cfg, files=False)  # `editflow slurm`: the job reads the path, on its own machine


def test_a_good_init_from_passes_and_a_wrong_width_is_a_config_error_at_load(tmp_path):
    from editflow.models.connector import Connector
    from editflow.models.connector_start import load_connector_

    fake_checkpoint(tmp_path / "run", mlp_connector_state())
    validate(compose([f"model.connector.init_from={tmp_path / 'run'}"]))
    projector(tmp_path / "p.bin", rows=30)  # the reference kind, but not this model's widths (384)
    validate(compose([f"model.connector.init_from={tmp_path / 'p.bin'}", "model.connector.kind=reference"]))
    with pytest.raises(ConfigError, match=r"model.connector.init_from: GPT-Image-Edit projector .* shapes differ"):
        load_connector_(Connector(64, 128, 64, kind="reference"), tmp_path / "p.bin")


def model_dir_case(tmp_path, key: str, case: str) -> str:
    own = {"transformer": None, "vae": TINY / "vae", "qwen": TINY / "qwen"}[key]
    if case == "missing":
        return str(tmp_path / "nowhere")
    folder = tmp_path / case / ("transformer" if key == "transformer" else "")
    folder.mkdir(parents=True)
    if case == "no_config":
        (folder / "model.safetensors").write_bytes(b"")
    elif case == "other_class":  # the VAE's folder where FLUX or Qwen is asked for, Qwen's where the VAE is
        shutil.copy((TINY / ("qwen" if key == "vae" else "vae")) / "config.json", folder / "config.json")
    elif case == "no_weights":
        shutil.copy((own or TINY / "vae") / "config.json", folder / "config.json")
        if key == "transformer":
            (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    return str(tmp_path / case)


MODEL_DIR_MESSAGES = {
    "missing": r"model.{key}.pretrained=.*nowhere.*: no such directory",
    "empty": r"model.{key}.pretrained=.*empty.*: .* has no (transformer/ folder|config.json \(it holds nothing\))",
    "no_config": r"model.{key}.pretrained=.*no_config.*: .* has no config.json \(it holds \['model.safetensors'\]\)",
    "other_class": r"model.{key}.pretrained=.*other_class.*config.json describes .*: is this the folder of another",
    "no_weights": r"model.{key}.pretrained=.*no_weights.*: .* has config.json but no weights",
}


@pytest.mark.parametrize("key", ["transformer", "vae", "qwen"])
@pytest.mark.parametrize("case", sorted(MODEL_DIR_MESSAGES))
def test_a_bad_local_model_directory_is_refused_before_loading(tmp_path, key, case):
    path = model_dir_case(tmp_path, key, case)
    cfg = compose([f"model.{key}.pretrained={path}"])
    with pytest.raises(ConfigError, match=MODEL_DIR_MESSAGES[case].format(key=key)):
        validate(cfg)


def test_build_models_refuses_another_components_folder_instead_of_failing_on_meta_tensors(tmp_path):
    from editflow.models.build import build_models

    path = model_dir_case(tmp_path, "transformer", "other_class")
    shutil.copy(TINY / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "other_class" / "transformer")
    cfg = compose([f"model.transformer.pretrained={path}"]).model
    with pytest.raises(ConfigError, match=r"model.transformer.pretrained=.*describes _class_name='AutoencoderKL'"):
        build_models(cfg)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from editflow.pipeline import EditPipeline

    return EditPipeline.from_models(tiny_models, guidance=1.0)


IMAGE = Image.new("RGB", (64, 64), "red")
PIPE_CASES = [
    ({"image": torch.zeros(3, 64, 64)}, r"image must be a PIL image or a non-empty list of them, got Tensor"),
    ({"image": "photo.png"}, r"image must be a PIL image .* got str \(a file: PIL.Image.open\(path\)"),
    ({"image": []}, r"image must be a PIL image or a non-empty list of them, got an empty list"),
    ({"image": Image.new("RGB", (0, 0))}, r"image\[0\] is 0x0: an image without pixels"),
    ({"image": Image.new("RGB", (4, 4))}, r"the image is 4x4, smaller than this model's size multiple 8"),
    ({"instruction": ""}, r"instruction is empty: say what to change"),
    ({"instruction": "   "}, r"instruction is empty"),
    ({"instruction": None}, r"instruction must be a string or a list of strings, got NoneType"),
    ({"instruction": b"make it blue"}, r"instruction must be a string or a list of strings, got bytes"),
    ({"instruction": [1]}, r"instruction\[0\] must be a string, got int 1"),
    ({"image": [IMAGE] * 3, "instruction": ["a", "b"]}, r"got 3 images for 2 instructions"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be a positive integer, got 0"),
    ({"num_images_per_prompt": 0}, r"num_images_per_prompt must be a positive integer, got 0"),
    ({"height": 20}, r"height must be a positive multiple of 8, got 20"),
    ({"mask": Image.new("L", (32, 32))}, r"mask is 32x32; it must be the image's size \(64x64\) or the output's"),
    ({"references": [torch.zeros(3, 64, 64)]}, r"references\[0\] must be a PIL image, got Tensor"),
    ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number, got nan"),
    ({"text_guidance_scale": float("inf")}, r"text_guidance_scale must be a finite number, got inf"),
    ({"image_guidance_scale": "2"}, r"image_guidance_scale must be a finite number, got '2'"),
]


@pytest.mark.parametrize("kwargs,message", PIPE_CASES)
def test_edit_pipeline_names_a_bad_argument(pipe, kwargs, message):
    from editflow.errors import EditflowError

    args = {"image": IMAGE, "instruction": "make it blue", "num_inference_steps": 1, **kwargs}
    with pytest.raises(EditflowError, match=message) as caught:
        pipe(args.pop("image"), args.pop("instruction"), **args)
    assert isinstance(caught.value, ValueError)  # what a Python caller catches


def test_edit_pipeline_still_edits_any_image_mode(pipe):
    for image in (IMAGE.convert("CMYK"), Image.new("I;16", (64, 64)), IMAGE.convert("P")):
        [out] = pipe(image, "make it blue", num_inference_steps=1, mask=Image.new("L", (64, 64), 255))
        assert out.size == (64, 64)


@pytest.fixture()
def shards(tmp_path):
    from editflow.data.toy_shards import write_toy_shards

    return write_toy_shards(tmp_path / "shards", 4, seed=0, samples_per_shard=4)


def test_verify_names_a_damaged_manifest_a_truncated_shard_and_a_missing_directory(shards, tmp_path):
    from editflow.data.convert import verify

    assert verify(shards, progress=False) == []
    (shards / "stray-notes.txt").write_text("loaders read only the shards the manifest lists")
    assert verify(shards, progress=False) == []
    [shard] = shards.glob("*.tar")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert verify(shards, progress=False) == [
        f"{shard.name}: {size // 2} bytes, the manifest says {size} (truncated or overwritten: copy it again)"]
    (shards / "manifest.json").write_text("{not json")
    [problem] = verify(shards, progress=False)
    assert problem.startswith(f"{shards / 'manifest.json'}: not a shard manifest (JSONDecodeError: ")
    (shards / "manifest.json").write_text(json.dumps({"shards": [{"file": shard.name}]}))
    [problem] = verify(shards, progress=False)
    assert "not a shard manifest (KeyError: 'count')" in problem
    assert verify(tmp_path / "nowhere", progress=False) == [f"{tmp_path / 'nowhere'}: no such directory"]


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", r"optim.lr: must be a positive finite number, got inf"),
    ("optim.weight_decay=inf", r"optim.weight_decay: must be a non-negative finite number, got inf"),
    ("objective.guidance=-1", r"objective.guidance: must be a non-negative finite number, got -1.0"),
    ("objective.sample_guidance=nan", r"objective.sample_guidance: must be a non-negative finite number, got nan"),
    ("trainer.seed=-1", r"trainer.seed: must be an integer from 0 to 2\*\*32-1, got -1"),
])
def test_config_values_the_schema_let_through(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([override]))
