"""The training loop: owns models, optimizer, schedule, data stream, logging and checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from editflow import checkpoint as ckpt
from editflow import flow
from editflow.data.preencoded import check_pre_encoded
from editflow.data.loader import read_samples
from editflow.data.regions import batch_region
from editflow.data.skips import SkipCounter
from editflow.data.sources import split_urls, train_sets
from editflow.data.stream import BucketStream, ResumableLoader
from editflow.ema import EMA
from editflow.encoding import FrozenEncoder, TextBucketKey, calibration_states, condition_dropout
from editflow.errors import CheckpointError, DataError
from editflow.evaluation import (eval_metrics, evaluate_guidances, grid_picks, guidance_values, make_edit_fn,
                                 sample_grid)
from editflow.guard import NonFiniteGuard
from editflow.throughput import count_step_flops, device_peak_tflops
from editflow.models.attention import check_attention_backend
from editflow.models.build import build_frozen, build_models, compile_blocks, keep_trainable_in_fp32
from editflow.models.connector_start import start_connector
from editflow.pipeline import EditPipeline, sample_guidance
from editflow.run_summary import PhaseTimer, summary
from editflow.validate import check_world_size

log = logging.getLogger(__name__)


def build_optimizer(params, ocfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernels), or an 8-bit AdamW for the 24 GB mode: bitsandbytes' (CUDA) or torchao's
    (any device; block-wise 8-bit moments, small tensors kept in fp32)."""
    kwargs = dict(lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay)
    name = ocfg.get("name", "adamw")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name=adamw8bit needs bitsandbytes (pip install 'editflow[gpu]'); "
                              "optim.name=adamw8bit_torchao needs only torchao") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "adamw8bit_torchao":
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ImportError("optim.name=adamw8bit_torchao needs torchao (pip install 'editflow[gpu]')") from None
        return AdamW8bit(params, **kwargs)
    # fused kernels (one launch for all tensors, and `found_inf` for skipping a step without a host sync)
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _deepspeed_on_cpu() -> bool:
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()


def _process_group_kwargs() -> list:
    """DeepSpeed without CUDA (CPU tests): accelerate only counts the processes when it is told the backend."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")] if _deepspeed_on_cpu() else []


@contextlib.contextmanager
def frozen_models_unpartitioned(accelerator: Accelerator):
    """Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, whose from_pretrained then
    partitions Qwen at load (zero.Init). Qwen is frozen and stays outside the DeepSpeed engine, so nothing
    would gather it again: it is loaded whole. The trainable editor is partitioned by `prepare`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tcfg = cfg.trainer
        # accelerate's cpu=True turns DeepSpeed off, so DeepSpeed without CUDA (CPU tests) leaves it False
        use_cpu = tcfg.device == "cpu" or (not torch.cuda.is_available() and not _deepspeed_on_cpu())
        # The schedule counts optimizer steps: accelerate must not step it once per process.
        self.accelerator = Accelerator(cpu=use_cpu, mixed_precision=tcfg.mixed_precision,
                                       step_scheduler_with_optimizer=False, kwargs_handlers=_process_group_kwargs())
        acc = self.accelerator
        self.accumulation = check_world_size(cfg, acc.num_processes)  # before any model loads
        acc.gradient_accumulation_steps = self.accumulation
        log.info("%s; micro-batch %d x accumulation %d x %d process(es) = global batch %d", self._describe_setup(),
                 tcfg.micro_batch_size, self.accumulation, acc.num_processes, tcfg.global_batch_size)
        set_seed(tcfg.seed, device_specific=True)  # per-rank noise and sigmas

        dcfg = cfg.data
        self.timer = PhaseTimer()  # wall time by phase, for the end-of-run summary
        with acc.main_process_first(), self.timer("toy data" if dcfg.kind == "toy" else "data index"):
            # rank 0 generates the toy set; the others then find it cached
            sets = train_sets(dcfg, progress=acc.is_main_process)
            self.val_urls = split_urls(dcfg, "val", progress=acc.is_main_process) if dcfg.get("val") or \
                dcfg.kind == "toy" else []
        pre_encoded = check_pre_encoded(sets, cfg)
        # the run directory and what to resume from are checked before any model loads
        self.checkpoint_root = self.run_dir / "checkpoints"
        self._check_writable()
        self.resume_from = self._resume_candidates()
        # Pre-encoded data: Qwen and the VAE serve only evaluation; they are loaded then, into host memory.
        qwen_dim = sets[0].encoding.get("qwen_hidden_size") if pre_encoded else None
        with frozen_models_unpartitioned(acc), self.timer("models"):
            models = build_models(cfg.model, seed=tcfg.seed, training=True, qwen_dim=qwen_dim).to(acc.device)
        check_attention_backend(models.editor, acc.device, models.editor.transformer.dtype)
        self.conditioner, self.codec, self.scheduler = models.conditioner, models.codec, models.scheduler
        self.encoder = FrozenEncoder(self.codec, self.conditioner, cache=tcfg.get("cache_encodings", False),
                                     text_pad_multiple=models.editor.text_pad_multiple,
                                     skips=SkipCounter(dcfg.max_skip_rate, what="samples encoded by this process"))
        editor = models.editor
        if cfg.model.get("compile_blocks"):
            if acc.device.type == "cuda":
                compile_blocks(editor.transformer)
            else:
                log.info("model.compile_blocks: skipped on %s (compiling pays on CUDA only)", acc.device)
        if acc.distributed_type != DistributedType.DEEPSPEED:
            keep_trainable_in_fp32(editor, cfg.model)
        if not self.resume_from:  # a resumed run's checkpoint holds the connector
            with frozen_models_unpartitioned(acc):  # the base's CLIP (pooled start) is loaded whole, like Qwen
                start_connector(editor.connector, cfg.model.connector,
                                lambda: calibration_states(sets, self.conditioner))
        params = [p for p in editor.parameters() if p.requires_grad]
        ocfg = cfg.optim
        optimizer = build_optimizer(params, ocfg)
        if ocfg.get("schedule", "cosine") == "constant":
            lr_scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=ocfg.warmup_steps)
        else:
            lr_scheduler = get_cosine_with_min_lr_schedule_with_warmup(
                optimizer, num_warmup_steps=ocfg.warmup_steps, num_training_steps=tcfg.max_steps, min_lr=ocfg.min_lr
            )
        # DeepSpeed and FSDP shard optimizer state (and ZeRO-3/FSDP the weights): every rank saves its part
        self.sharded_state = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        self._configure_deepspeed()
        self.editor, self.optimizer, self.lr_scheduler = acc.prepare(editor, optimizer, lr_scheduler)
        self.step = 0
        self.samples_seen = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.pending_metrics: dict = {}
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.guard = NonFiniteGuard(inner, tcfg.max_bad_steps, acc.device, window=tcfg.log_every,
                                    sync_free=not self.sharded_state and NonFiniteGuard.supports_sync_free(inner))
        self.ema = None
        if tcfg.get("ema_decay"):
            if self._zero_stage() == 3:
                raise ValueError("trainer.ema_decay: an EMA needs whole weights on each rank; ZeRO-3 partitions "
                                 "them (use launcher=deepspeed_zero2 or set trainer.ema_decay=null)")
            self.ema = EMA(acc.unwrap_model(self.editor), tcfg.ema_decay, "cpu" if tcfg.get("ema_cpu") else None)
        self._grid_rows, self._grid_path = [], None  # the latest sample grid (end-of-run summary)
        self.flops_per_step: int | None = None
        self.peak_tflops = device_peak_tflops(tcfg.get("peak_tflops"))
        self.wandb = None
        self.stop_requested = self.preempted = False
        self._stop_vote: torch.Tensor | None = None  # the ranks' previous stop vote (see _should_stop)
        self._install_signal_handlers()
        self._register_process()

        length = None if self.conditioner is None else self.conditioner.sequence_length  # pre-encoded: in the json
        text_multiple = models.editor.text_pad_multiple
        self.region_weighting = cfg.objective.get("region_weighting", "none")
        stream = BucketStream(
            sets, tcfg.micro_batch_size, rank=acc.process_index, world_size=acc.num_processes, seed=tcfg.seed,
            shuffle_buffer=dcfg.shuffle_buffer, bucket_base=dcfg.bucket_base, source_pixels=dcfg.get("source_pixels"),
            max_skip_rate=dcfg.max_skip_rate, square_only=dcfg.get("square_only", False), encoded=pre_encoded,
            text_key=TextBucketKey(text_multiple, length, dcfg.get("source_pixels")) if text_multiple > 1 else None,
            decode_threads=dcfg.get("decode_threads", 0),
            regions=self.region_weighting != "none" and not pre_encoded,
        )
        self.batches = ResumableLoader(stream, num_workers=dcfg.num_workers)
        self._maybe_resume()
        self._warn_if_disk_is_short(params)

    # ------------------------------------------------------------------ state
    def _describe_setup(self) -> str:
        """'single process on cpu', 'DDP, 2 processes on cpu', 'DeepSpeed ZeRO-3, 8 processes on cuda', ..."""
        acc = self.accelerator
        kind = acc.distributed_type
        if kind == DistributedType.NO:
            return f"single process on {acc.device.type}"
        name = {DistributedType.DEEPSPEED: f"DeepSpeed ZeRO-{self._zero_stage()}", DistributedType.FSDP: "FSDP"}.get(
            kind, "DDP")
        return f"{name}, {acc.num_processes} process{'es' if acc.num_processes > 1 else ''} on {acc.device.type}"

    def _zero_stage(self) -> int | None:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin.deepspeed_config.get("zero_optimization", {}).get("stage") if plugin else None

    def _configure_deepspeed(self) -> None:
        """Our batch arithmetic and clipping, not the launcher file's, decide DeepSpeed's batch settings."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        tcfg = self.cfg.trainer
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "train_batch_size": tcfg.global_batch_size,
            "gradient_clipping": self.cfg.optim.grad_clip,
        })
        # ZeRO-3 must gather the partitioned weights for model.safetensors in each checkpoint
        plugin.deepspeed_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole, on the main process (called on every rank: ZeRO-3/FSDP gather)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.editor)
        if not self.sharded_state:
            return ckpt.trainable_state(model)
        names = ckpt.saved_names(model)
        state = acc.get_state_dict(self.editor)
        if not acc.is_main_process:
            return {}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k in names}

    def _check_writable(self) -> None:
        """Checkpoints go under the run directory: a directory that cannot take them fails now, not at the
        first save hours later."""
        import socket

        probe = self.checkpoint_root / f".write-test-{socket.gethostname()}-{self.accelerator.process_index}"
        try:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise CheckpointError(f"the run directory {self.run_dir} cannot hold checkpoints ({err}); give a "
                                  "writable hydra.run.dir") from None

    def _resume_candidates(self) -> list[Path]:
        """The checkpoints trainer.resume may continue from, newest first: `auto` (this run's), a run directory
        or one checkpoint; checked against this run's model config before any model loads."""
        resume = self.cfg.trainer.get("resume")
        if not resume:
            return []
        path = self.checkpoint_root if resume == "auto" else Path(resume).expanduser()
        if resume != "auto" and ckpt.is_checkpoint(path):
            candidates = [path]
        else:
            root = path if resume == "auto" else path / "checkpoints"
            if resume != "auto" and not root.is_dir():
                raise CheckpointError(f"trainer.resume={resume}: not a checkpoint (model.safetensors + "
                                      "train_state.json) nor a run directory with checkpoints/")
            candidates = ckpt.complete_checkpoints(root)[::-1]
            if not candidates:
                if resume != "auto":
                    raise CheckpointError(f"trainer.resume={resume}: no complete checkpoint in {root}"
                                          f"{ckpt.unfinished(root)}")
                log.info("trainer.resume=auto: no complete checkpoint in %s%s; starting at step 0", root,
                         ckpt.unfinished(root))
        for candidate in candidates:  # the newest readable record of the config decides
            try:
                saved = ckpt.load_train_state(candidate)["config"]
            except (OSError, ValueError, KeyError):
                continue  # damaged: skipped, with the reason, when loading
            mismatch = ckpt.config_mismatch(saved, self.cfg.model)
            if mismatch:
                raise CheckpointError(f"trainer.resume={resume}: {candidate} was trained with another model config "
                                      f"({'; '.join(mismatch)}); resume with that run's settings or start a new "
                                      "run directory")
            break
        return candidates

    def _read_resume_state(self, path: Path) -> dict:
        """Everything a resume needs from `path`, read into memory before anything is applied. All ranks agree:
        a checkpoint that fails on any of them is skipped by all."""
        error, state = None, {}
        try:
            ckpt.check_files(path)
            if self.sharded_state and not (path / "engine").is_dir():
                raise CheckpointError(f"{path}: no engine/ state; it was written without DeepSpeed/FSDP, which "
                                      "this run uses (resume it with the launcher it was trained with)")
            names = ["rng"] + ([] if self.sharded_state else ["optimizer", "scheduler"])
            names += ["ema"] if self.ema is not None and (path / "ema.pt").exists() else []
            state = {name: ckpt.load_extra(path, name) for name in names}
            state["train"] = ckpt.load_train_state(path)
            if not self.sharded_state:
                state["weights"] = load_file(path / ckpt.MODEL_FILE)
        except CheckpointError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - any reader's error means this checkpoint does not load
            error = f"{path}: {type(err).__name__}: {err}"
        errors = [e for e in gather_object([error]) if e]
        if errors:
            raise CheckpointError(errors[0])
        return state

    def _maybe_resume(self) -> None:
        if not self.resume_from:
            return
        path, loaded = ckpt.first_loadable(self.resume_from, self._read_resume_state)
        if self.sharded_state:  # weights, optimizer and schedule from every rank's shards
            self.accelerator.load_state(path / "engine")
        else:
            ckpt.load_model_weights(self.accelerator.unwrap_model(self.editor), path, loaded["weights"])
            try:
                self.optimizer.load_state_dict(loaded["optimizer"])
                self.lr_scheduler.load_state_dict(loaded["scheduler"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{path}: its optimizer state does not fit this run ({err}); was it trained "
                                      "with another optim.name or model.trainable?") from None
        state = loaded["train"]
        rank = self.accelerator.process_index
        if self.cfg.trainer.get("resume_data", True):  # another world size is reported by load_state_dict
            self.batches.load_state_dict(state["data"][min(rank, len(state["data"]) - 1)])
        if len(loaded["rng"]) == self.accelerator.num_processes:
            ckpt.set_rng_state(loaded["rng"][rank])
        if "ema" in loaded:
            self.ema.load_state_dict(loaded["ema"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.guard.skipped.fill_(state.get("skipped_steps", 0))
        self.guard.reported = state.get("skipped_steps", 0)
        # counted at step 1 and carried along: counting again would wrap a different step in the
        # counter's dispatch mode, which may pick other kernels and break the bit-exact trajectory
        self.flops_per_step = state.get("flops_per_step")
        log.info("resumed from %s at step %d", path, self.step)

    def _warn_if_disk_is_short(self, params: list[torch.Tensor]) -> None:
        """A checkpoint holds the trainable weights, two AdamW moments (and an EMA): warn now when the run
        directory's disk cannot take one."""
        if not self.accelerator.is_main_process:
            return
        copies = 3 + (self.ema is not None)
        needed = copies * sum(p.numel() * p.element_size() for p in params)
        free = shutil.disk_usage(self.checkpoint_root).free
        if free < needed:
            log.warning("the run directory %s has %.1f GB free; a checkpoint of this run needs about %.1f GB: saving "
                        "will fail unless space is freed", self.run_dir, free / 1e9, needed / 1e9)

    def save_checkpoint(self) -> Path | None:
        with self.timer("checkpoints"):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path | None:
        """All ranks take part: positions and RNG are gathered, DeepSpeed/FSDP shards written by each rank,
        then the main process writes the rest and commits the directory by rename."""
        acc = self.accelerator
        data_states = gather_object([self.batches.state_dict()])  # every rank's data position
        rng_states = gather_object([ckpt.rng_state()])
        tmp = ckpt.staging_dir(self.checkpoint_root, self.step)
        error = None  # a full disk or quota: reported by every rank, the previous checkpoint stays the newest
        if acc.is_main_process:
            try:
                ckpt.stage(self.checkpoint_root, self.step)
            except OSError as err:
                error = err
        acc.wait_for_everyone()
        extra = {"rng": rng_states}
        if self.sharded_state:
            try:
                acc.save_state(tmp / "engine")
            except OSError as err:
                error = error or err
        else:
            extra.update(optimizer=self.optimizer.state_dict(), scheduler=self.lr_scheduler.state_dict())
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        weights = self._trainable_weights()
        path = None
        if acc.is_main_process and error is None:
            try:
                ckpt.write(tmp, self.step, weights, extra, train_state={
                    "step": self.step, "samples_seen": self.samples_seen, "data": data_states,
                    "skipped_steps": self.guard.skipped_steps, "flops_per_step": self.flops_per_step,
                    "world_size": acc.num_processes, "config": OmegaConf.to_container(self.cfg, resolve=True)})
                path = ckpt.commit(tmp, self.step, self.cfg.trainer.keep_last)
            except OSError as err:
                error = err
        errors = [str(e) for e in gather_object([error]) if e]
        if errors:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # the partial save would only take space
            latest = ckpt.latest_checkpoint(self.checkpoint_root)
            raise CheckpointError(f"could not write the checkpoint of step {self.step} to {self.checkpoint_root} "
                                  f"({errors[0]}); the newest complete checkpoint is {latest or 'none'}. Free space "
                                  "(or give a writable hydra.run.dir), then continue with trainer.resume=auto")
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ step
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rectified-flow loss of one micro-batch: (mean loss, per-sample losses, sigmas); None when the
        encoders refused every sample of it (counted as skips)."""
        obj = self.cfg.objective
        device = self.accelerator.device
        batch = condition_dropout(batch, obj.drop_text, obj.drop_image, obj.drop_both)
        with self.timer("encoding"):  # the frozen VAE and Qwen (cached or pre-encoded samples cost ~nothing)
            encoded = self.encoder(batch, device)
        if encoded is None:
            return None
        x0, source, states, mask, padded = encoded
        target_tokens = x0.shape[2] * x0.shape[3] // 4
        mu = flow.resolution_mu(target_tokens) if obj.resolution_shift else None
        sigmas = flow.sample_sigmas(x0.shape[0], obj.sigma_sampling, obj.logit_mean, obj.logit_std, mu=mu,
                                    device=device, mode_scale=obj.mode_scale)
        noise = torch.randn_like(x0)
        guidance = torch.full((x0.shape[0],), float(obj.guidance), device=device)
        region_weight = None
        if self.region_weighting != "none":
            region = batch_region(batch, x0.shape[-2:])
            region_weight = flow.region_weights(self.region_weighting, region).to(device, non_blocking=True)
        loss, losses = flow.training_loss(self.editor, x0, noise, sigmas, source, states, mask, guidance,
                                          obj.loss_weighting, padded, region_weight)
        return loss, losses, sigmas

    def _register_process(self) -> None:
        """Pid file per host and rank (the SLURM template signals exactly these); clear a PREEMPTED marker."""
        import os
        import socket

        import atexit

        pids = self.run_dir / ".pids"
        pids.mkdir(parents=True, exist_ok=True)
        pid_file = pids / f"{socket.gethostname()}-{self.accelerator.process_index}"
        pid_file.write_text(str(os.getpid()))
        atexit.register(pid_file.unlink, missing_ok=True)
        if self.accelerator.is_main_process:
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)

    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption) ask for a clean stop."""
        def request_stop(signum, frame):
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
            self.stop_requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def _should_stop(self, start_step: int) -> bool:
        """Whether every rank stops at this step boundary (a signal reached one of them, or trainer.stop_after).
        On an accelerator the ranks' vote is read one boundary late: reading it then waits only for the
        previous step, whose successor is already queued, so the device never idles for it."""
        acc, tcfg = self.accelerator, self.cfg.trainer
        if tcfg.get("stop_after") and self.step - start_step >= tcfg.stop_after:
            return True  # the same on every rank: no vote needed
        if acc.num_processes == 1:
            return self.stop_requested
        # torch.full fills on the device (torch.tensor(x, device=...) would copy from the host and wait)
        vote = acc.reduce(torch.full((), float(self.stop_requested), device=acc.device), "max")
        if acc.device.type == "cpu":
            return bool(vote)
        previous, self._stop_vote = self._stop_vote, vote
        return previous is not None and bool(previous)

    def _optimizer_step(self, loss_sum: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Clip, judge, step: an update with a non-finite loss or gradient norm on any rank is skipped and
        counted (editflow/guard.py; without a host sync when the optimizer is fused AdamW)."""
        acc = self.accelerator
        grad_norm = acc.clip_grad_norm_(self.editor.parameters(), self.cfg.optim.grad_clip)
        if not torch.is_tensor(grad_norm):  # DeepSpeed clipped and stepped in backward (skipping non-finite steps)
            grad_norm = torch.tensor(float("nan") if grad_norm is None else grad_norm, device=acc.device)
        finite = acc.reduce((torch.isfinite(grad_norm) & torch.isfinite(loss_sum)).float(), "min")
        if self.guard.verdict(finite, self.step + 1, keys):
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.editor), weight=finite if self.guard.sync_free else None)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _next_batch(self, step_start: int) -> dict:
        try:
            return next(self.batches)
        except DataError as err:
            raise self._stopped_by_data(err, step_start) from None

    def _stopped_by_data(self, err: DataError, step_start: int) -> DataError:
        """The data failed (past data.max_skip_rate, a set that yields nothing): the run stops with a
        checkpoint of the last finished step, and the error says where it is."""
        latest = ckpt.latest_checkpoint(self.checkpoint_root)
        if self.accelerator.num_processes > 1:  # the other ranks are inside the step: the launcher stops them
            return DataError(f"{err}. The newest checkpoint is {latest or 'none'}")
        if self.step == 0 or (latest is not None and latest.name == ckpt.step_dir(latest.parent, self.step).name):
            return DataError(f"{err}. Nothing to save since {latest or 'the start'}")
        self.optimizer.zero_grad(set_to_none=True)  # the unfinished step is redone after a resume
        self.batches.batches_yielded = step_start
        path = self.save_checkpoint()
        return DataError(f"{err}. The run stopped with a checkpoint of step {self.step} ({path}); after fixing the "
                         "data continue with trainer.resume=auto")

    def _forward_backward(self, batch: dict, step_start: int):
        """Loss and backward of a micro-batch; one whose every sample the encoders refuse is replaced by the
        next (returned with the result)."""
        try:
            while (result := self.compute_loss(batch)) is None:
                batch = next(self.batches)
        except DataError as err:
            raise self._stopped_by_data(err, step_start) from None
        loss, losses, sigmas = result
        self.accelerator.backward(loss)
        return loss, losses, sigmas, batch

    def _init_wandb(self) -> None:
        lcfg = self.cfg.get("logging", {})
        if not (self.accelerator.is_main_process and lcfg.get("wandb", False)):
            return
        import wandb

        self.wandb = wandb.init(project=lcfg.get("project", "editflow"), name=lcfg.get("name"), dir=str(self.run_dir),
                                mode=lcfg.get("wandb_mode", "offline"), resume="allow",
                                id=lcfg.get("run_id") or self.run_dir.name,
                                config=OmegaConf.to_container(self.cfg, resolve=True))

    def train(self) -> dict:
        acc, tcfg = self.accelerator, self.cfg.trainer
        self._init_wandb()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.editor.train()
        bar = tqdm(total=tcfg.max_steps, initial=self.step, desc="train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        window_loss = torch.zeros((), device=acc.device)
        window_count = torch.zeros((), device=acc.device)
        window_start, window_samples = time.time(), 0
        bins = torch.zeros(2, 4, device=acc.device)
        start_step = self.step
        self.timer.begin("training steps")  # ended before the end-of-run work (checkpoint, evaluation)
        while self.step < tcfg.max_steps:
            loss_sum, keys = torch.zeros((), device=acc.device), []
            step_start = self.batches.batches_yielded
            for _ in range(self.accumulation):
                batch = self._next_batch(step_start)
                with acc.accumulate(self.editor):
                    if self.flops_per_step is None:  # count the real step's FLOPs once (step 1), for MFU
                        (loss, losses, sigmas, batch), flops = count_step_flops(
                            lambda: self._forward_backward(batch, step_start))
                        self.flops_per_step = flops * self.accumulation * acc.num_processes
                    else:
                        loss, losses, sigmas, batch = self._forward_backward(batch, step_start)
                    keys += batch["key"]
                    loss_sum += loss.detach()
                    if acc.sync_gradients:
                        grad_norm = self._optimizer_step(loss_sum, keys)
                finite = torch.isfinite(loss.detach())
                window_loss += torch.where(finite, loss.detach(), 0.0)
                window_count += finite.float()
                window_samples += len(batch["key"]) * acc.num_processes
                bins += flow.sigma_bin_losses(torch.nan_to_num(losses, 0.0, 0.0, 0.0), sigmas)
            self.step += 1
            self.samples_seen += tcfg.global_batch_size
            bar.update(1)
            if self.step % tcfg.log_every == 0 or self.step == tcfg.max_steps:
                self.guard.check()
                totals = acc.reduce(torch.stack([window_loss, window_count]), "sum").tolist()  # log steps only
                mean_loss = totals[0] / totals[1] if totals[1] else float("nan")
                elapsed = time.time() - window_start
                record = {
                    "step": self.step,
                    "loss": mean_loss,
                    "lr": float(self.lr_scheduler.get_last_lr()[0]),  # a tensor for some optimizers (torchao)
                    "grad_norm": float(grad_norm),
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                    "samples_seen": self.samples_seen,
                    "skipped_steps": self.guard.skipped_steps,
                }
                if self.flops_per_step:
                    steps_in_window = window_samples / max(1, tcfg.global_batch_size)
                    tflops = self.flops_per_step * steps_in_window / max(elapsed, 1e-9) / 1e12
                    record["tflops_per_s"] = tflops / acc.num_processes  # per device
                    if self.peak_tflops:
                        record["mfu"] = record["tflops_per_s"] / self.peak_tflops
                loss_totals, counts = bins.tolist()
                record.update({f"loss/sigma_{name}": t / c for name, t, c in
                               zip(flow.sigma_bin_names(), loss_totals, counts) if c})
                skipped = Counter(batch.get("skipped", {})) + Counter(self.encoder.skips.counts)  # reading + encoding
                record.update({f"data/skipped_{reason}": n for reason, n in skipped.items()})
                record.update(self.pending_metrics)
                self.pending_metrics = {}
                if acc.is_main_process:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if self.wandb is not None:
                        self.wandb.log(record, step=self.step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{record['samples_per_s']:.1f}")
                window_loss.zero_()
                window_count.zero_()
                window_start, window_samples = time.time(), 0
                bins.zero_()
            if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and self.step < tcfg.max_steps:
                self.save_checkpoint()
            if self.cfg.eval.get("every") and self.step % self.cfg.eval.every == 0 and self.step < tcfg.max_steps:
                self.run_eval()  # its numbers go out with the next logged step
                self.editor.train()
            if self._should_stop(start_step) and self.step < tcfg.max_steps:
                bar.close()
                self.timer.end()
                self.save_checkpoint()
                log.warning("stopped at step %d with a checkpoint; resume with trainer.resume=auto", self.step)
                if acc.is_main_process:  # tells the SLURM template to requeue
                    (self.run_dir / "PREEMPTED").write_text(str(self.step))
                self.preempted = True
                return {}
        bar.close()
        self.timer.end()
        if self.step > start_step or ckpt.latest_checkpoint(self.checkpoint_root) is None:
            self.save_checkpoint()
        result = self.finish(self.step - start_step)
        if self.wandb is not None:
            if result:
                self.wandb.summary.update({f"eval/{k}": v for k, v in result["model"].items() if "/" not in k})
            self.wandb.finish()
        if acc.is_main_process:  # the last thing on the terminal
            print((self.run_dir / "summary.txt").read_text(), flush=True)
        return result

    # ------------------------------------------------------------------ end of run
    def pipeline(self) -> EditPipeline:
        if self.conditioner is None:  # trained on pre-encoded data: the frozen models are needed only now
            with frozen_models_unpartitioned(self.accelerator):
                self.conditioner, self.codec = build_frozen(self.cfg.model)
        return EditPipeline(self.accelerator.unwrap_model(self.editor), self.conditioner, self.codec, self.scheduler,
                            sample_guidance(self.cfg))

    def finish(self, steps: int) -> dict:
        """Final evaluation, then summary.txt (printed at the very end): where the results are, the model
        against copy-the-source per kind of edit, the time by phase, and the commands to run next."""
        result = self.run_eval()
        if self.accelerator.is_main_process:
            example = None
            if self._grid_rows:  # a held-out source to try `editflow edit` on
                sample = self._grid_rows[0]
                image = self.run_dir / "example-source.png"
                sample.source.save(image)
                example = (image, sample.instruction)
            text = summary(self.run_dir, ckpt.latest_checkpoint(self.checkpoint_root), self._grid_path, result,
                           self.timer.seconds, steps, example)
            (self.run_dir / "summary.txt").write_text(text)
        return result

    def run_eval(self) -> dict:
        with self.timer("evaluation"):
            return self._run_eval()

    def _run_eval(self) -> dict:
        """Edit the held-out samples: eval.json, a sample grid, and `eval/*` in metrics.jsonl (main process)."""
        acc, ecfg = self.accelerator, self.cfg.eval
        result = {}
        # ZeRO-3 gathers each layer's weights from all ranks as it runs: every rank must run the edits
        editing = acc.is_main_process or self._zero_stage() == 3
        if editing and self.val_urls and ecfg.num_samples:
            if not hasattr(self, "_val_samples"):
                self._val_samples = read_samples(self.val_urls, ecfg.num_samples)
            samples = self._val_samples
            self.editor.eval()
            pipe = self.pipeline()
            # with an EMA, the averaged weights are the ones evaluated (and the ones a checkpoint's ema.pt holds)
            averaged = self.ema.applied(pipe.editor) if self.ema is not None else contextlib.nullcontext()
            with averaged:
                result, edits = evaluate_guidances(
                    samples, lambda g: make_edit_fn(pipe, self.cfg.data.bucket_base, ecfg.steps, g, ecfg.seed),
                    guidance_values(ecfg.guidance), batch_size=ecfg.batch_size)
            if not acc.is_main_process:
                result = {}
        if result:
            result["step"] = self.step
            if self.ema is not None:  # the scores are the averaged weights'
                result["ema_decay"] = self.ema.decay
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=1))
            scored = [s for s in samples if s.source is not None]  # `edits` has one image per scored sample
            picks = grid_picks(scored, ecfg.grid_rows)
            self._grid_rows = [scored[i] for i in picks]
            grid = sample_grid(self._grid_rows, [edits[i] for i in picks])
            self._grid_path = self.run_dir / f"samples-step{self.step:07d}.png"
            grid.save(self._grid_path)
            if self.wandb is not None:
                import wandb

                self.wandb.log({"samples": wandb.Image(grid, caption="source | target | edit")}, step=self.step)
            primary = result["primary"]
            # logged with the next training record (metrics.jsonl rows always carry step and loss)
            self.pending_metrics.update(eval_metrics(result))
            log.info("eval: model %s=%.4f, copy-source baseline %.4f", primary, result["model"][primary],
                     result["baseline"][primary])
        acc.wait_for_everyone()
        return result
