"""Every preset composes and validates against the schema; bad values, types and keys name their key; saved
configs read back with today's defaults; schedule and accumulation arithmetic; SLURM rendering."""

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from editflow.config import CONFIG_DIR, check_world_size, saved_config, validate
from editflow.config import compose as compose_config
from editflow.config_schema import EditflowConfig
from editflow.errors import ConfigError

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def load(*overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


STAGE2 = "model.connector.init_from=/runs/align"  # presets that start from a stage-1 connector need one


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_validates(preset):
    cfg = load(f"experiment={preset}")
    assert OmegaConf.get_type(cfg) is EditflowConfig  # typed: the schema is the primary config's base
    if cfg.model.connector.init_from == "required":
        with pytest.raises(ConfigError, match=r"model\.connector\.init_from: .*experiment=align_connector"):
            validate(cfg)
        cfg = load(f"experiment={preset}", STAGE2)
    OmegaConf.resolve(cfg)
    validate(cfg, files=False)  # the schema's checks: /runs/align and the hub models are not on this machine
    assert (CONFIG_DIR.parent / "launch" / "accelerate" / cfg.launcher.accelerate_config).exists()


def test_the_two_stage_recipe():
    align = load("experiment=align_connector")
    assert align.model.trainable == "connector" and align.data.bucket_base == 512
    assert (align.optim.lr, align.optim.schedule, align.objective.guidance) == (1e-3, "constant", 1.0)
    assert set(align.data.train) == {"omniedit", "hqedit", "ultraedit", "text_to_image"}
    for stage2 in ("gpt_image_edit_8xa100", "lora_24gb"):
        assert load(f"experiment={stage2}").model.connector.init_from == "required"
        validate(load(f"experiment={stage2}", "model.connector.init_from=null"))  # fresh: an explicit choice


def test_a_full_fine_tune_in_pure_bf16_is_refused_unless_allowed(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    bf16 = ("model=kontext_qwen25vl_7b", "model.trainable=full", "launcher=local")
    with pytest.raises(ConfigError, match=r"model\.dtype: .*optim\.allow_low_precision_weights"):
        validate(load(*bf16))
    validate(load(*bf16, "optim.allow_low_precision_weights=true"))
    validate(load(*bf16, "launcher=deepspeed_zero2"))  # DeepSpeed keeps fp32 master weights
    validate(load(*bf16, "model.dtype=float32", "trainer.mixed_precision=bf16"))
    validate(load("model=kontext_qwen25vl_7b", "model.trainable=lora", "launcher=local"))  # fp32 adapters
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch` with a DeepSpeed config
    validate(load(*bf16))


def test_the_8xa100_recipe():
    cfg = load("experiment=gpt_image_edit_8xa100")
    assert (cfg.trainer.global_batch_size, cfg.optim.lr, cfg.optim.min_lr, cfg.trainer.max_steps) == \
        (256, 5e-5, 1e-6, 30000)
    assert cfg.trainer.mixed_precision == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.launcher.name.startswith("deepspeed") and cfg.data.bucket_base == 1024
    assert "flash" in cfg.model.attention_backend
    released = load("experiment=gpt_image_edit_released")
    assert (released.trainer.global_batch_size, released.optim.lr, released.optim.schedule) == (8, 1e-6, "constant")
    assert released.model.trainable == "reference_attention" and released.data.square_only


def test_the_tiny_base_recipe_is_the_one_that_made_the_shipped_base():
    """experiment=toy_base must keep the measured base run's settings, not inherit the default fine-tune's."""
    cfg = load("experiment=toy_base")
    assert cfg.model.transformer.pretrained is None and cfg.model.connector.init_from is None  # from scratch
    assert (cfg.data.toy.seed, cfg.data.toy.num_train, cfg.objective.region_weighting) == (2, 20000, "log")
    assert set(cfg.data.toy.kind_weights.values()) == {1}  # balanced, as measured (the default weights two kinds)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.trainer.max_steps, cfg.trainer.global_batch_size) == \
        (2e-3, 1e-5, 16000, 16)
    refine = load("experiment=toy_base_refine")  # its continuation: from a base, the pooled vector held
    assert refine.model.transformer.pretrained.endswith("tiny/base") and refine.model.connector.pooled == "base"
    assert (refine.data.toy.seed, refine.data.toy.num_train, refine.objective.region_weighting) == \
        (2, 20000, "log_both")
    assert (refine.optim.lr, refine.trainer.max_steps) == (1e-3, 16000)
    default = load()
    assert default.optim.lr == 2e-4 and default.model.transformer.pretrained.endswith("tiny/base")
    assert default.objective.region_weighting == "log_both"
    assert (default.data.toy.kind_weights.recolor, default.data.toy.kind_weights.background) == (2, 2)


@pytest.mark.parametrize("world,expected", [(1, 128), (2, 64), (8, 16), (16, 8)])
def test_accumulation_is_derived_from_the_world_size(world, expected):
    cfg = load("experiment=gpt_image_edit_8xa100")
    assert check_world_size(cfg, world) == expected  # 256 / (micro 2 x world)


def test_indivisible_global_batch_names_the_key():
    cfg = load("experiment=gpt_image_edit_8xa100")
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):
        check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match="trainer.global_batch_size"):
        validate(load("trainer.global_batch_size=33", "trainer.micro_batch_size=2"))


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"), ("optim.min_lr=1", "optim.min_lr"), ("trainer.mixed_precision=fp8", "trainer.mixed_precision"),
    ("objective.sigma_sampling=beta", "objective.sigma_sampling"), ("data.bucket_base=1000", "data.bucket_base"),
    ("model.trainable=some", "model.trainable"), ("objective.loss_weighting=snr", "objective.loss_weighting"),
    ("objective.drop_text=1.5", "objective.drop_text"), ("objective.drop_both=-0.1", "objective.drop_both"),
    ("model.connector.token_std=-1", "model.connector.token_std"), ("model.connector.token_std=big", "model.connector.token_std"),
    ("eval.guidance=[]", "eval.guidance"), ("eval.guidance=[3.5,high]", "eval.guidance"), ("encode.drops=[text,all]", "encode.drops"),
    ("model.text_pad_multiple=0", "model.text_pad_multiple"), ("model.attention_backend=fast", "model.attention_backend"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("logging.wandb_mode=cloud", "logging.wandb_mode"),
    ("data.toy.size=63", "data.toy.size"), ("data.toy.size=16", "data.toy.size"),
    ("data.toy.kind_weights.recolor=-1", "data.toy.kind_weights"),
    ("data.toy.kind_weights={recolor:0,add:0,remove:0,move:0,background:0}", "data.toy.kind_weights"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        validate(load(override))


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", r"trainer\.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("optim.lr=fast", r"optim\.lr: Value 'fast' of type 'str' could not be converted to Float"),
    ("trainer.resume_data=maybe", r"trainer\.resume_data: Value 'maybe' is not a valid bool"),
    ("trainer.max_step=5", r"trainer\.max_step: unknown key"),
    ("+trainer.max_step=5", r"trainer\.max_step: unknown key"),  # Hydra adds it; validation refuses it
    ("+model.lora.rnak=8", r"model\.lora\.rnak: unknown key"),
    ("data.toy.kind_weights.recolour=2", r"data\.toy\.kind_weights\.recolour: unknown key"),
    ("model=tinyy", r"model=tinyy: there is no .*tinyy\.yaml; the options: .*tiny"),
])
def test_wrong_types_and_unknown_keys_name_their_key(override, message):
    with pytest.raises(ConfigError, match="^" + message):
        validate(compose_config([override]))


def test_train_reports_config_errors_in_one_paragraph_before_the_run_directory(tmp_path, capsys):
    from editflow.commands.train import main

    for override, key in (("trainer.max_steps=abc", "trainer.max_steps"), ("+trainer.max_step=5", "trainer.max_step"),
                          ("optim.lr=-1", "optim.lr")):
        with pytest.raises(SystemExit) as info:
            main([override, f"hydra.run.dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.startswith(f"editflow train: error: {key}: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory


def test_a_saved_config_without_newer_keys_reads_back_with_their_defaults(tmp_path):
    """A run saved before model.text_pad_multiple, objective.sample_guidance, optim.allow_low_precision_weights
    and eval existed: those get the schema's defaults (what the run did), the rest is read as saved."""
    cfg = compose_config(["experiment=debug", "objective.guidance=2.0"])
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["model"]["text_pad_multiple"], old["objective"]["sample_guidance"], old["optim"]["allow_low_precision_weights"]
    del old["eval"]
    old["model"]["retired_key"] = 1  # a key this version no longer has: dropped, not fatal
    config = saved_config(json.loads(json.dumps(old)), "train_state.json")
    assert OmegaConf.get_type(config) is EditflowConfig
    assert config.model.text_pad_multiple == 1 and config.optim.allow_low_precision_weights is False
    assert config.objective.sample_guidance == 2.0 and config.eval.guidance == 2.0  # follow the saved guidance
    assert config.model.connector.hidden_dim == cfg.model.connector.hidden_dim and config.trainer.max_steps == 4
    assert "retired_key" not in config.model
    validate(config)

    from safetensors.torch import save_file

    from editflow import checkpoint as ckpt
    from editflow.model_paths import read_model_config

    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps({"config": old}))
    assert ckpt.load_config(checkpoint).model.text_pad_multiple == 1
    save_file({"w": torch.zeros(1)}, checkpoint / ckpt.MODEL_FILE)
    (checkpoint / ckpt.MARKER).write_text("4")
    loaded, where = read_model_config(tmp_path / "run")  # editflow edit/eval/export read it this way
    assert where == checkpoint and loaded.objective.sample_guidance == 2.0


def test_a_saved_config_that_does_not_fit_the_schema_is_refused_naming_file_and_key(tmp_path):
    """A resume from a checkpoint whose saved config has a value of the wrong type stops before any model
    loads, naming the checkpoint's file and the key (instead of being skipped as damaged)."""
    from safetensors.torch import save_file

    from editflow import checkpoint as ckpt
    from editflow.errors import CheckpointError

    saved = OmegaConf.to_container(compose_config(["experiment=debug"]), resolve=True)
    saved["trainer"]["max_steps"] = "abc"
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps({"config": saved}))
    save_file({"w": torch.zeros(1)}, checkpoint / ckpt.MODEL_FILE)
    (checkpoint / ckpt.MARKER).write_text("4")
    with pytest.raises(ConfigError, match=r"train_state\.json.*trainer\.max_steps"):
        saved_config(saved, str(checkpoint / "train_state.json"))
    with pytest.raises(CheckpointError, match=r"trainer\.resume=.*step-0000004.*trainer\.max_steps"):
        ckpt.resume_candidates(str(tmp_path / "run"), tmp_path / "run" / "checkpoints",
                               compose_config(["experiment=debug"]).model)


def test_lr_at_warmup_end_middle_and_end_of_the_cosine():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 500, 30000, min_lr=1e-6)
    lrs = []
    for _ in range(30000):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == 0 and lrs[250] == pytest.approx(2.5e-5)
    assert lrs[500] == pytest.approx(5e-5)
    assert lrs[500 + (30000 - 500) // 2] == pytest.approx((5e-5 + 1e-6) / 2, rel=1e-3)
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-2)


def test_slurm_dry_run_renders_a_requeueing_sbatch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "editflow.cli", "slurm", "--nodes", "2", "--partition", "gpu", "--time", "12:00:00",
         "--run-dir", str(tmp_path / "run"), "--dry-run", "--", "experiment=gpt_image_edit_8xa100", STAGE2],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for expected in ("#SBATCH --nodes=2", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                     "#SBATCH --partition=gpu", "--num_processes 16", "deepspeed_zero3.yaml",
                     "experiment=gpt_image_edit_8xa100", "trainer.resume=auto", "scontrol requeue", "PREEMPTED"):
        assert expected in script, expected
    assert "$nodes" not in script and not (tmp_path / "run").exists()  # dry run: nothing written
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0  # valid shell
    bad = subprocess.run([sys.executable, "-m", "editflow.cli", "slurm", "--nodes", "3", "--dry-run", "--",
                          "experiment=gpt_image_edit_8xa100", STAGE2], capture_output=True, text=True)
    assert bad.returncode == 2 and "trainer.global_batch_size" in bad.stderr
    single = subprocess.run([sys.executable, "-m", "editflow.cli", "slurm", "--gpus-per-node", "1", "--dry-run", "--",
                             "experiment=lora_24gb", STAGE2,
                             "trainer.max_steps=10"], capture_output=True, text=True)
    assert single.returncode == 0 and "#SBATCH --nodes=1" in single.stdout and "trainer.max_steps=10" in single.stdout
    (tmp_path / "single.sbatch").write_text(single.stdout)
    assert subprocess.run(["bash", "-n", str(tmp_path / "single.sbatch")]).returncode == 0


@pytest.mark.parametrize("option,value", [("--nodes", "0"), ("--nodes", "-1"), ("--gpus-per-node", "0"),
                                          ("--signal-lead", "-5")])
def test_slurm_refuses_counts_that_cannot_be(option, value, capsys):
    from editflow.commands.slurm import main

    with pytest.raises(SystemExit) as exit_:
        main([option, value, "--dry-run"])
    assert exit_.value.code == 2 and f"argument {option}: must be at least" in capsys.readouterr().err


def test_readme_runs_the_pinned_cuda_image():
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    dockerfile = (CONFIG_DIR.parent / "docker" / "Dockerfile").read_text()
    assert "docker build -f docker/Dockerfile" in readme and "docker run --gpus all" in readme
    assert "FROM nvidia/cuda:" in dockerfile and "torch==" in dockerfile and "flash-attn==" in dockerfile


def test_hydra_overrides_stand_anywhere_on_a_command_line(capsys):
    import argparse

    from editflow.config import parse_with_overrides

    parser = argparse.ArgumentParser(prog="editflow x")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true")
    args, overrides = parse_with_overrides(parser, ["experiment=a", "--nodes", "4", "+b.c=1", "--dry-run", "~d",
                                                    "--", "e=2"])
    assert (args.nodes, args.dry_run, overrides) == (4, True, ["experiment=a", "+b.c=1", "~d", "e=2"])
    with pytest.raises(SystemExit):
        parse_with_overrides(parser, ["experiment=a", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_encode_has_help_and_rejects_unknown_flags(capsys):
    from editflow.commands.encode import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "editflow encode [hydra overrides]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--nodes", "2"])
    assert info.value.code == 2 and "unrecognized arguments: --nodes 2" in capsys.readouterr().err


def test_the_gpu_preset_stage_composes_and_validates():
    """scripts/gpu_measure.sh's `preset` stage runs only on a lent GPU: its overrides are checked here."""
    import shlex

    script = (CONFIG_DIR.parent / "scripts" / "gpu_measure.sh").read_text()
    command = script[script.index("-m editflow.train", script.index("preset)")):].split("2>&1")[0]
    overrides = [t for t in shlex.split(command.replace("\\\n", " "))[2:] if not t.startswith("hydra.run.dir")]
    cfg = load(*overrides)
    OmegaConf.resolve(cfg)
    validate(cfg)
