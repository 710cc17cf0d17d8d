"""Every command the README shows (its ```bash blocks, read when the tests run) works as written.

editflow's own commands run for real on the CPU where that is quick (edit, eval and export on a tiny trained
model, `slurm --dry-run`, the tiny `bench train`), with the files they name made up in a scratch directory
(`/data/...` is mapped into it). The rest are dry runs through the real command-line parsing: `train`,
`encode` and the launchers compose and validate their config with the real Hydra app but train nothing,
`edit` at a large `--size` and `eval` with a judge stop where the model would load (after every check of their
inputs), and `data` commands stop once argparse has accepted their arguments. Other programs (docker, bash, pytest,
shell tools) only have their files checked. A command the CLI does not accept fails here, naming it.
"""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from editflow.config import CONFIG_DIR

ROOT = CONFIG_DIR.parent
ENTRY_POINTS = {"editflow", ".venv/bin/editflow"}
PYTHONS = {"python", "python3", ".venv/bin/python"}


def readme_commands() -> list[list[str]]:
    """Command lines of the README's bash blocks as tokens: continuations joined, comments dropped, `&&`
    chains split."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                commands.append(tokens[:cut])
                tokens = tokens[cut + 1:]
    return [c for c in commands if c]


def variants(tokens: list[str]) -> list[tuple[list[str], bool]]:
    """(tokens, optional parts included): a command with `[optional parts]` without them, then with them."""
    if not any(t.startswith("[") for t in tokens):
        return [(tokens, False)]
    without, inside = [], False
    for token in tokens:
        inside = inside or token.startswith("[")
        if not inside:
            without.append(token)
        inside = inside and not token.endswith("]")
    return [(without, False), ([t.strip("[]") for t in tokens], True)]


COMMANDS = [v for c in readme_commands() for v in variants(c)]


class Parsed(Exception):
    """Raised once a dry run has checked what it can."""


@pytest.fixture(scope="module")
def workspace(quick_model, tmp_path_factory):
    """The files the README's commands name: images, a mask, a batch file, shards under data/, and RUN /
    runs/DATE/TIME pointing at a tiny trained run."""
    from editflow.data.toy import make_edit
    from editflow.data.toy_shards import write_toy_shards

    ws = tmp_path_factory.mktemp("readme")
    edit = make_edit(3, seed=5)
    edit.source.convert("RGB").save(ws / "photo.jpg")
    edit.source.save(ws / "src.png")
    edit.target.save(ws / "ref.png")
    edit.mask.save(ws / "mask.png")
    (ws / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "photo.jpg", "instruction": "Remove the circle.", "out": "batch-1.png"},
        {"images": ["src.png", "ref.png"], "instruction": "Add a square.", "out": "batch-2.png", "steps": 2}]))
    (ws / "RUN").symlink_to(quick_model / "run")
    (ws / "runs" / "DATE").mkdir(parents=True)
    (ws / "runs" / "DATE" / "TIME").symlink_to(quick_model / "run")
    write_toy_shards(ws / "data" / "shards" / "val", num=10, progress=False)  # two of each kind: eval --reliance pairs them
    stage1_run(ws / "runs" / "align")
    return ws


def stage1_run(run: Path) -> None:
    """`runs/align`, the stage-1 run the two-stage commands start from: a checkpoint holding a connector of the
    full model's kind and hidden_dim (read before any model loads), at toy widths otherwise."""
    from editflow.models.connector import Connector
    from test_bad_inputs import fake_checkpoint

    state = Connector(8, 8, 8, kind="mlp", hidden_dim=4096).state_dict()
    fake_checkpoint(run, {k: v.contiguous() for k, v in state.items()})


@pytest.fixture()
def dry(monkeypatch):
    """`dry(command)` stops `editflow COMMAND` once its own checks are done: no training, encoding, timing or
    model loading."""
    import argparse

    import editflow.bench
    import editflow.bench_data
    import editflow.pipeline
    import editflow.encode_shards
    import editflow.trainer

    class DryTrainer:
        preempted = interrupted = False

        def __init__(self, cfg, run_dir):
            pass

        def train(self):
            return {}

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        parse_args(self, *args, **kwargs)
        raise Parsed(self.prog)

    def load_then_stop(*args, **kwargs):
        raise Parsed("model")

    def compose_then_stop(args, overrides):  # `bench data`: its overrides compose; no data written or timed
        from editflow.config import compose

        compose(overrides)
        raise Parsed("bench data")

    def stop(command: str) -> None:
        if command == "train":  # Hydra parses, composes and validates; the trainer does nothing
            monkeypatch.setattr(editflow.trainer, "Trainer", DryTrainer)
        elif command == "encode":
            monkeypatch.setattr(editflow.encode_shards, "encode", lambda cfg: Path(str(cfg.encode.out)))
        elif command == "bench":  # composes and builds the config; times nothing
            monkeypatch.setattr(editflow.bench, "time_variant", lambda *args: {"samples_per_s": 1.0})
            monkeypatch.setattr(editflow.bench, "measure_peak_tflops", lambda *args: 1.0)
            monkeypatch.setattr(editflow.bench_data, "run", compose_then_stop)
        elif command in ("edit", "eval", "export"):  # their checks of files and arguments come before the model
            monkeypatch.setattr(editflow.pipeline.EditPipeline, "from_pretrained", load_then_stop)
        else:
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)

    return stop


def run_editflow(argv: list[str], real: bool, stop) -> None:
    """`editflow ARGV` in this process; a non-zero exit fails the test with the command's own message."""
    from editflow.cli import main

    if not real:
        stop(argv[0])
    try:
        main(argv)
    except Parsed:
        pass
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), f"editflow {shlex.join(argv)} exited {exit_info.code}"


def check(tokens: list[str], optional: bool, stop) -> None:
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    program, args = tokens[0], tokens[1:]
    if program in ENTRY_POINTS:
        if args[0] == "slurm" and "--dry-run" not in args:
            args = [*args, "--dry-run"]  # render the job script, submit nothing
        run_editflow(args, _real(args, optional), stop)
    elif program in PYTHONS and args[:1] == ["-m"]:
        module, rest = args[1], args[2:]
        if module.startswith("editflow"):
            run_module(module, rest, stop)
        else:
            assert module == "pytest", f"unknown module in the README: {module}"
    elif program == "accelerate" and args[:1] == ["launch"]:
        from accelerate.commands.launch import launch_command_parser

        launch = launch_command_parser().parse_args(args[1:])
        if launch.config_file:
            assert (ROOT / launch.config_file).is_file(), f"{launch.config_file} is not in the repository"
        assert launch.module, "the README launches editflow as a module (-m editflow.train)"
        if launch.training_script == "editflow.train":  # the global batch splits over the launch's processes
            check_world_size(launch, launch.training_script_args)
        run_module(launch.training_script, launch.training_script_args, stop)
    elif program == "bash":
        script = ROOT / args[-1]
        assert script.is_file(), f"{args[-1]} is not in the repository"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    elif program == "docker":
        if args[0] == "build" and "-f" in args:
            assert (ROOT / args[args.index("-f") + 1]).is_file()
        inner = next((i for i, t in enumerate(args) if t == "editflow" and i + 1 < len(args)
                      and args[i + 1] in ("train", "edit", "eval", "export", "data", "encode", "bench")), None)
        if inner is not None:
            run_editflow(args[inner + 1:], False, stop)


def check_world_size(launch, overrides: list[str]) -> None:
    """The composed config's global batch splits over the processes this launch starts (the flag, else its
    config file's `num_processes`), as the trainer checks before it builds anything."""
    import yaml

    from editflow.config import check_world_size as split_over, compose

    processes = launch.num_processes
    if processes is None and launch.config_file:
        processes = yaml.safe_load((ROOT / launch.config_file).read_text()).get("num_processes")
    split_over(compose([o for o in overrides if not o.startswith("hydra.")]), int(processes or 1))


def _real(args: list[str], optional: bool) -> bool:
    """Whether `editflow ARGS` runs for real here (quick on the CPU) rather than as a dry run."""
    if args[0] == "edit":  # at the tiny model's own size; a set --size can take minutes on the CPU
        return "--size" not in args
    if args[0] == "export":
        return True
    if args[0] == "eval":
        return not optional  # the judge needs a local Qwen2.5-VL
    if args[0] == "slurm":
        return True  # with --dry-run
    return args == ["bench", "train"]  # the tiny CPU benchmark; the others need a GPU (train, encode: dry)


def run_asset_builder(args: list[str]) -> None:
    """`python -m editflow.models.tiny_assets ARGS`: its arguments parse; nothing in the package is rewritten."""
    from editflow.models import tiny_assets

    def parsed(*_, **__):
        raise Parsed

    with pytest.MonkeyPatch.context() as patch:
        for writer in ("save_base", "build_qwen", "build_base_text_encoders", "train_vae"):
            patch.setattr(tiny_assets, writer, parsed)
        try:
            tiny_assets.main(args)
        except Parsed:
            pass


def run_module(module: str, args: list[str], stop) -> None:
    if module == "editflow.models.tiny_assets":
        return run_asset_builder(args)
    commands = {"editflow.train": "train", "editflow.preencode": "encode", "editflow.cli": None}
    assert module in commands, f"the README runs python -m {module}, which is not an editflow entry point"
    argv = args if commands[module] is None else [commands[module], *args]
    run_editflow(argv, False, stop)


@pytest.mark.parametrize("tokens,optional", COMMANDS, ids=[" ".join(c)[:100] for c, _ in COMMANDS])
def test_readme_command_works_as_written(tokens, optional, workspace, dry, monkeypatch, cache_dir):
    monkeypatch.chdir(workspace)
    check([t.replace("/data/", f"{workspace}/data/") for t in tokens], optional, dry)


def test_the_readme_shows_commands_of_every_kind():
    """Guards the parser above: if it found nothing, the test would pass vacuously."""
    programs = {c[0] for c, _ in COMMANDS}
    assert {"editflow", "accelerate", "bash", "docker"} <= programs
    assert any(c[:2] == ["editflow", "slurm"] and "--dry-run" in c for c, _ in COMMANDS)
    assert any(c[:2] == ["editflow", "edit"] for c, _ in COMMANDS) and len(COMMANDS) > 20


def test_a_command_the_cli_rejects_fails_the_check(dry, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exited 2"):
        check(shlex.split("editflow slurm experiment=gpt_image_edit_8xa100 --nodes 4 --bogus --dry-run"), False, dry)
    with pytest.raises(AssertionError, match="exited"):
        check(shlex.split("editflow data convert --format nope x --out y"), False, dry)
