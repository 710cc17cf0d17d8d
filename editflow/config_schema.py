"""The config schema: one dataclass per Hydra group, with every key's type, default and checks.

Registered in Hydra's ConfigStore as `schema`, the first entry of conf/config.yaml's defaults list, so every
composed config is typed: Hydra refuses a value of the wrong type or an override of a key the schema lacks
(`editflow.config.validate` refuses one added with `+`). The YAML files in conf/ choose values; a key they
leave out gets the default here. The checks run in `__post_init__` when `validate` instantiates the
dataclasses (`OmegaConf.to_object`); each failure is a ConfigError naming the key. Where a key's default here
differs from the YAML groups, it is what a config saved before the key existed meant (model and data keys are
read back from checkpoints).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from omegaconf import MISSING

from editflow.data import toy
from editflow.errors import ConfigError
from editflow.flow import LOSS_WEIGHTING, REGION_WEIGHTING, SIGMA_SAMPLING
from editflow.models.attention import ALIASES, PLANS
from editflow.models.build import DTYPES, TRAINABLE
from editflow.models.connector import CONNECTOR_KINDS, POOLED_MODES
from editflow.optim import OPTIMIZERS, SCHEDULES

MIXED_PRECISION = ("no", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DATA_KINDS = ("toy", "shards")
QUANTIZATION = ("int8", "fp8")
DROP_OUTCOMES = ("text", "image", "both")
WANDB_MODES = ("online", "offline", "disabled", "shared")


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def one_of(value: Any, choices, key: str) -> None:
    require(value in choices, key, f"expected one of {', '.join(map(str, choices))}, got {value!r}")


def positive(value: Any, key: str) -> None:
    require(is_number(value) and value > 0, key, f"must be a positive finite number, got {value!r}")


def non_negative(value: Any, key: str) -> None:  # finite too: inf passes `>= 0` and then poisons every update
    require(is_number(value) and value >= 0, key, f"must be a non-negative finite number, got {value!r}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def placeholder(value: Any) -> bool:
    """MISSING (???) or an interpolation, as in the defaults below."""
    return isinstance(value, str) and (value == MISSING or "${" in value)


class Checked:
    """Runs `check()` once every field holds a value. OmegaConf also builds the dataclasses from their defaults,
    MISSING and interpolations included, to make the schema; `OmegaConf.to_object` builds them from the
    composed, resolved values, so the checks see every value there."""

    def __post_init__(self) -> None:
        if not any(placeholder(getattr(self, f.name)) for f in fields(self)):
            self.check()

    def check(self) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- model
@dataclass
class TransformerConfig:
    pretrained: Optional[str] = None  # a FLUX.1-Kontext hub id or local dir; null: random init from `config`
    subfolder: Optional[str] = None
    config: Optional[dict[str, Any]] = None  # FluxTransformer2DModel's arguments (random init)


@dataclass
class VaeConfig:
    pretrained: str = MISSING
    subfolder: Optional[str] = None


@dataclass
class QwenConfig(Checked):
    pretrained: str = MISSING
    hidden_layer: int = -1  # which hidden states condition FLUX
    max_length: int = 512  # tokens: image tokens at max_pixels + instruction
    min_pixels: Optional[int] = None  # the source as Qwen sees it; null: the processor's default
    max_pixels: Optional[int] = None
    attn_implementation: Optional[str] = None

    def check(self) -> None:
        positive(self.max_length, "model.qwen.max_length")
        for key in ("min_pixels", "max_pixels"):
            if getattr(self, key) is not None:
                positive(getattr(self, key), f"model.qwen.{key}")


@dataclass
class ConnectorConfig(Checked):
    kind: str = "mlp"  # mlp: LayerNorm -> Linear -> GELU -> Linear | reference: the public GPT-Image-Edit projector
    hidden_dim: Optional[int] = None  # kind=mlp; null: the transformer's text width
    refiner_layers: int = 0  # optional token refiner: transformer layers over the output tokens
    refiner_heads: int = 8
    # stage 2: the stage-1 run, a checkpoint, an export or the public projector file; `required` (a stage-2
    # preset's placeholder) is refused by training until a path is given
    init_from: Optional[str] = None
    text_encoders: Optional[str] = None  # the base's CLIP and T5 folders: pooled vector and token scale at the start
    token_std: Union[float, int, str] = 1.0  # output-token RMS at the start: a number, or from_base (the base's T5)
    # the pooled vector: learned (CLIP's "" + a correction from zero, trained from stage 2 on) | base (CLIP's ""
    # for the whole run, as the public reference feeds it; a loaded correction is dropped)
    pooled: str = "learned"

    def check(self) -> None:
        one_of(self.kind, CONNECTOR_KINDS, "model.connector.kind")
        one_of(self.pooled, POOLED_MODES, "model.connector.pooled")
        if self.hidden_dim is not None:
            positive(self.hidden_dim, "model.connector.hidden_dim")
        non_negative(self.refiner_layers, "model.connector.refiner_layers")
        positive(self.refiner_heads, "model.connector.refiner_heads")
        std = self.token_std
        require(std == "from_base" or (is_number(std) and std > 0), "model.connector.token_std",
                f"expected a positive number or from_base, got {std!r}")


@dataclass
class LoraConfig(Checked):
    rank: int = 16
    alpha: int = "${.rank}"  # type: ignore[assignment]  # an interpolation: alpha = rank unless given
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # null: diffusers' Kontext list

    def check(self) -> None:
        positive(self.rank, "model.lora.rank")
        positive(self.alpha, "model.lora.alpha")
        require(0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig(Checked):
    name: str = MISSING
    dtype: str = "float32"  # trainable weights
    frozen_dtype: str = "${.dtype}"  # Qwen and the VAE
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    qwen: QwenConfig = field(default_factory=QwenConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    trainable: str = "full"  # full | lora | reference_attention | connector
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    compile_blocks: bool = False  # torch.compile each FLUX block (CUDA only)
    base_quantization: Optional[str] = None  # LoRA only: int8 | fp8 frozen base weights (torchao)
    attention_backend: Optional[str] = None  # models/attention.py's PLANS; null: native
    # visible padding of the conditioning to a multiple (1: exact lengths, what configs saved before the key meant)
    text_pad_multiple: int = 1

    def check(self) -> None:
        require(bool(self.transformer.pretrained) or bool(self.transformer.config), "model.transformer",
                "give pretrained (a hub id or local directory) or config (the architecture, random weights)")
        for key in ("dtype", "frozen_dtype"):
            one_of(getattr(self, key), sorted(DTYPES), f"model.{key}")
        one_of(self.trainable, TRAINABLE, "model.trainable")
        if self.base_quantization is not None:
            one_of(self.base_quantization, QUANTIZATION, "model.base_quantization")
            require(self.trainable == "lora", "model.base_quantization",
                    "quantizes the frozen base of a LoRA run: needs model.trainable=lora")
        backend = self.attention_backend or "native"
        require(ALIASES.get(backend, backend) in PLANS, "model.attention_backend",
                f"{backend!r} is not offered; use one of {sorted(PLANS)} (or {sorted(ALIASES)}, the same kernels)")
        require(self.text_pad_multiple >= 1, "model.text_pad_multiple",
                f"expected a positive integer (1: exact lengths), got {self.text_pad_multiple}")


# ----------------------------------------------------------------------------------------------- data
@dataclass
class ToyKindWeights:
    """Training edits of each kind per cycle of the toy stream (data.toy.kind_weights.recolor=2: two recolors
    in every six edits); the held-out edits stay balanced, so per-kind scores compare across runs."""
    recolor: int = 1
    add: int = 1
    remove: int = 1
    move: int = 1
    background: int = 1


@dataclass
class ToyDataConfig(Checked):
    num_train: int = 4000
    num_val: int = 64
    seed: int = 0
    size: int = 64  # pixels
    samples_per_shard: int = 1000
    cache_dir: Optional[str] = None  # null: $EDITFLOW_CACHE or ~/.cache/editflow
    kind_weights: ToyKindWeights = field(default_factory=ToyKindWeights)

    def check(self) -> None:
        for key in ("num_train", "size", "samples_per_shard"):
            positive(getattr(self, key), f"data.toy.{key}")
        non_negative(self.num_val, "data.toy.num_val")
        require(toy.valid_size(self.size), "data.toy.size", f"must be {toy.SIZE_RULE}, got {self.size}")
        try:
            toy.weighted_kinds(dataclasses.asdict(self.kind_weights))
        except ValueError as err:
            require(False, "data.toy.kind_weights", str(err))


def check_shard_spec(spec: Any, key: str) -> None:
    """A shard directory (or tar file pattern) or a non-empty list of them."""
    paths = spec if isinstance(spec, list) else [spec]
    require(bool(paths) and all(isinstance(p, str) and p for p in paths), key,
            f"expected a shard directory or a list of them, got {spec!r}")


def check_train_spec(spec: Any) -> None:
    """data.train: a directory, a list of them, or {name: {path: DIR or [DIRS], weight: W or null}}."""
    if not isinstance(spec, dict):
        check_shard_spec(spec, "data.train")
        return
    require(bool(spec), "data.train", "is empty: name at least one set, {name: {path: DIR, weight: W}}")
    for name, entry in spec.items():
        key = f"data.train.{name}"
        require(isinstance(entry, dict) and "path" in entry, key,
                f"expected {{path: DIR or [DIRS], weight: W}}, got {entry!r}")
        extra = sorted(set(entry) - {"path", "weight"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: unknown key; a set has path and weight")
        check_shard_spec(entry["path"], f"{key}.path")
        weight = entry.get("weight")
        require(weight is None or (is_number(weight) and weight >= 0), f"{key}.weight",
                f"expected a number >= 0 or null (null: the set's share of all samples), got {weight!r}")


@dataclass
class DataConfig(Checked):
    kind: str = MISSING  # toy | shards
    toy: Optional[ToyDataConfig] = None  # data=toy: the procedural toy set's size and seed
    # data=shards: a shard directory, a list of them, or {name: {path: DIR, weight: W}} (weight: a set's share
    # of the draws; null or left out: its share of all samples, the natural mixture)
    train: Any = None
    val: Any = None  # held-out shard directory (or list) for evaluation
    shuffle_buffer: int = 1000
    max_skip_rate: float = 0.01  # unreadable samples tolerated, as a share of those read
    bucket_base: int = 1024  # aspect buckets around bucket_base^2 pixels
    source_pixels: Optional[int] = None  # e.g. 262144 to feed the Kontext source at ~512^2; null: the target's bucket
    pre_encoded: Optional[str] = None  # `editflow encode` output: train on stored latents and Qwen states
    decode_threads: int = 0  # threads decoding batches in the training process (the batch order does not depend on it)
    num_workers: int = 0  # DataLoader worker processes instead (> 0: decode_threads is not used)
    square_only: bool = False  # every sample squashed to the base x base bucket (the reference's behaviour)

    def check(self) -> None:
        one_of(self.kind, DATA_KINDS, "data.kind")
        if self.kind == "toy":
            require(self.toy is not None, "data.toy", "is not set: the toy data needs its settings (data=toy)")
            for key in ("train", "val"):
                require(getattr(self, key) is None, f"data.{key}",
                        f"the toy data (data=toy, the default) has no data.{key} and would ignore it; add data=shards "
                        f"to train on shards (editflow train data=shards data.{key}=DIR ...), or set data.{key}=null "
                        "to train on the toy data")
        else:
            require(self.train is not None, "data.train",
                    "is not set: give a shard directory (editflow data convert --out), a list of them, or "
                    "{name: {path: DIR, weight: W}}")
            check_train_spec(self.train)
            if self.val is not None:
                check_shard_spec(self.val, "data.val")
        non_negative(self.shuffle_buffer, "data.shuffle_buffer")
        require(0 <= self.max_skip_rate < 1, "data.max_skip_rate", f"must be in [0, 1), got {self.max_skip_rate}")
        require(self.bucket_base > 0 and self.bucket_base % 16 == 0, "data.bucket_base",
                f"must be a positive multiple of 16, got {self.bucket_base}")
        if self.source_pixels is not None:
            positive(self.source_pixels, "data.source_pixels")
        for key in ("num_workers", "decode_threads"):
            require(getattr(self, key) >= 0, f"data.{key}", f"must be a non-negative integer, got {getattr(self, key)}")


# ---------------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig(Checked):
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA) | adamw8bit_torchao (any device)
    schedule: str = "cosine"  # cosine (to min_lr) | constant, both after linear warmup
    lr: float = 5.0e-5
    min_lr: float = 1.0e-6
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # a full fine-tune in bf16/fp16 weights outside DeepSpeed is refused unless this is true (see EditflowConfig)
    allow_low_precision_weights: bool = False

    def check(self) -> None:
        one_of(self.name, OPTIMIZERS, "optim.name")
        one_of(self.schedule, SCHEDULES, "optim.schedule")
        positive(self.lr, "optim.lr")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr",
                f"must be between 0 and optim.lr={self.lr}, got {self.min_lr}")
        require(self.warmup_steps >= 0, "optim.warmup_steps",
                f"must be a non-negative integer, got {self.warmup_steps}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                f"expected two values in [0, 1), got {list(self.betas)}")
        positive(self.eps, "optim.eps")
        non_negative(self.weight_decay, "optim.weight_decay")
        positive(self.grad_clip, "optim.grad_clip")


# -------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig(Checked):
    device: str = "auto"  # auto: CUDA when available, else CPU
    mixed_precision: str = "no"  # no | bf16 | fp16
    global_batch_size: int = 256
    micro_batch_size: int = 4
    max_steps: int = 30000
    seed: int = 0
    log_every: int = 10
    checkpoint_every: Optional[int] = 1000  # 0 or null: only the final checkpoint
    keep_last: int = 3
    resume: Optional[str] = None  # auto | a checkpoint path | null
    resume_data: bool = True  # restore the data position too (needs the same world size)
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this many steps of this process, as if preempted
    preempt_exit_code: int = 42  # exit code after a SIGUSR1/SIGTERM stop (launch/slurm/*.sbatch requeue on it)
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    cache_encodings: bool = False  # memoise frozen VAE/Qwen outputs per sample key in RAM (small datasets)
    ema_decay: Optional[float] = None  # e.g. 0.9999: keep an EMA of the trainable weights (saved in checkpoints)
    ema_cpu: bool = False  # keep the EMA in CPU memory (saves GPU memory for the 12B model)
    peak_tflops: Optional[float] = None  # device bf16 peak for MFU; null: known GPUs are recognised

    def check(self) -> None:
        one_of(self.device, DEVICES, "trainer.device")
        one_of(self.mixed_precision, MIXED_PRECISION, "trainer.mixed_precision")
        for key in ("global_batch_size", "micro_batch_size", "max_steps", "log_every", "keep_last", "max_bad_steps"):
            require(getattr(self, key) > 0, f"trainer.{key}", f"must be a positive integer, got {getattr(self, key)}")
        # random, numpy and torch are all seeded with it (accelerate's set_seed); numpy takes only this range
        require(0 <= self.seed < 2**32, "trainer.seed", f"must be an integer from 0 to 2**32-1, got {self.seed}")
        require(self.global_batch_size % self.micro_batch_size == 0, "trainer.global_batch_size",
                f"{self.global_batch_size} is not divisible by trainer.micro_batch_size={self.micro_batch_size}")
        if self.checkpoint_every is not None:
            non_negative(self.checkpoint_every, "trainer.checkpoint_every")
        if self.stop_after is not None:
            positive(self.stop_after, "trainer.stop_after")
        if self.ema_decay is not None:
            require(0 < self.ema_decay < 1, "trainer.ema_decay", f"must be in (0, 1) or null, got {self.ema_decay}")
        if self.peak_tflops is not None:
            positive(self.peak_tflops, "trainer.peak_tflops")


@dataclass
class LauncherConfig:
    """How `editflow slurm` (and you) launch: an accelerate config from launch/accelerate/."""

    name: str = "local"
    accelerate_config: str = "single_gpu.yaml"


# ------------------------------------------------------------------------------------------ objective
@dataclass
class ObjectiveConfig(Checked):
    """The rectified-flow objective (editflow/flow.py)."""

    sigma_sampling: str = "logit_normal"  # logit_normal | mode | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29  # sigma_sampling=mode (SD3)
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap
    # weight the loss by the changed region (toy mask, else |source - target|): none | log | log_both. log is
    # 1 + log2(cells / region cells) inside and 1 outside (the public GPT-Image-Edit code's mask_weight_type);
    # log_both boosts the unchanged part by its own share too (flow.region_weights)
    region_weighting: str = "none"
    # condition dropout for classifier-free guidance (what Qwen sees; the sampler's --text/--image-guidance)
    drop_text: float = 0.0  # source image, no instruction
    drop_image: float = 0.0  # instruction, no image
    drop_both: float = 0.0  # neither
    resolution_shift: bool = True  # FLUX's shift by the number of target tokens
    # Kontext's distilled guidance: the value fed while training, and the default when sampling (editflow edit,
    # editflow eval, the run's evaluation, EditPipeline and exports all read sample_guidance). The toy's random
    # tiny transformer only ever sees its training value; the real presets sample at 3.5 (README, options table).
    guidance: float = 1.0
    sample_guidance: float = "${.guidance}"  # type: ignore[assignment]

    def check(self) -> None:
        one_of(self.sigma_sampling, SIGMA_SAMPLING, "objective.sigma_sampling")
        positive(self.logit_std, "objective.logit_std")
        one_of(self.loss_weighting, LOSS_WEIGHTING, "objective.loss_weighting")
        one_of(self.region_weighting, REGION_WEIGHTING, "objective.region_weighting")
        drops = [self.drop_text, self.drop_image, self.drop_both]
        for outcome, p in zip(DROP_OUTCOMES, drops):
            require(0 <= p <= 1, f"objective.drop_{outcome}", f"must be a probability in [0, 1], got {p}")
        require(sum(drops) <= 1, "objective.drop_both",
                f"objective.drop_text + drop_image + drop_both must not exceed 1, got {sum(drops)}")
        # checked here, not only through eval.guidance (their default), so the message names the key that was set
        for key in ("guidance", "sample_guidance"):
            non_negative(getattr(self, key), f"objective.{key}")


# ------------------------------------------------------------------------------- eval, encode, logging
@dataclass
class EvalConfig(Checked):
    """Held-out evaluation and sample grid at the end of the run."""

    every: Optional[int] = None  # also evaluate every N steps (logged as eval/* in metrics.jsonl)
    at_start: bool = False  # also evaluate before the first step: the summary shows the start beside the end
    num_samples: int = 64
    steps: int = 20
    # a value or a list, e.g. [3.5, 1.0]: each is evaluated, the first is the headline
    guidance: Any = "${objective.sample_guidance}"
    seed: int = 0
    batch_size: int = 16
    grid_rows: int = 8

    def check(self) -> None:
        if self.every is not None:
            positive(self.every, "eval.every")
        non_negative(self.num_samples, "eval.num_samples")
        for key in ("steps", "batch_size", "grid_rows"):
            positive(getattr(self, key), f"eval.{key}")
        values = self.guidance if isinstance(self.guidance, list) else [self.guidance]
        require(bool(values) and all(is_number(v) and v >= 0 for v in values), "eval.guidance",
                f"expected a guidance value or a non-empty list of them, got {self.guidance!r}")


@dataclass
class EncodeConfig(Checked):
    """`editflow encode`: the frozen VAE and Qwen run once over the training sets (editflow/encode_shards.py)."""

    out: Optional[str] = None  # output directory; train on it with data.pre_encoded=<out>
    batch_size: int = 8  # samples per encoder call (one bucket each)
    drops: Any = "auto"  # Qwen states stored per dropout outcome: auto (objective.drop_*) or [text, image, both]

    def check(self) -> None:
        positive(self.batch_size, "encode.batch_size")
        require(self.drops == "auto" or (isinstance(self.drops, list) and all(d in DROP_OUTCOMES for d in self.drops)),
                "encode.drops", f"expected auto or a list of {', '.join(DROP_OUTCOMES)}, got {self.drops!r}")


@dataclass
class LoggingConfig(Checked):
    wandb: bool = True  # offline by default: runs/.../wandb, `wandb sync` later
    wandb_mode: str = "offline"  # online | offline | disabled | shared
    project: str = "editflow"
    name: Optional[str] = None
    run_id: Optional[str] = None  # default: the run directory's name (a requeued job continues the same run)

    def check(self) -> None:
        one_of(self.wandb_mode, WANDB_MODES, "logging.wandb_mode")


# ---------------------------------------------------------------------------------------------- the run
def deepspeed_launch(launcher: str) -> bool:
    """Whether DeepSpeed runs this job: launched with a DeepSpeed accelerate config, or a DeepSpeed launcher preset."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or launcher.startswith("deepspeed")


@dataclass
class EditflowConfig(Checked):
    """A whole run's config (`editflow train`'s): the groups, then the checks that span groups."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        m = self.model
        require(m.dtype in ("float32", "fp32") or m.trainable != "full" or deepspeed_launch(self.launcher.name)
                or self.optim.allow_low_precision_weights, "model.dtype",
                f"a full fine-tune with model.dtype={m.dtype} outside DeepSpeed runs AdamW on {m.dtype} weights, where "
                "updates smaller than their rounding are lost. Use launcher=deepspeed_zero2/3 (fp32 master weights), "
                "or model.dtype=float32 with trainer.mixed_precision=bf16 (FSDP2, DDP), or set "
                "optim.allow_low_precision_weights=true to train this way anyway")
