"""The training loop: owns models, optimizer, schedule, data stream, logging and checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from editflow import checkpoint as ckpt
from editflow import flow
from editflow.data.encoded import check_pre_encoded
from editflow.data.loader import read_samples
from editflow.data.regions import batch_region
from editflow.data.sources import split_urls, train_sets
from editflow.data.stream import BucketStream, ResumableLoader
from editflow.ema import EMA
from editflow.encoding import FrozenEncoder, condition_dropout
from editflow.eval import evaluate, grid_picks, sample_grid
from editflow.guard import NonFiniteGuard
from editflow.throughput import count_step_flops, device_peak_tflops
from editflow.models.build import (build_frozen, build_models, check_attention_backend, compile_blocks,
                                   keep_trainable_in_fp32)
from editflow.pipeline import EditPipeline
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
        # Pre-encoded data: Qwen and the VAE serve only evaluation; they are loaded then, into host memory.
        qwen_dim = sets[0].encoding.get("qwen_hidden_size") if pre_encoded else None
        with frozen_models_unpartitioned(acc), self.timer("models"):
            models = build_models(cfg.model, seed=tcfg.seed, training=True, qwen_dim=qwen_dim).to(acc.device)
        check_attention_backend(models.editor, acc.device, models.editor.transformer.dtype)
        self.conditioner, self.codec, self.scheduler = models.conditioner, models.codec, models.scheduler
        self.encoder = FrozenEncoder(self.codec, self.conditioner, cache=tcfg.get("cache_encodings", False))
        editor = models.editor
        if cfg.model.get("compile_blocks"):
            if acc.device.type == "cuda":
                compile_blocks(editor.transformer)
            else:
                log.info("model.compile_blocks: skipped on %s (compiling pays on CUDA only)", acc.device)
        if acc.distributed_type != DistributedType.DEEPSPEED:
            keep_trainable_in_fp32(editor, cfg.model)
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
        self.checkpoint_root = self.run_dir / "checkpoints"
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

        self.region_weighting = cfg.objective.get("region_weighting", "none")
        stream = BucketStream(
            sets, tcfg.micro_batch_size, rank=acc.process_index, world_size=acc.num_processes, seed=tcfg.seed,
            shuffle_buffer=dcfg.shuffle_buffer, bucket_base=dcfg.bucket_base, source_pixels=dcfg.get("source_pixels"),
            max_skip_rate=dcfg.max_skip_rate, square_only=dcfg.get("square_only", False), encoded=pre_encoded,
            regions=self.region_weighting != "none" and not pre_encoded,
        )
        self.batches = ResumableLoader(stream, num_workers=dcfg.num_workers)
        self._maybe_resume()

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
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = acc.get_state_dict(self.editor)
        if not acc.is_main_process:
            return {}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k in names}

    def _maybe_resume(self) -> None:
        resume = self.cfg.trainer.get("resume")
        if not resume:
            return
        path = ckpt.latest_checkpoint(self.checkpoint_root) if resume == "auto" else Path(resume)
        if path is None:
            return
        if self.sharded_state:  # weights, optimizer and schedule from every rank's shards
            if not (path / "engine").is_dir():
                raise FileNotFoundError(f"{path}: no engine/ state; it was written without DeepSpeed/FSDP, which "
                                        "this run uses (resume it with the launcher it was trained with)")
            self.accelerator.load_state(path / "engine")
        else:
            ckpt.load_model_weights(self.accelerator.unwrap_model(self.editor), path)
            self.optimizer.load_state_dict(ckpt.load_extra(path, "optimizer"))
            self.lr_scheduler.load_state_dict(ckpt.load_extra(path, "scheduler"))
        state = ckpt.load_train_state(path)
        rank = self.accelerator.process_index
        if self.cfg.trainer.get("resume_data", True):
            self.batches.load_state_dict(state["data"][rank])
        rng = ckpt.load_extra(path, "rng")
        if len(rng) == self.accelerator.num_processes:
            ckpt.set_rng_state(rng[rank])
        if self.ema is not None and (path / "ema.pt").exists():
            self.ema.load_state_dict(ckpt.load_extra(path, "ema"))
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.guard.skipped.fill_(state.get("skipped_steps", 0))
        self.guard.reported = state.get("skipped_steps", 0)
        # counted at step 1 and carried along: counting again would wrap a different step in the
        # counter's dispatch mode, which may pick other kernels and break the bit-exact trajectory
        self.flops_per_step = state.get("flops_per_step")
        log.info("resumed from %s at step %d", path, self.step)

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
        if acc.is_main_process:
            ckpt.stage(self.checkpoint_root, self.step)
        acc.wait_for_everyone()
        extra = {"rng": rng_states}
        if self.sharded_state:
            acc.save_state(tmp / "engine")
        else:
            extra.update(optimizer=self.optimizer.state_dict(), scheduler=self.lr_scheduler.state_dict())
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        weights = self._trainable_weights()
        path = None
        if acc.is_main_process:
            ckpt.write(tmp, self.step, weights, extra, train_state={
                "step": self.step, "samples_seen": self.samples_seen, "data": data_states,
                "skipped_steps": self.guard.skipped_steps, "flops_per_step": self.flops_per_step,
                "world_size": acc.num_processes, "config": OmegaConf.to_container(self.cfg, resolve=True)})
            path = ckpt.commit(tmp, self.step, self.cfg.trainer.keep_last)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ step
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified-flow loss of one micro-batch: (mean loss, per-sample losses, sigmas)."""
        obj = self.cfg.objective
        device = self.accelerator.device
        batch = condition_dropout(batch, obj.drop_text, obj.drop_image, obj.drop_both)
        with self.timer("encoding"):  # the frozen VAE and Qwen (cached or pre-encoded samples cost ~nothing)
            x0, source, states, mask, padded = self.encoder(batch, device)
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

    def _forward_backward(self, batch: dict):
        loss, losses, sigmas = self.compute_loss(batch)
        self.accelerator.backward(loss)
        return loss, losses, sigmas

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
            for _ in range(self.accumulation):
                batch = next(self.batches)
                keys += batch["key"]
                with acc.accumulate(self.editor):
                    if self.flops_per_step is None:  # count the real step's FLOPs once (step 1), for MFU
                        (loss, losses, sigmas), flops = count_step_flops(lambda: self._forward_backward(batch))
                        self.flops_per_step = flops * self.accumulation * acc.num_processes
                    else:
                        loss, losses, sigmas = self._forward_backward(batch)
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
                record.update({f"data/skipped_{reason}": n for reason, n in batch.get("skipped", {}).items()})
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
        return EditPipeline(self.accelerator.unwrap_model(self.editor), self.conditioner, self.codec, self.scheduler)

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
            from editflow.evaluate_cli import make_edit_fn

            if not hasattr(self, "_val_samples"):
                self._val_samples = read_samples(self.val_urls, ecfg.num_samples)
            samples = self._val_samples
            self.editor.eval()
            edit = make_edit_fn(self.pipeline(), self.cfg.data.bucket_base, ecfg.steps, ecfg.guidance, ecfg.seed)
            result, edits = evaluate(samples, edit, batch_size=ecfg.batch_size)
            if not acc.is_main_process:
                result = {}
        if result:
            result["step"] = self.step
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
            self.pending_metrics.update({f"eval/{k}": v for k, v in result["model"].items() if "/" not in k})
            self.pending_metrics[f"eval/baseline_{primary}"] = result["baseline"][primary]
            log.info("eval: model %s=%.4f, copy-source baseline %.4f", primary, result["model"][primary],
                     result["baseline"][primary])
        acc.wait_for_everyone()
        return result
