"""What a training run saves and restores: the trainable weights and a registry of objects with
`state_dict` / `load_state_dict`, written by all ranks together into the atomic checkpoints of
editflow/checkpoint.py.

    checkpoints/step-NNNNNNN/
        model.safetensors   the trainable weights and buffers, whole (gathered under ZeRO-3/FSDP)
        NAME.pt             each file entry (optimizer, scheduler, rng: one state per rank, ema)
        train_state.json    the JSON entries (step, samples_seen, flops_per_step, skipped_steps; data: one
                            state per rank), the world size and the run's config
        engine/             DeepSpeed/FSDP only: every rank's shards of weights, optimizer and schedule

Adding a piece of state is one `register` call; resume restores every registered object through its
`load_state_dict` and writes no object's fields itself.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file

from editflow import checkpoint as ckpt
from editflow.errors import CheckpointError, EditflowError

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class Entry:
    obj: Stateful
    json: bool  # in train_state.json (its keys at the top level, or under its name when per rank); else NAME.pt
    per_rank: bool  # every rank's state is saved; each rank restores its own
    engine: bool  # DeepSpeed/FSDP keep it in engine/ (accelerate's save_state) instead
    optional: bool  # restored only where the checkpoint has it for this world size (else passed over)
    restore: bool  # False: saved, but a resume leaves the object as it is


class Checkpointer:
    def __init__(self, root: Path, accelerator: Accelerator, model: torch.nn.Module, sharded: bool,
                 keep_last: int | None, config: dict):
        self.root, self.accelerator, self.model, self.sharded = root, accelerator, model, sharded
        self.keep_last, self.config = keep_last, config
        self.entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Stateful, *, json: bool = False, per_rank: bool = False,
                 engine: bool = False, optional: bool = False, restore: bool = True) -> None:
        self.entries[name] = Entry(obj, json, per_rank, engine, optional, restore)

    def _active(self) -> list[tuple[str, Entry]]:
        """The entries this run writes itself (the engine's own state is DeepSpeed's/FSDP's to write)."""
        return [(name, e) for name, e in self.entries.items() if not (e.engine and self.sharded)]

    def latest(self) -> Path | None:
        return ckpt.latest_checkpoint(self.root)

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> Path | None:
        """All ranks take part: per-rank states are gathered, DeepSpeed/FSDP shards written by each rank,
        then the main process writes the rest and commits the directory by rename (keeping `keep_last`)."""
        acc = self.accelerator
        gathered = {name: gather_object([e.obj.state_dict()]) for name, e in self._active() if e.per_rank}
        tmp = ckpt.staging_dir(self.root, step)
        error = None  # a full disk or quota: reported by every rank, the previous checkpoint stays the newest
        if acc.is_main_process:
            try:
                ckpt.stage(self.root, step)
            except OSError as err:
                error = err
        acc.wait_for_everyone()
        if self.sharded:
            try:
                acc.save_state(tmp / "engine")
            except OSError as err:
                error = error or err
        files, train_state = {}, {"world_size": acc.num_processes, "config": self.config}
        for name, entry in self._active():
            state = gathered[name] if entry.per_rank else entry.obj.state_dict()
            if not entry.json:
                files[name] = state
            elif entry.per_rank:
                train_state[name] = state
            else:
                train_state.update(state)
        weights = self._trainable_weights()
        path = None
        if acc.is_main_process and error is None:
            try:
                ckpt.write(tmp, step, weights, files, train_state)
                path = ckpt.commit(tmp, step, self.keep_last)
            except OSError as err:
                error = err
        errors = [str(e) for e in gather_object([error]) if e]
        if errors:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # the partial save would only take space
            raise CheckpointError(f"could not write the checkpoint of step {step} to {self.root} ({errors[0]}); the "
                                  f"newest complete checkpoint is {self.latest() or 'none'}. Free space (or give a "
                                  "writable hydra.run.dir), then continue with trainer.resume=auto")
        acc.wait_for_everyone()
        return path

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole, on the main process (called on every rank: ZeRO-3/FSDP gather)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        if not self.sharded:
            return ckpt.trainable_state(model)
        names = ckpt.saved_names(model)
        state = acc.get_state_dict(self.model)
        if not acc.is_main_process:
            return {}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k in names}

    # ------------------------------------------------------------------ restore
    def restore(self, candidates: list[Path]) -> Path:
        """Restore the first of `candidates` (newest first) that every rank can read; damaged ones are skipped,
        with the reason (CheckpointError when none loads)."""
        path, loaded = ckpt.first_loadable(candidates, self._read)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if self.sharded:  # weights, optimizer and schedule from every rank's shards
            self.accelerator.load_state(path / "engine")
        else:
            ckpt.load_model_weights(self.accelerator.unwrap_model(self.model), path, loaded.pop(ckpt.MODEL_FILE))
        for name, entry in self._active():
            if name not in loaded:
                continue
            state = loaded[name]
            if entry.per_rank:
                if len(state) != world and entry.optional:
                    continue
                state = state[min(rank, len(state) - 1)]  # another world size: the object says whether it fits
            try:
                entry.obj.load_state_dict(state)
            except EditflowError:
                raise
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: its {name} state does not fit this run ({err}); was it trained "
                                      "with another optim.name or model.trainable?") from None
        return path

    def _read(self, path: Path) -> dict:
        """Everything a resume needs from `path`, read into memory before anything is applied. All ranks agree:
        a checkpoint that fails on any of them is skipped by all."""
        error, state = None, {}
        try:
            ckpt.check_files(path)
            if self.sharded and not (path / "engine").is_dir():
                raise CheckpointError(f"{path}: no engine/ state; it was written without DeepSpeed/FSDP, which "
                                      "this run uses (resume it with the launcher it was trained with)")
            train_state = ckpt.load_train_state(path)
            for name, entry in self._active():
                if not entry.restore:
                    continue
                if entry.json:
                    state[name] = train_state[name] if entry.per_rank else train_state
                elif not entry.optional or (path / f"{name}.pt").exists():
                    state[name] = ckpt.load_extra(path, name)
            if not self.sharded:
                state[ckpt.MODEL_FILE] = load_file(path / ckpt.MODEL_FILE)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - any reader's error means this checkpoint does not load
            error = f"{path}: {type(err).__name__}: {err}"
        errors = [e for e in gather_object([error]) if e]
        if errors:
            raise CheckpointError(errors[0])
        return state

    def warn_if_short_of_space(self, needed_bytes: int, run_dir: Path) -> None:
        """Warn now, not at the first save hours later, when the run directory's disk cannot take a checkpoint."""
        if not self.accelerator.is_main_process:
            return
        free = shutil.disk_usage(self.root).free
        if free < needed_bytes:
            log.warning("the run directory %s has %.1f GB free; a checkpoint of this run needs about %.1f GB: saving "
                        "will fail unless space is freed", run_dir, free / 1e9, needed_bytes / 1e9)
