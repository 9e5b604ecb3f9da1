"""Typed run configuration: one default file, small delta files, dotted overrides, unknown keys rejected.

A run is described by ``configs/base.yaml`` (every key with its default) layered with a run file
(``configs/pretrain/xl_in21k.yaml``) and ``key=value`` overrides from the command line. The result is a
frozen :class:`Config` of typed sections; each component receives only its own section
(``build_loader(cfg.data, ...)``, ``create_model(**cfg.model ...)``), never the whole config.

The schema is the dataclasses below (OmegaConf structured configs), so a misspelt key, a value of the wrong
type or a value outside a closed choice (the ``Literal`` fields) is refused when the config is loaded, with the
file or override that caused it. Each section then checks its own cross-field rules once, when it is built
(``__post_init__`` -> ``validate()``; also for sections built in Python), and :class:`Config` the rules that span
sections; a component trusts the section it receives. The model section's choices, defaults and checks are
the model library's own (:mod:`pipeline.models`).

``configs/base.yaml`` is generated from these dataclasses, their docstrings becoming its comments::

    python -m pipeline.config --write-base
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.models import DEFAULT_DROP_PATH_RATE, VARIANTS, GradCheckpointing, LayerOptions, ModelArgs, Padding

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key and the fix."""


# Closed choices: the schema refuses any other value at load time (OmegaConf Literal fields), and the sections
# refuse it when built in Python. The model's (Padding, GradCheckpointing) are the model library's.
Preset = Literal["paper", "official"]
OptimizerName = Literal["rmsprop_tf", "adamw", "lamb"]
Schedule = Literal["cosine", "exp_staircase", "constant"]
Precision = Literal["auto", "fp32", "bf16", "bf16_weights"]
ZeroStage = Literal[0, 1, 2, 3]
Decoder = Literal["auto", "simplejpeg", "torchvision", "pil"]
WorkerStart = Literal["forkserver", "fork", "spawn"]
InitWeights = Literal["auto", "ema", "raw"]
ExportWeights = Literal["ema", "raw"]
ExportFormat = Literal["ours", "timm", "both"]


def choices(section: type, name: str) -> tuple:
    """The allowed values of a closed-choice field, e.g. ``choices(OptimConfig, "schedule")``."""
    return typing.get_args(_field_types(section)[name])


@functools.cache
def _field_types(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section)


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _in_range(section: "_Section", name: str, lo: float, hi: float = math.inf, *, hi_open: bool = False,
              lo_open: bool = False, what: str = "") -> None:
    """``section.name`` (each entry of a list; None passes) within [lo, hi], an open end where asked."""
    value = getattr(section, name)
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if v is None:
            continue
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        if hi == math.inf:
            bound = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            bound = f"within {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        _require(ok, f"{section.KEY}.{name}", f"must be {bound}{what}, got {value!r}")


def _ordered(section: "_Section", low: str, high: str, what: str) -> None:
    """A progressive range: the first stage's value (``low``) at most the last stage's (``high``)."""
    lo_v, hi_v = getattr(section, low), getattr(section, high)
    _require(lo_v is None or hi_v is None or lo_v <= hi_v, f"{section.KEY}.{low}",
             f"{lo_v} is above {section.KEY}.{high} ({hi_v}): the stages go from {low} to {high}, {what}; "
             "swap them, or set both to one value for no change")


class _Section:
    """A config section: checks itself when built (OmegaConf builds it after merging; so does Python code)."""

    KEY: ClassVar[str]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """The section's own rules (the closed choices, then :meth:`_check`); raises ConfigError naming the key."""
        for f in dataclasses.fields(self):
            if typing.get_origin(_field_types(type(self))[f.name]) is Literal:
                allowed, value = choices(type(self), f.name), getattr(self, f.name)
                # by type too, like the schema: True is not the ZeRO stage 1
                _require(any(type(value) is type(a) and value == a for a in allowed), f"{self.KEY}.{f.name}",
                         f"{value!r} is not one of {' / '.join(map(str, allowed))}")
        self._check()

    def _check(self) -> None:
        pass


@dataclass
class ModelConfig(_Section):
    """The network: create_model()'s arguments. Defaults, choices and checks are the model library's."""

    KEY: ClassVar[str] = "model"

    name: str = "efficientnetv2_s"
    """Registry name, e.g. efficientnetv2_s / _m / _l / _xl, efficientnetv2_b0.._b3, efficientnetv2_test."""
    num_classes: int = 0
    """Classifier outputs; 0 means: take the class count from the training data's info.json."""
    drop_rate: Optional[float] = None
    """Dropout before the classifier; None uses the variant's default (S 0.2, M 0.3, L/XL 0.4).
    With progressive learning the stage table overrides it per stage."""
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE
    """Stochastic depth: block i of N drops with probability drop_path_rate * i / N."""
    bn_momentum: float = LayerOptions.bn_momentum
    """PyTorch BN momentum. 0.1 = the official code's Keras 0.9; the paper's 0.99 is 0.01."""
    bn_eps: float = LayerOptions.bn_eps
    """BN epsilon (official 1e-3; timm's non-tf efficientnetv2_* weights use 1e-5)."""
    padding: Padding = LayerOptions.padding
    """'symmetric' (PyTorch padding) or 'same' (TF padding, needed to import tf_efficientnetv2_* weights)."""
    channels_last: bool = True
    """NHWC activations (the model converts its input; parameters keep the default layout, which DeepSpeed
    needs): cuDNN / oneDNN then run NHWC convolution kernels, faster for convnets on GPU. (create_model's own
    default is False.)"""
    grad_checkpointing: GradCheckpointing = "none"
    """Activation checkpointing: 'none', 'block' or 'stage'."""
    compile: bool = False
    """Wrap the model in torch.compile."""

    def validate(self) -> None:
        """create_model()'s own checks (pipeline.models.ModelArgs), without building the model."""
        try:
            ModelArgs(self.name, self.num_classes, self.drop_rate, self.drop_path_rate, **model_options(self))
        except ValueError as e:  # "unknown model ..." or "<argument>=<value>: ..."
            raise ConfigError(f"model.name: {e}" if self.name not in VARIANTS else f"model.{e}") from None


@dataclass
class ProgressiveConfig(_Section):
    """Progressive learning: image size and regularization grow stage by stage (paper section 4)."""

    KEY: ClassVar[str] = "progressive"

    enabled: bool = True
    """False: one stage at max values (fixed image size and regularization)."""
    preset: Preset = "paper"
    """'paper' (Table 6: linear from first to last stage, dropout scheduled) or 'official' (released code:
    sizes at (i+1)/M, fixed dropout, cutmix alongside mixup)."""
    num_stages: int = 4
    min_image_size: int = 128
    max_image_size: int = 300
    min_randaug: float = 5.0
    max_randaug: float = 15.0
    """RandAugment magnitude on the 0-10 scale; above 10 means stronger-than-nominal ops (as in the paper)."""
    min_mixup: float = 0.0
    max_mixup: float = 0.0
    min_cutmix: float = 0.0
    max_cutmix: float = 0.0
    min_dropout: float = 0.1
    max_dropout: float = 0.3
    min_drop_path: Optional[float] = None
    """If both drop-path bounds are set, stochastic depth is scheduled too; else model.drop_path_rate holds."""
    max_drop_path: Optional[float] = None
    stage_micro_batch: list[int] = field(default_factory=list)
    """Per-stage micro-batch size (per rank); empty: train.micro_batch_size in every stage."""
    size_multiple: int = 1
    """Round stage image sizes down to this multiple (1 = the reference's int() truncation; 8 or 16 suit
    tensor cores)."""

    def _check(self) -> None:
        _require(self.num_stages >= 1, "progressive.num_stages", f"must be at least 1, got {self.num_stages}")
        _require(0 < self.min_image_size <= self.max_image_size, "progressive.min_image_size",
                 f"must be positive and at most progressive.max_image_size ({self.max_image_size}), got "
                 f"{self.min_image_size}")
        _require(self.size_multiple >= 1, "progressive.size_multiple", f"must be at least 1, got {self.size_multiple}")
        _require(not self.stage_micro_batch or len(self.stage_micro_batch) == self.num_stages,
                 "progressive.stage_micro_batch", f"has {len(self.stage_micro_batch)} entries for "
                 f"{self.num_stages} stages; give one per stage or none")
        _require((self.min_drop_path is None) == (self.max_drop_path is None), "progressive.min_drop_path",
                 "set both min_drop_path and max_drop_path, or neither")
        for name in ("min_randaug", "max_randaug", "min_mixup", "max_mixup", "min_cutmix", "max_cutmix"):
            _in_range(self, name, 0)
        for name in ("min_dropout", "max_dropout", "min_drop_path", "max_drop_path"):
            _in_range(self, name, 0, 1, hi_open=True, what=" (a probability)")
        _in_range(self, "stage_micro_batch", 1)
        for what in ("randaug", "mixup", "cutmix", "dropout", "drop_path"):  # (image size: above)
            _ordered(self, f"min_{what}", f"max_{what}", "growing with the image size")


@dataclass
class DataConfig(_Section):
    """Training and validation data, decoding and augmentation."""

    KEY: ClassVar[str] = "data"

    train: list[str] = field(default_factory=list)
    """Training datasets: shard folders written by `python -m shards write` (each with info.json)."""
    train_weights: list[float] = field(default_factory=list)
    """Sampling weights of the training datasets (empty: proportional to their sizes)."""
    train_split: str = "train"
    val: Optional[str] = None
    """Validation shard folder (default: the first training folder)."""
    val_split: str = "val"
    hf_dataset: Optional[str] = None
    """Instead of shards: a Hugging Face datasets folder (save_to_disk) or a hub name in the local cache."""
    hf_train_split: str = "train"
    hf_val_split: str = "test"
    hf_image_column: str = "image"
    hf_label_column: str = "label"
    workers: int = 4
    """Loader worker processes per rank."""
    worker_start: WorkerStart = "forkserver"
    """How loader workers start: 'forkserver' (forked from a clean single-threaded server, never from the
    multi-threaded training process), 'fork' or 'spawn'; see pipeline/data/workers.py."""
    shuffle_buffer: int = 2000
    """Samples in the per-worker shuffle buffer."""
    resampled: bool = False
    """Draw shards with replacement forever (huge data; resume is statistically, not exactly, equivalent)."""
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    crop_area: list[float] = field(default_factory=lambda: [0.05, 1.0])
    """RandomResizedCrop area range (the reference's 0.05-1.0)."""
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    randaug_ops: int = 2
    cutout: int = 0
    """Cutout square side in pixels (fine-tuning recipes); 0 disables."""
    reduced_decode: bool = True
    """Crop-aware reduced-size JPEG decode (DCT scaling and the stored jpg_small copy)."""
    decoder: Decoder = "auto"
    """JPEG decoder: auto picks simplejpeg (libjpeg-turbo, DCT scaling), else torchvision, else PIL."""
    eval_image_size: int = 384
    eval_crop_threshold: int = 320
    """Below this eval size: centre crop with ratio size / (size + 32); at or above: resize the whole image."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this fraction of samples fail to decode."""
    verify_checksums: bool = False
    """Check every sample's members against the sha256 digests the shard writer recorded (format version 2); a
    mismatch is a bad sample. ~0.1 ms per 100 KB sample."""
    allow_pipe: bool = False
    """Run `pipe:` shard names found inside an info.json (shell commands). Off: a dataset handed to you must not
    run code; a `pipe:` folder given in data.train / data.val itself is yours and always runs."""
    s3_endpoint_url: Optional[str] = None
    """Endpoint of an S3-compatible store for s3:// data (MinIO, Ceph, ...); unset: boto3's own resolution
    (AWS_ENDPOINT_URL, ~/.aws/config, AWS). Credentials: AWS_* environment or ~/.aws, as for the aws CLI."""
    remote_retries: int = 8
    """http(s):// and s3:// shards: failed tries in a row before the rest of a shard counts as bad samples; a
    retry reopens the shard at the byte where the connection broke."""
    remote_backoff_s: float = 0.5
    """Wait before the first retry, doubled per further failure (jitter x0.5-1), at most remote_backoff_max_s."""
    remote_backoff_max_s: float = 30.0
    remote_timeout_s: float = 60.0
    """Connect / read timeout of a request to remote storage (a stalled read is a failure, then retried)."""
    cache_dir: Optional[str] = None
    """Node-local cache of remote shards (e.g. /local_nvme/shard_cache); unset: stream every epoch again."""
    cache_gb: float = 0.0
    """Size bound of data.cache_dir in GB (least recently used shards are evicted); 0 disables the cache."""

    def _check(self) -> None:
        _require(len(self.mean) == 3 and len(self.std) == 3, "data.mean", "mean and std need 3 values (RGB)")
        _require(len(self.crop_area) == 2 and 0 < self.crop_area[0] <= self.crop_area[1] <= 1, "data.crop_area",
                 "needs [min, max] with 0 < min <= max <= 1")
        _require(not self.train_weights or len(self.train_weights) == len(self.train), "data.train_weights",
                 f"has {len(self.train_weights)} weights for {len(self.train)} datasets")
        _require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction",
                 f"must be within [0, 1], got {self.max_bad_fraction}")
        _in_range(self, "std", 0, lo_open=True)
        _require(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], "data.crop_ratio",
                 f"needs [min, max] with 0 < min <= max, got {list(self.crop_ratio)}")
        _in_range(self, "train_weights", 0)
        _require(not self.train_weights or sum(self.train_weights) > 0, "data.train_weights",
                 "needs at least one positive weight")
        for name in ("workers", "shuffle_buffer", "randaug_ops", "cutout", "eval_crop_threshold"):
            _in_range(self, name, 0)
        _in_range(self, "eval_image_size", 1)
        _in_range(self, "hflip", 0, 1, what=" (a probability)")
        for name in ("remote_retries", "remote_backoff_s", "remote_backoff_max_s", "cache_gb"):
            _in_range(self, name, 0)
        _in_range(self, "remote_timeout_s", 0, lo_open=True)
        _require(not self.cache_gb or bool(self.cache_dir), "data.cache_gb", "needs data.cache_dir (a node-local "
                 "folder) to cache shards in")


@dataclass
class OptimConfig(_Section):
    """Optimizer, learning-rate schedule, weight decay and clipping."""

    KEY: ClassVar[str] = "optim"

    name: OptimizerName = "rmsprop_tf"
    """'rmsprop_tf' (TF semantics, the paper), 'adamw' or 'lamb'."""
    lr_per_256: float = 0.016
    """Peak learning rate per 256 images; the used lr is lr_per_256 * global_batch / 256."""
    weight_decay: float = 1e-5
    """Applied to conv / linear weights only, never to BN or biases."""
    momentum: float = 0.9
    rmsprop_decay: float = 0.9
    eps: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    """Epsilon of AdamW / LAMB (optim.eps is RMSProp's, whose 1e-3 sits inside the square root)."""
    schedule: Schedule = "cosine"
    """'cosine', 'exp_staircase' (x decay_rate every decay_epochs) or 'constant' (after warmup)."""
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    """Warmup length in epochs (converted with the dataset size); used when warmup_steps is 0."""
    decay_rate: float = 0.97
    decay_epochs: float = 2.4
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 0.0
    """0 disables gradient clipping."""

    def _check(self) -> None:
        _require(len(self.betas) == 2, "optim.betas", f"needs two values [beta1, beta2], got {list(self.betas)}")
        _require(self.warmup_steps >= 0 and self.warmup_epochs >= 0, "optim.warmup_steps / optim.warmup_epochs",
                 "must not be negative")
        _require(self.clip_grad_norm >= 0, "optim.clip_grad_norm", f"must be >= 0 (0 disables), got "
                 f"{self.clip_grad_norm}")
        for name in ("lr_per_256", "eps", "adam_eps", "decay_rate"):
            _in_range(self, name, 0, lo_open=True)
        for name in ("weight_decay", "decay_epochs"):
            _in_range(self, name, 0)
        for name in ("momentum", "rmsprop_decay", "betas"):
            _in_range(self, name, 0, 1, hi_open=True)
        _in_range(self, "min_lr_ratio", 0, 1)


@dataclass
class EMAConfig(_Section):
    """Exponential moving average of the weights (evaluated and exported alongside the raw weights)."""

    KEY: ClassVar[str] = "ema"

    enabled: bool = True
    decay: float = 0.9999
    tf_warmup: bool = True
    """Decay min(decay, (1 + t) / (10 + t)) as in the TF code."""
    every: int = 1
    """Update the EMA every this many optimizer steps."""

    def _check(self) -> None:
        _require(0 <= self.decay < 1, "ema.decay", f"must be within [0, 1), got {self.decay}")
        _in_range(self, "every", 1)


@dataclass
class CheckpointConfig(_Section):
    """Checkpoints, resume and preemption (SLURM)."""

    KEY: ClassVar[str] = "checkpoint"

    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    """'auto' (newest complete checkpoint in the run dir), 'none', or a checkpoint folder."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    requeue: bool = True
    """Under SLURM, rank 0 requeues the job after a preemption save."""
    preempt_check_every: int = 1
    """Steps between preemption checks (one 1-element all-reduce each); raise it if that shows in step time."""

    def _check(self) -> None:
        _in_range(self, "every_steps", 0, what=" (0: only at stage ends, the end and on preemption)")
        _in_range(self, "preempt_check_every", 1)


@dataclass
class EvalConfig(_Section):
    """Evaluation on the validation split."""

    KEY: ClassVar[str] = "eval"

    every_steps: int = 5000
    at_stage_size: bool = False
    """Evaluate at the current stage's image size instead of data.eval_image_size."""
    max_batches: int = 0
    """0: the whole validation split."""
    micro_batch_size: int = 0
    """0: train.micro_batch_size."""

    def _check(self) -> None:
        _in_range(self, "every_steps", 0, what=" (0: only at the end)")
        _in_range(self, "max_batches", 0, what=" (0: the whole split)")
        _in_range(self, "micro_batch_size", 0, what=" (0: train.micro_batch_size)")


@dataclass
class TrainConfig(_Section):
    """The run: its folder, length, batch sizes, precision and DeepSpeed ZeRO stage."""

    KEY: ClassVar[str] = "train"

    run_dir: str = "runs/default"
    total_steps: int = 0
    """Optimizer steps; 0 means epochs * (train samples / global batch)."""
    epochs: float = 0.0
    global_batch_size: int = 4096
    micro_batch_size: int = 32
    """Per-rank micro-batch size (stages may override it; accumulation adjusts to keep the global batch)."""
    seed: int = 0
    precision: Precision = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32', 'bf16' (autocast, fp32 weights / BN), 'bf16_weights'."""
    zero_stage: ZeroStage = 2
    """DeepSpeed ZeRO stage: 0, 1, 2 or 3."""
    label_smoothing: float = 0.0
    log_every: int = 20
    collective_timeout_s: int = 1800
    """A rank that dies makes the others fail after this many seconds instead of hanging."""
    sync_bn: bool = False
    """SyncBatchNorm instead of averaging BN running statistics across ranks before eval / save."""
    image_grid: bool = True
    """Log a grid of augmented training images at the start of each stage."""
    max_nonfinite_steps: int = 10
    """A step whose gradient is NaN / inf is skipped (no update, BN statistics kept) and counted; this many in a
    row stop the run with an error (the checkpoints saved before them are kept)."""

    def _check(self) -> None:
        _require(self.global_batch_size > 0 and self.micro_batch_size > 0, "train.global_batch_size",
                 f"train.global_batch_size and train.micro_batch_size must be positive, got "
                 f"{self.global_batch_size} and {self.micro_batch_size}")
        for name in ("total_steps", "epochs", "seed"):
            _in_range(self, name, 0)
        for name in ("log_every", "collective_timeout_s", "max_nonfinite_steps"):
            _in_range(self, name, 1)
        _in_range(self, "label_smoothing", 0, 1, hi_open=True)


@dataclass
class FinetuneConfig(_Section):
    """Fine-tuning (python -m pipeline.finetune) only."""

    KEY: ClassVar[str] = "finetune"

    head_seed: bool = True
    """Seed the new classifier's rows from the pretrained head where the class wnids agree (21k -> 1k);
    False: a freshly initialised classifier."""
    init_weights: InitWeights = "auto"
    """Weights of a DeepSpeed checkpoint or timm file to start from: 'auto' (EMA when present, else raw),
    'ema' or 'raw'. An export folder holds one set: the one it was exported with."""
    export_weights: ExportWeights = "ema"
    """Weights written to RUN_DIR/export at the end: 'ema' (raw when ema.enabled is false) or 'raw'."""
    export_format: ExportFormat = "ours"
    """Layout of the final export: 'ours' (RUN_DIR/export: model.safetensors + model.json), 'timm' (RUN_DIR/export_timm:
    timm's hub layout, timm.create_model('local-dir:RUN_DIR/export_timm', pretrained=True)) or 'both'."""
    allow_pickle: bool = False
    """Accept an init that is a pickle file (.pth / .pt / .bin). Unpickling can run code that the file brings, so
    such an init is refused unless this is true; even then it is read with torch.load(weights_only=True), which
    accepts tensors and plain containers only. A .safetensors file or an export folder needs neither."""


@dataclass
class Config:
    """A whole run: the sections, the fine-tuning init and the DeepSpeed pass-through."""

    model: ModelConfig = field(default_factory=ModelConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    init: Optional[str] = None
    """Fine-tuning: export folder, DeepSpeed checkpoint folder, or timm checkpoint file to start from."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Passed through into the generated DeepSpeed config (offload, ZeRO++ ...); may not set batch sizes,
    precision or clipping, which come from the sections above."""

    def __post_init__(self):
        self._check()

    def _check(self) -> None:
        """The rules that span sections (each section has checked its own when it was built)."""
        check_deepspeed_passthrough(self.deepspeed, self.train.zero_stage)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config)
                 if isinstance(f.default_factory, type) and issubclass(f.default_factory, _Section))
"""The section keys: model, progressive, data, optim, ema, checkpoint, eval, train, finetune."""

DEEPSPEED_RESERVED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
    "gradient_clipping": "optim.clip_grad_norm",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule",
}
"""DeepSpeed keys that the ``deepspeed:`` pass-through may not set, and the key that sets each."""


# DeepSpeed offloads only with these ZeRO stages and ignores the option silently with others (its ZeRO config docs)
ZERO_OFFLOAD_STAGES = {"offload_optimizer": (1, 2, 3), "offload_param": (3,)}


def check_deepspeed_passthrough(passthrough: dict, zero_stage: int) -> None:
    """The ``deepspeed:`` pass-through against the sections: no key that a section sets, no ZeRO stage other
    than train.zero_stage, and no offload that train.zero_stage would ignore."""
    clash = sorted(set(passthrough) & set(DEEPSPEED_RESERVED))
    if clash:
        raise ConfigError("deepspeed: " + "; ".join(f"'{k}' comes from {DEEPSPEED_RESERVED[k]}" for k in clash)
                          + " (one source of truth); remove it from the deepspeed: section")
    zero = passthrough.get("zero_optimization") or {}
    _require(isinstance(zero, dict), "deepspeed.zero_optimization", f"must be a mapping of DeepSpeed ZeRO options "
             f"(e.g. offload_optimizer: {{device: cpu}}), got {zero!r}")
    stage = zero.get("stage", zero_stage)
    _require(stage == zero_stage, f"deepspeed.zero_optimization.stage={stage}",
             f"disagrees with train.zero_stage={zero_stage}; set train.zero_stage only")
    for key, stages in ZERO_OFFLOAD_STAGES.items():
        offload = zero.get(key)
        if offload is None:
            continue
        _require(isinstance(offload, dict), f"deepspeed.zero_optimization.{key}",
                 f"must be a mapping such as {{device: cpu}}, got {offload!r}")
        _require(offload.get("device", "none") in ("none", None) or zero_stage in stages,
                 f"deepspeed.zero_optimization.{key}", f"DeepSpeed offloads only with ZeRO stage "
                 f"{' / '.join(map(str, stages))} and would ignore it with train.zero_stage={zero_stage}; set "
                 f"train.zero_stage={stages[-1]} or remove the offload")


def _schema():
    return OmegaConf.structured(Config)


def _yaml_error(where: str, e: yaml.YAMLError, position: bool = True) -> ConfigError:
    """One line: the file (or override), the line and column, and what is wrong. OmegaConf reads YAML with a safe
    loader: a python/* tag (which an unsafe loader would turn into a call) has no constructor and ends here."""
    mark = getattr(e, "problem_mark", None) if position else None
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    if "python/" in problem and "constructor" in problem:
        problem += ": config files are plain YAML (mappings, lists, numbers, strings); python/* tags are refused"
    return ConfigError(f"{where}{at}: cannot parse YAML: {problem}")


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one of the files under {CONFIG_DIR}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: cannot read it as YAML: {_short(e)}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{path}: holds a {type(loaded).__name__.replace('Config', '').lower()} at the top, not "
                          "sections (train:, optim:, ...) of key: value lines; see configs/base.yaml")
    return loaded


# OmegaConf's wording for a few mistakes, said in the config's terms
_PLAIN_WORDS = (
    ("is not a ListConfig, TupleConfig, list, or tuple", "expected a list, e.g. [a, b]"),
    ("is not a subclass of", "expected a section (key: value lines), not a single value"),
    ("is not Optional", "may not be empty (null)"),
)


def _merge(base, delta, source: str, key_hint: str = ""):
    try:
        return OmegaConf.merge(base, delta)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or _failing_key(base, delta) or key_hint or "?"
        raise ConfigError(f"{source}: key '{key}': {_plain(e)}; see configs/base.yaml for the keys and "
                          "their types") from None
    except TypeError as e:  # OmegaConf raises a plain TypeError for a mapping given where a list belongs
        if "incompatible container types" not in str(e):
            raise
        key = key_hint or _failing_key(base, delta) or "?"
        raise ConfigError(f"{source}: key '{key}': a section (key: value lines) where a list belongs, or a list "
                          "where a section belongs; see configs/base.yaml for the keys and their types") from None


def _failing_key(base, delta) -> Optional[str]:
    """The top-level key of ``delta`` whose merge fails (OmegaConf does not name it when a whole section is of
    the wrong kind, e.g. ``train: 5``)."""
    if not OmegaConf.is_dict(delta):
        return None
    for key in delta:
        try:
            OmegaConf.merge(base, {key: delta[key]})
        except (OmegaConfBaseException, TypeError):
            for sub in delta[key] if OmegaConf.is_dict(delta[key]) else ():  # the key inside the section
                try:
                    OmegaConf.merge(base, {key: {sub: delta[key][sub]}})
                except (OmegaConfBaseException, TypeError):
                    return f"{key}.{sub}"
            return str(key)
    return None


def _plain(e: Exception) -> str:
    text = _short(e)
    for theirs, ours in _PLAIN_WORDS:
        if theirs in text:
            return ours
    return text


def _short(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: str | os.PathLike | None = BASE_CONFIG) -> Config:
    """Schema <- base.yaml <- run file <- dotted overrides, validated, returned as a plain Config."""
    cfg = _schema()
    if base is not None and Path(base).is_file():
        cfg = _merge(cfg, _load_yaml(Path(base)), str(base))
    if path is not None:
        cfg = _merge(cfg, _load_yaml(Path(path)), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.total_steps=1000)")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override '{item}': no key before '=' (e.g. train.total_steps=1000)")
        try:
            delta = OmegaConf.from_dotlist([f"{key}={value}"])
        except yaml.YAMLError as e:  # the value is read as YAML (safely)
            raise _yaml_error(f"override '{item}'", e, position=False) from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {_short(e)}") from None
        cfg = _merge(cfg, delta, f"override '{item}'", key_hint=key)
    try:
        return OmegaConf.to_object(cfg)  # builds the sections and the Config: each checks itself once
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that points nowhere
        raise ConfigError(f"key '{getattr(e, 'full_key', None) or '?'}': {_short(e)}") from None


def validate(cfg: Config) -> None:
    """Check a Config again, e.g. one changed after it was built: every section's rules, then those that span
    sections. (load_config and the dataclasses' constructors already run the same checks.)"""
    for name in SECTIONS:
        getattr(cfg, name).validate()
    cfg._check()


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write the fully resolved config into the run dir (config.yaml), for the record and for export."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out)
    return out


# Keys that must not change when a run resumes: they change what the step counter means.
FROZEN_ON_RESUME = (
    "model.name", "model.num_classes", "train.total_steps", "train.epochs", "train.global_batch_size",
    "train.seed", "progressive.enabled", "progressive.preset", "progressive.num_stages",
    "progressive.min_image_size", "progressive.max_image_size", "optim.name", "optim.schedule", "data.train",
)


def _get(cfg_dict: dict, dotted: str):
    cur: Any = cfg_dict
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def model_options(m: ModelConfig) -> dict:
    """The ``model`` section's layer / memory options as create_model() keyword arguments."""
    return {"bn_eps": m.bn_eps, "bn_momentum": m.bn_momentum, "padding": m.padding,
            "channels_last": m.channels_last, "grad_checkpointing": m.grad_checkpointing}


def frozen_settings(cfg: Config) -> dict:
    d = to_dict(cfg)
    return {k: _get(d, k) for k in FROZEN_ON_RESUME}


def settings_hash(settings: dict) -> str:
    """Short fingerprint of :func:`frozen_settings` (stored in checkpoint markers)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_diff(saved: dict, now: dict) -> list[str]:
    """``"key: checkpoint A -> now B"`` for every frozen setting that differs. ``now`` is compared as stored
    (JSON round-tripped: tuples become lists), so a value read back from a marker equals its origin."""
    now = json.loads(json.dumps(dict(now)))
    return [f"{k}: checkpoint {saved.get(k)!r} -> now {now[k]!r}" for k in now if saved.get(k) != now[k]]


def resume_refusal(changed: list[str], where: str = "") -> ConfigError:
    return ConfigError(f"cannot resume{where}: settings that must not change on resume differ: " + "; ".join(changed)
                       + ". Restore them, or start a new run (checkpoint.resume=none or another train.run_dir)")


def check_resume_compatible(saved: dict, cfg: Config) -> None:
    """Refuse a resume whose frozen settings differ; the message names every changed key."""
    changed = settings_diff(saved, frozen_settings(cfg))
    if changed:
        raise resume_refusal(changed)


# ---- configs/base.yaml: generated from the dataclasses above -----------------------------------------------

BASE_HEADER = """\
# Every key with its default. Run files (configs/pretrain/*.yaml, ...) change only what differs.
# Generated from the dataclasses in pipeline/config.py (their docstrings are the comments here): edit those,
# then run `python -m pipeline.config --write-base`. tests/test_config.py fails while this file differs.
"""


def _docstrings() -> dict[str, dict[str, str]]:
    """``{class name: {"": class docstring, field: field docstring}}``, read from this file's source: a field's
    docstring is the string literal right after it (not kept at run time)."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        entry = {"": ast.get_docstring(node) or ""}
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                entry[stmt.target.id] = inspect.cleandoc(after.value.value)
        docs[node.name] = entry
    return docs


def _yaml_entry(key: str, value: Any, doc: str, indent: str) -> list[str]:
    comment = [f"{indent}# {line}".rstrip() for line in doc.splitlines()]
    flow = None if isinstance(value, (list, dict)) else False  # lists on one line: [0.5, 0.5, 0.5]
    text = yaml.safe_dump({key: value}, default_flow_style=flow, width=1000).rstrip("\n")
    return comment + [indent + line for line in text.splitlines()]


def base_yaml() -> str:
    """The text of ``configs/base.yaml``: every key of :class:`Config` with its default, commented with its
    docstring; sections in the dataclasses' order, a blank line between them."""
    docs, defaults = _docstrings(), Config()
    blocks = []
    for f in dataclasses.fields(Config):
        value = getattr(defaults, f.name)
        if f.name in SECTIONS:
            cls = type(value).__name__
            lines = [f"# {line}".rstrip() for line in docs[cls][""].splitlines()] + [f"{f.name}:"]
            for g in dataclasses.fields(value):
                lines += _yaml_entry(g.name, getattr(value, g.name), docs[cls].get(g.name, ""), "  ")
        else:
            lines = _yaml_entry(f.name, value, docs["Config"].get(f.name, ""), "")
        blocks.append("\n".join(lines) + "\n")
    return BASE_HEADER + "\n" + "\n".join(blocks)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description="configs/base.yaml, generated "
                                     "from the dataclasses of pipeline/config.py")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-base", action="store_true", help=f"(re)write {BASE_CONFIG}")
    group.add_argument("--check-base", action="store_true", help="exit 1 when base.yaml differs from the dataclasses")
    group.add_argument("--print-base", action="store_true", help="print the generated text")
    args = parser.parse_args(argv)
    text = base_yaml()
    if args.print_base:
        sys.stdout.write(text)
    elif args.write_base:
        BASE_CONFIG.write_text(text)
        print(f"wrote {BASE_CONFIG}")
    elif BASE_CONFIG.read_text() != text:
        print(f"{BASE_CONFIG} differs from the dataclasses in {__file__}; run python -m pipeline.config "
              "--write-base", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
