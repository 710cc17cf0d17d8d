"""Where the swapped-in conditioning starts: the base's empty-prompt CLIP pooled vector, T5's token scale,
the connector kinds and `model.connector.init_from` (runs, checkpoints, exports, the public projector)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from editflow.errors import ConfigError
from editflow.models.build import ASSETS, build_models
from editflow.models.connector import Connector
from editflow.models.connector_start import load_connector_, start_connector

BASE = str(ASSETS / "tiny" / "base")


def toy_states(conditioner, seeds):
    from editflow.data.toy import make_edit
    from editflow.frozen_encoders import pad_states

    rows = []
    for i in seeds:
        edit = make_edit(i, seed=3)
        states, mask = conditioner.encode([edit.source], [edit.instruction])
        rows.append(states[0, : int(mask.sum())])
    return pad_states(rows)


@pytest.fixture(scope="module")
def models(tiny_model_cfg):
    return build_models(tiny_model_cfg, seed=0, training=True)


@pytest.fixture(scope="module")
def calibration(models):
    return toy_states(models.conditioner, range(8))


def clip_pooled_of_empty_prompt() -> torch.Tensor:
    """Computed here with transformers alone (not through editflow's or diffusers' code)."""
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(BASE, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(BASE, subfolder="text_encoder")
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids).pooler_output[0]


@pytest.mark.parametrize("kind", ["mlp", "reference"])
def test_a_fresh_connector_feeds_the_bases_empty_prompt_pooled_vector_exactly(tiny_model_cfg, models, calibration,
                                                                               kind):
    cfg = OmegaConf.merge(tiny_model_cfg.connector, {"kind": kind})
    connector = Connector(64, 128, 64, kind=kind, hidden_dim=cfg.hidden_dim)
    start_connector(connector, cfg, lambda: calibration)
    expected = clip_pooled_of_empty_prompt()
    assert expected.abs().max() > 0.1
    other = toy_states(models.conditioner, range(20, 24))
    for states, mask in (calibration, other):  # whatever the instruction and image: the pooled vector Kontext knows
        _, pooled = connector(states, mask)
        assert torch.equal(pooled, expected.expand_as(pooled))


@pytest.mark.parametrize("kind,refiner", [("mlp", 0), ("mlp", 2), ("reference", 0)])
def test_the_token_output_starts_at_the_configured_rms(tiny_model_cfg, models, calibration, kind, refiner):
    cfg = OmegaConf.merge(tiny_model_cfg.connector, {"kind": kind, "token_std": 0.35})
    connector = Connector(64, 128, 64, kind=kind, hidden_dim=cfg.hidden_dim, refiner_layers=refiner, refiner_heads=4)
    states, mask = calibration
    rms = lambda t, m: float(t[m].detach().pow(2).mean().sqrt())
    assert abs(rms(connector.tokens(states, mask), mask) - 0.35) > 0.05  # the random layer's scale is another
    start_connector(connector, cfg, lambda: calibration)
    assert rms(connector.tokens(states, mask), mask) == pytest.approx(0.35, rel=1e-4)
    held_out, held_mask = toy_states(models.conditioner, range(40, 48))  # not what it was calibrated on
    assert rms(connector.tokens(held_out, held_mask), held_mask) == pytest.approx(0.35, rel=0.15)


def test_token_std_from_base_is_t5s_rms_over_real_tokens(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from editflow.models.base_text import T5_PROBE_PROMPTS, t5_token_rms

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny" / "qwen")  # any fast tokenizer stands in for T5's
    tokenizer.save_pretrained(tmp_path / "tokenizer_2")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, pad_token_id=tokenizer.pad_token_id)).eval()
    t5.save_pretrained(tmp_path / "text_encoder_2")
    ids = tokenizer(list(T5_PROBE_PROMPTS), padding="max_length", max_length=512, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = t5(ids)[0]  # FLUX feeds T5 all 512 positions, padding unmasked
    lengths = [len(tokenizer(p)["input_ids"]) for p in T5_PROBE_PROMPTS]
    expected = torch.cat([out[i, :n] for i, n in enumerate(lengths)]).pow(2).mean().sqrt()
    assert t5_token_rms(str(tmp_path)) == pytest.approx(float(expected), rel=1e-5)


def test_the_public_gpt_image_edit_projector_loads_into_kind_reference(tiny_model_cfg, calibration, tmp_path):
    # its stage-1 file: the projector's tensors under the names of its Qwen2.5-VL model (torch.save'd dict)
    torch.manual_seed(1)
    public = {"denoise_tower.denoise_projector.0.weight": torch.randn(3 * 128, 64),
              "denoise_tower.denoise_projector.0.bias": torch.randn(3 * 128),
              "denoise_tower.denoise_projector.2.weight": torch.randn(128, 3 * 128),
              "denoise_tower.denoise_projector.2.bias": torch.randn(128)}
    torch.save(public, tmp_path / "denoise_projector.bin")
    cfg = OmegaConf.merge(tiny_model_cfg.connector, {"kind": "reference",
                                                     "init_from": str(tmp_path / "denoise_projector.bin")})
    connector = Connector(64, 128, 64, kind="reference")
    start_connector(connector, cfg, lambda: pytest.fail("a loaded projector is not recalibrated"))
    states, mask = calibration
    reference = torch.nn.functional.silu(states @ public["denoise_tower.denoise_projector.0.weight"].T
                                         + public["denoise_tower.denoise_projector.0.bias"])
    reference = reference @ public["denoise_tower.denoise_projector.2.weight"].T + \
        public["denoise_tower.denoise_projector.2.bias"]
    tokens, pooled = connector(states, mask)
    torch.testing.assert_close(tokens[mask], reference[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled[0], clip_pooled_of_empty_prompt())  # the projector file has no pooled vector
    with pytest.raises(ValueError, match="model.connector.init_from.*shapes differ"):
        load_connector_(Connector(64, 128, 64, kind="mlp"), tmp_path / "denoise_projector.bin")


def test_init_from_a_checkpoint_run_and_export_restores_the_whole_connector(tiny_model_cfg, calibration, tmp_path):
    source = Connector(64, 128, 64, hidden_dim=128)
    start_connector(source, tiny_model_cfg.connector, lambda: calibration)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000010"
    checkpoint.mkdir(parents=True)
    save_file({f"connector.{k}": v for k, v in state.items()} | {"transformer.x": torch.zeros(1)},
              checkpoint / "model.safetensors")
    (checkpoint / "train_state.json").write_text("{}")
    (checkpoint / "COMPLETE").write_text("10")
    export = tmp_path / "export"
    (export / "connector").mkdir(parents=True)
    save_file(state, export / "connector" / "model.safetensors")
    (export / "editflow.json").write_text(json.dumps({"kind": "full"}))
    for path in (checkpoint, tmp_path / "run", export):
        target = Connector(64, 128, 64, hidden_dim=128)
        start_connector(target, OmegaConf.merge(tiny_model_cfg.connector, {"init_from": str(path)}),
                        lambda: pytest.fail("a loaded connector is not recalibrated"))
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), (path, key)
    with pytest.raises(ConfigError, match="model.connector.init_from"):
        load_connector_(Connector(64, 128, 64), tmp_path / "nowhere")


def test_trainable_connector_freezes_the_transformer(tiny_model_cfg):
    """Stage 1 trains the connector's token path; the pooled vector stays at the base's empty prompt."""
    cfg = OmegaConf.merge(tiny_model_cfg, {"trainable": "connector"})
    editor = build_models(cfg, seed=0, training=True).editor
    trainable = {n for n, p in editor.named_parameters() if p.requires_grad}
    tokens = {n for n, _ in editor.connector.named_parameters(prefix="connector") if ".pooled_correction." not in n}
    assert tokens and trainable == tokens
    full = build_models(OmegaConf.merge(tiny_model_cfg, {"trainable": "full"}), seed=0, training=True).editor
    assert all(p.requires_grad for p in full.connector.pooled_correction.parameters())  # stage 2 learns it


def test_pooled_base_holds_the_empty_prompt_vector_for_the_whole_run(tiny_model_cfg, models, calibration, tmp_path):
    """model.connector.pooled=base: a loaded correction is dropped and none trains, in any mode."""
    source = Connector(64, 128, 64, hidden_dim=128)
    start_connector(source, tiny_model_cfg.connector, lambda: calibration)
    with torch.no_grad():
        source.pooled_correction[-1].weight.normal_()  # a trained correction, e.g. the shipped base's
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "connector.safetensors")
    states, mask = toy_states(models.conditioner, range(20, 24))
    cfg = OmegaConf.merge(tiny_model_cfg.connector, {"init_from": str(tmp_path / "connector.safetensors")})
    learned = Connector(64, 128, 64, hidden_dim=128)
    start_connector(learned, cfg, lambda: calibration)
    assert not torch.equal(learned.pooled(states, mask), learned.pooled_base.expand(len(states), -1))
    held = Connector(64, 128, 64, hidden_dim=128)
    start_connector(held, OmegaConf.merge(cfg, {"pooled": "base"}), lambda: calibration)
    assert torch.equal(held.pooled(states, mask), clip_pooled_of_empty_prompt().expand(len(states), -1))
    assert torch.equal(held.mlp[0].weight, learned.mlp[0].weight)  # the token path loads as before
    for trainable in ("full", "lora", "connector"):
        cfg = OmegaConf.merge(tiny_model_cfg, {"trainable": trainable, "connector": {"pooled": "base"}})
        editor = build_models(cfg, seed=0, training=True).editor
        assert not any(p.requires_grad for p in editor.connector.pooled_correction.parameters()), trainable
    from editflow.config import compose, validate

    with pytest.raises(ConfigError, match="model.connector.pooled"):
        validate(compose(["model.connector.pooled=clip"]), files=False)


def test_stage_two_starts_from_the_stage_one_connector(tmp_path, monkeypatch):
    """experiment=align_connector in miniature: the transformer stays frozen, then a fine-tune starts from it."""
    import sys

    from safetensors.torch import load_file

    from editflow.config import compose
    from editflow.trainer import Trainer
    from test_train import QUICK, run_train

    cache = tmp_path / "cache"
    run_train([sys.executable, "-m", "editflow.cli", "train"], tmp_path / "stage1", cache, "model.trainable=connector",
              "optim.lr=1e-3", "optim.schedule=constant")
    stage1 = load_file(tmp_path / "stage1" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert stage1 and all(k.startswith("connector.") for k in stage1)  # only the connector trained
    assert not any(".pooled_correction." in k for k in stage1)  # ... its token path: the pooled vector stayed put
    monkeypatch.setenv("EDITFLOW_CACHE", str(cache))
    cfg = compose([*QUICK, f"model.connector.init_from={tmp_path / 'stage1'}", "logging.wandb=false"])
    trainer = Trainer(cfg, tmp_path / "stage2")
    connector = trainer.accelerator.unwrap_model(trainer.editor).connector
    start = connector.state_dict()
    for key, value in stage1.items():
        assert torch.equal(start[key.removeprefix("connector.")], value), key
    states, mask = torch.randn(2, 5, connector.sizes["qwen_dim"]), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(connector.pooled(states, mask), connector.pooled_base.expand(2, -1))  # correction at zero
    assert any(p.requires_grad for p in trainer.editor.transformer.parameters())  # stage 2 trains it
