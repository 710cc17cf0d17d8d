"""The training loop: `Trainer.train` -> `train_step` -> `forward_backward`, over parts that each have a
module: distributed.py (Accelerator, DeepSpeed), optim.py (optimizer, schedule), checkpointer.py (what
is saved and restored), preemption.py (stopping cleanly), metrics.py (metrics.jsonl, wandb, progress)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from omegaconf import DictConfig, OmegaConf

from editflow import checkpoint as ckpt
from editflow import flow
from editflow.checkpointer import Checkpointer
from editflow.data.batches import Batch
from editflow.data.preencoded import check_pre_encoded
from editflow.data.regions import batch_region
from editflow.data.shards import read_samples
from editflow.data.skips import SkipCounter
from editflow.data.sources import split_urls, train_sets
from editflow.data.stream import BucketStream, ResumableLoader
from editflow.distributed import (configure_deepspeed, describe, frozen_models_unpartitioned, make_accelerator,
                                  shards_state, zero_stage)
from editflow.ema import EMA
from editflow.errors import DataError
from editflow.evaluation import (eval_metrics, evaluate_guidances, grid_picks, guidance_values, make_edit_fn,
                                 sample_grid)
from editflow.frozen_encoders import FrozenEncoder, TextBucketKey, calibration_states, condition_dropout
from editflow.guard import NonFiniteGuard
from editflow.metrics import MetricsWindow, RunLog
from editflow.models.attention import check_attention_backend
from editflow.models.build import build_frozen, build_models, compile_blocks, keep_trainable_in_fp32
from editflow.models.connector_start import start_connector
from editflow.optim import build_optimizer, build_schedule
from editflow.pipeline import EditPipeline, sample_guidance
from editflow.preemption import Preemption
from editflow.run_summary import PhaseTimer, process_times, summary
from editflow.throughput import count_step_flops, device_peak_tflops, flop_rates
from editflow.config import check_world_size

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Progress:
    """The run's counters (saved in train_state.json)."""

    step: int = 0
    samples_seen: int = 0
    # counted at step 1 and carried along: counting again would wrap a different step in the counter's
    # dispatch mode, which may pick other kernels and break the bit-exact trajectory of a resumed run
    flops_per_step: int | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.flops_per_step = state.get("flops_per_step")


def warn_if_slow_on_cpu(bucket_base: int, downsample: int, limit: int = 1024) -> None:
    """Say so up front when the images make CPU steps take minutes (e.g. data=shards' 1024-px buckets with the
    tiny model): otherwise the run sits at step 0, and a first Ctrl-C or SIGTERM waits for the step to end."""
    tokens = (bucket_base // (2 * downsample)) ** 2  # packed 2x2 latent patches per image
    if tokens > limit:
        log.warning("data.bucket_base=%d: %d image tokens per image (and as many for the source) on the CPU, where "
                    "one step may take minutes; the CPU default trains at 64 px (data.bucket_base=64)",
                    bucket_base, tokens)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        tcfg = cfg.trainer
        self.accelerator = acc = make_accelerator(tcfg)
        self.accumulation = check_world_size(cfg, acc.num_processes)  # before any model loads
        acc.gradient_accumulation_steps = self.accumulation
        log.info("%s; micro-batch %d x accumulation %d x %d process(es) = global batch %d", describe(acc),
                 tcfg.micro_batch_size, self.accumulation, acc.num_processes, tcfg.global_batch_size)
        set_seed(tcfg.seed, device_specific=True)  # per-rank noise and sigmas
        self.timer = PhaseTimer()  # wall time by phase, for the end-of-run summary

        # data, the run directory and what to resume from are checked before any model loads
        sets, pre_encoded = self._index_data()
        checkpoints = self.run_dir / "checkpoints"
        ckpt.check_writable(checkpoints, self.run_dir, acc.process_index)
        resume_from = ckpt.resume_candidates(tcfg.resume, checkpoints, cfg.model)
        editor = self._build_editor(sets, pre_encoded, start_connector_now=not resume_from)
        params = [p for p in editor.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.optim)
        schedule = build_schedule(optimizer, cfg.optim, tcfg.max_steps)
        sharded = shards_state(acc)
        configure_deepspeed(acc, tcfg.micro_batch_size, self.accumulation, tcfg.global_batch_size, cfg.optim.grad_clip)
        self.editor, self.optimizer, self.lr_scheduler = acc.prepare(editor, optimizer, schedule)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.guard = NonFiniteGuard(inner, tcfg.max_bad_steps, acc.device, window=tcfg.log_every,
                                    sync_free=not sharded and NonFiniteGuard.supports_sync_free(inner))
        self.ema = self._build_ema()
        self.progress = Progress()
        self.window = MetricsWindow(acc.device)
        self.peak_tflops = device_peak_tflops(tcfg.peak_tflops)
        self.preemption = Preemption(acc, self.run_dir, tcfg.stop_after)
        self.region_weighting = cfg.objective.region_weighting
        self.batches = self._build_loader(sets, pre_encoded, editor.text_pad_multiple)
        self._grid_rows, self._grid_path = [], None  # the latest sample grid (end-of-run summary)
        self._start_result, self._start_grid = {}, None  # eval.at_start: the model before its first step

        self.checkpointer = Checkpointer(checkpoints, acc, self.editor, sharded, tcfg.keep_last,
                                         OmegaConf.to_container(cfg, resolve=True))
        self.checkpointer.register("optimizer", self.optimizer, engine=True)
        self.checkpointer.register("scheduler", self.lr_scheduler, engine=True)
        self.checkpointer.register("rng", ckpt.ProcessRNG(), per_rank=True, optional=True)
        if self.ema is not None:
            self.checkpointer.register("ema", self.ema, optional=True)
        # another world size is refused by the loader's load_state_dict, unless trainer.resume_data=false
        self.checkpointer.register("data", self.batches, json=True, per_rank=True,
                                   restore=tcfg.resume_data)
        self.checkpointer.register("guard", self.guard, json=True)
        self.checkpointer.register("progress", self.progress, json=True)
        if resume_from:
            path = self.checkpointer.restore(resume_from)
            log.info("resumed from %s at step %d", path, self.step)
        # a checkpoint holds the trainable weights, two AdamW moments (and an EMA)
        copies = 3 + (self.ema is not None)
        self.checkpointer.warn_if_short_of_space(copies * sum(p.numel() * p.element_size() for p in params),
                                                 self.run_dir)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def preempted(self) -> bool:
        return self.preemption.preempted

    @property
    def interrupted(self) -> bool:
        return self.preemption.interrupted

    # ------------------------------------------------------------------ setup
    def _index_data(self) -> tuple[list, bool]:
        """The training sets (and the held-out shards), and whether they are pre-encoded."""
        acc, dcfg = self.accelerator, self.cfg.data
        with acc.main_process_first(), self.timer("toy data" if dcfg.kind == "toy" else "data index"):
            # rank 0 generates the toy set; the others then find it cached
            sets = train_sets(dcfg, progress=acc.is_main_process)
            self.val_urls = split_urls(dcfg, "val", progress=acc.is_main_process) if dcfg.val or \
                dcfg.kind == "toy" else []
        return sets, check_pre_encoded(sets, self.cfg)

    def _build_editor(self, sets: list, pre_encoded: bool, start_connector_now: bool):
        """The models; the trainable editor is returned (not yet prepared). Pre-encoded data: Qwen and the VAE
        serve only evaluation; they are loaded then, into host memory."""
        acc, cfg = self.accelerator, self.cfg
        qwen_dim = sets[0].encoding.get("qwen_hidden_size") if pre_encoded else None
        with frozen_models_unpartitioned(acc), self.timer("models"):
            models = build_models(cfg.model, seed=cfg.trainer.seed, training=True, qwen_dim=qwen_dim).to(acc.device)
        check_attention_backend(models.editor, acc.device, models.editor.transformer.dtype)
        self.conditioner, self.codec, self.scheduler = models.conditioner, models.codec, models.scheduler
        if acc.device.type == "cpu" and self.codec is not None:  # pre-encoded data loads no VAE for training
            warn_if_slow_on_cpu(cfg.data.bucket_base, self.codec.downsample)
        self.encoder = FrozenEncoder(self.codec, self.conditioner, cache=cfg.trainer.cache_encodings,
                                     text_pad_multiple=models.editor.text_pad_multiple,
                                     skips=SkipCounter(cfg.data.max_skip_rate, what="samples encoded by this process"))
        editor = models.editor
        if cfg.model.compile_blocks:
            if acc.device.type == "cuda":
                compile_blocks(editor.transformer)
            else:
                log.info("model.compile_blocks: skipped on %s (compiling pays on CUDA only)", acc.device)
        if acc.distributed_type != DistributedType.DEEPSPEED:
            keep_trainable_in_fp32(editor, cfg.model)
        if start_connector_now:  # a resumed run's checkpoint holds the connector
            with frozen_models_unpartitioned(acc):  # the base's CLIP (pooled start) is loaded whole, like Qwen
                start_connector(editor.connector, cfg.model.connector,
                                lambda: calibration_states(sets, self.conditioner))
        return editor

    def _build_ema(self) -> EMA | None:
        tcfg, acc = self.cfg.trainer, self.accelerator
        if not tcfg.ema_decay:
            return None
        if zero_stage(acc) == 3:  # a preset's EMA (the toy's) must not stop a ZeRO-3 launch of it
            log.warning("trainer.ema_decay=%s is not used: an EMA needs whole weights on each rank and ZeRO-3 "
                        "partitions them (launcher=deepspeed_zero2 keeps an EMA)", tcfg.ema_decay)
            return None
        return EMA(acc.unwrap_model(self.editor), tcfg.ema_decay, "cpu" if tcfg.ema_cpu else None)

    def _build_loader(self, sets: list, pre_encoded: bool, text_multiple: int) -> ResumableLoader:
        acc, dcfg, tcfg = self.accelerator, self.cfg.data, self.cfg.trainer
        length = None if self.conditioner is None else self.conditioner.sequence_length  # pre-encoded: in the json
        stream = BucketStream(
            sets, tcfg.micro_batch_size, rank=acc.process_index, world_size=acc.num_processes, seed=tcfg.seed,
            shuffle_buffer=dcfg.shuffle_buffer, bucket_base=dcfg.bucket_base, source_pixels=dcfg.source_pixels,
            max_skip_rate=dcfg.max_skip_rate, square_only=dcfg.square_only, encoded=pre_encoded,
            text_key=TextBucketKey(text_multiple, length, dcfg.source_pixels) if text_multiple > 1 else None,
            decode_threads=dcfg.decode_threads,
            regions=self.region_weighting != "none" and not pre_encoded,
        )
        return ResumableLoader(stream, num_workers=dcfg.num_workers, pin_memory=acc.device.type == "cuda")

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        tcfg = self.cfg.trainer
        self.run_log = RunLog(self.accelerator, self.run_dir, self.cfg, self.step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.editor.train()
        start_step = self.step
        if self.cfg.eval.at_start and self.step == 0:  # what the run starts from (not again on a resume)
            self._start_result, self._start_grid = self.run_eval(), self._grid_path
            self.run_log.pending = {}  # not logged as the first logged step's: eval.json keeps it as "start"
            self.editor.train()
        self.timer.begin("training steps")  # ended before the end-of-run work (checkpoint, evaluation)
        with self.preemption.graceful_ctrl_c():
            while self.step < tcfg.max_steps:
                grad_norm = self.train_step()
                self.run_log.bar.update(1)
                last = self.step == tcfg.max_steps
                if self.step % tcfg.log_every == 0 or last:
                    self._log_step(grad_norm)
                if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0 and not last:
                    self.save_checkpoint()
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and not last:
                    self.run_eval()  # its numbers go out with the next logged step
                    self.editor.train()
                if self.preemption.should_stop(self.step - start_step) and not last:
                    return self._stop_early()
        self.run_log.close()
        self.timer.end()
        if self.step > start_step or self.checkpointer.latest() is None:
            self.save_checkpoint()
        return self._end_of_run(self.step - start_step)

    def train_step(self) -> torch.Tensor:
        """One optimizer step: `accumulation` micro-batches forward and backward, then clip, judge and step.
        Returns the gradient norm."""
        acc = self.accelerator
        loss_sum, keys = torch.zeros((), device=acc.device), []
        step_start = self.batches.batches_yielded  # where the data position goes back to if the step fails
        for _ in range(self.accumulation):
            batch = self._next_batch(step_start)
            with acc.accumulate(self.editor):
                if self.progress.flops_per_step is None:  # count the real step's FLOPs once (step 1), for MFU
                    (loss, losses, sigmas, batch), flops = count_step_flops(
                        lambda: self.forward_backward(batch, step_start))
                    self.progress.flops_per_step = flops * self.accumulation * acc.num_processes
                else:
                    loss, losses, sigmas, batch = self.forward_backward(batch, step_start)
            keys += batch.keys
            loss_sum += loss.detach()
            self.window.add(loss.detach(), losses, sigmas, len(batch) * acc.num_processes)
        grad_norm = self._optimizer_step(loss_sum, keys)  # the last micro-batch synchronised the gradients
        self.progress.step += 1
        self.progress.samples_seen += self.cfg.trainer.global_batch_size
        return grad_norm

    def forward_backward(self, batch: Batch, step_start: int):
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

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Rectified-flow loss of one micro-batch: (mean loss, per-sample losses, sigmas); None when the
        encoders refused every sample of it (counted as skips)."""
        obj = self.cfg.objective
        device = self.accelerator.device
        batch = condition_dropout(batch, obj.drop_text, obj.drop_image, obj.drop_both)
        with self.timer("encoding"):  # the frozen VAE and Qwen (cached or pre-encoded samples cost ~nothing)
            encoded = self.encoder(batch, device)
        if encoded is None:
            return None
        x0, source, states, mask, padded, kept = encoded
        target_tokens = x0.shape[2] * x0.shape[3] // 4
        mu = flow.resolution_mu(target_tokens) if obj.resolution_shift else None
        sigmas = flow.sample_sigmas(x0.shape[0], obj.sigma_sampling, obj.logit_mean, obj.logit_std, mu=mu,
                                    device=device, mode_scale=obj.mode_scale)
        noise = torch.randn_like(x0)
        guidance = torch.full((x0.shape[0],), float(obj.guidance), device=device)
        region_weight = None
        if self.region_weighting != "none":
            region = batch_region(batch, x0.shape[-2:])[kept]  # the samples the encoders did not skip
            region_weight = flow.region_weights(self.region_weighting, region).to(device, non_blocking=True)
        loss, losses = flow.training_loss(self.editor, x0, noise, sigmas, source, states, mask, guidance,
                                          obj.loss_weighting, padded, region_weight)
        return loss, losses, sigmas

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

    def _next_batch(self, step_start: int) -> Batch:
        try:
            return next(self.batches)
        except DataError as err:
            raise self._stopped_by_data(err, step_start) from None

    def _stopped_by_data(self, err: DataError, step_start: int) -> DataError:
        """The data failed (past data.max_skip_rate, a set that yields nothing): the run stops with a
        checkpoint of the last finished step, and the error says where it is."""
        latest = self.checkpointer.latest()
        if self.accelerator.num_processes > 1:  # the other ranks are inside the step: the launcher stops them
            return DataError(f"{err}. The newest checkpoint is {latest or 'none'}")
        if self.step == 0 or (latest is not None and latest.name == ckpt.step_dir(latest.parent, self.step).name):
            return DataError(f"{err}. Nothing to save since {latest or 'the start'}")
        self.optimizer.zero_grad(set_to_none=True)  # the unfinished step is redone after a resume
        self.batches.batches_yielded = step_start
        path = self.save_checkpoint()
        return DataError(f"{err}. The run stopped with a checkpoint of step {self.step} ({path}); after fixing the "
                         "data continue with trainer.resume=auto")

    def _log_step(self, grad_norm: torch.Tensor) -> None:
        """One line of metrics.jsonl (and wandb) for the window since the last: every rank takes part."""
        acc, tcfg = self.accelerator, self.cfg.trainer
        self.guard.check()
        window = self.window.read(acc)
        record = {
            "step": self.step,
            "loss": window.loss,
            "lr": float(self.lr_scheduler.get_last_lr()[0]),  # a tensor for some optimizers (torchao)
            "grad_norm": float(grad_norm),
            "samples_per_s": window.samples_per_s,
            "samples_seen": self.progress.samples_seen,
            "skipped_steps": self.guard.skipped_steps,
            **flop_rates(self.progress.flops_per_step, window.samples / max(1, tcfg.global_batch_size),
                         window.seconds, acc.num_processes, self.peak_tflops),
            **window.sigma_losses,
        }
        skipped = self.batches.skips + Counter(self.encoder.skips.counts)  # reading + encoding
        record.update({f"data/skipped_{reason}": n for reason, n in skipped.items()})
        self.run_log.write(record)

    def save_checkpoint(self) -> Path | None:
        with self.timer("checkpoints"):
            return self.checkpointer.save(self.step)

    def _stop_early(self) -> dict:
        """A signal or trainer.stop_after: a checkpoint, and the PREEMPTED marker for the SLURM template."""
        self.run_log.close()
        self.timer.end()
        self.save_checkpoint()
        self.preemption.mark(self.step)
        return {}

    # ------------------------------------------------------------------ end of run
    def _end_of_run(self, steps: int) -> dict:
        """Final evaluation, then summary.txt, printed last: where the results are, the model against
        copy-the-source per kind of edit, the time by phase, and the commands to run next."""
        result = self.run_eval()
        if result and self._start_result:  # eval.json keeps the start beside the end
            result["start"] = {"step": 0, "model": self._start_result["model"]}
            (self.run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        # the job's CPU time is every rank's: each one adds its own (a collective, so all ranks call it)
        acc = self.accelerator
        cpu = acc.reduce(torch.tensor([process_times()[1]], dtype=torch.float32, device=acc.device), "sum").item()
        if self.accelerator.is_main_process:
            example = None
            if self._grid_rows:  # a held-out source to try `editflow edit` on
                sample = self._grid_rows[0]
                image = self.run_dir / "example-source.png"
                sample.source.save(image)
                example = (image, sample.instruction)
            text = summary(self.run_dir, self.checkpointer.latest(), self._grid_path, result, self.timer.seconds,
                           steps, example, start_grid=self._start_grid, cpu_seconds=cpu,
                           processes=acc.num_processes)
            (self.run_dir / "summary.txt").write_text(text)
        self.run_log.finish(result)
        if self.accelerator.is_main_process:  # the last thing on the terminal
            print((self.run_dir / "summary.txt").read_text(), flush=True)
        return result

    def pipeline(self) -> EditPipeline:
        if self.conditioner is None:  # trained on pre-encoded data: the frozen models are needed only now
            with frozen_models_unpartitioned(self.accelerator):
                self.conditioner, self.codec = build_frozen(self.cfg.model)
        return EditPipeline(self.accelerator.unwrap_model(self.editor), self.conditioner, self.codec, self.scheduler,
                            sample_guidance(self.cfg))

    def run_eval(self) -> dict:
        with self.timer("evaluation"):
            return self._run_eval()

    def _run_eval(self) -> dict:
        """Edit the held-out samples: eval.json, a sample grid, and `eval/*` in metrics.jsonl (main process)."""
        acc, ecfg = self.accelerator, self.cfg.eval
        result = {}
        # ZeRO-3 gathers each layer's weights from all ranks as it runs: every rank must run the edits
        editing = acc.is_main_process or zero_stage(acc) == 3
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
            self.run_log.image("samples", grid, "source | target | edit", self.step)
            primary = result["primary"]
            # logged with the next training record (metrics.jsonl rows always carry step and loss)
            self.run_log.pending.update(eval_metrics(result))
            log.info("eval: model %s=%.4f, copy-source baseline %.4f", primary, result["model"][primary],
                     result["baseline"][primary])
        acc.wait_for_everyone()
        return result
