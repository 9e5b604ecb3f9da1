"""Typed run configuration: one default file, small delta files, dotted overrides, unknown keys rejected.

A run is described by ``configs/base.yaml`` (every key with its default) layered with a run file
(``configs/pretrain/xl_in21k.yaml``) and ``key=value`` overrides from the command line. The result is a
frozen :class:`Config` of typed sections; each component receives only its own section
(``build_loader(cfg.data, ...)``, ``create_model(**cfg.model ...)``), never the whole config.

The schema is the dataclasses below (OmegaConf structured configs), so a misspelt key or a value of the
wrong type is refused when the config is loaded, with the file or override that caused it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "efficientnetv2_s"
    """Registry name, e.g. efficientnetv2_s / _m / _l / _xl, efficientnetv2_b0.._b3, efficientnetv2_test."""
    num_classes: int = 0
    """Classifier outputs; 0 means: take the class count from the training data's info.json."""
    drop_rate: Optional[float] = None
    """Dropout before the classifier; None uses the variant's default (S 0.2, M 0.3, L/XL 0.4).
    With progressive learning the stage table overrides it per stage."""
    drop_path_rate: float = 0.2
    """Stochastic depth: block i of N drops with probability drop_path_rate * i / N."""
    bn_momentum: float = 0.1
    """PyTorch BN momentum. 0.1 = the official code's Keras 0.9; the paper's 0.99 is 0.01."""
    bn_eps: float = 1e-3
    padding: str = "symmetric"
    """'symmetric' (PyTorch padding) or 'same' (TF padding, needed to import tf_efficientnetv2_* weights)."""
    channels_last: bool = True
    """NHWC activations (the model converts its input; parameters keep the default layout, which DeepSpeed
    needs): cuDNN / oneDNN then run NHWC convolution kernels, faster for convnets on GPU."""
    grad_checkpointing: str = "none"
    """Activation checkpointing: 'none', 'block' or 'stage'."""
    compile: bool = False
    """Wrap the model in torch.compile."""


@dataclass
class ProgressiveConfig:
    enabled: bool = True
    """False: one stage at max values (fixed image size and regularization)."""
    preset: str = "paper"
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


@dataclass
class DataConfig:
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
    """Crop-aware reduced-size JPEG decode (PIL draft and the stored jpg_small copy)."""
    eval_image_size: int = 384
    eval_crop_threshold: int = 320
    """Below this eval size: centre crop with ratio size / (size + 32); at or above: resize the whole image."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this fraction of samples fail to decode."""


@dataclass
class OptimConfig:
    name: str = "rmsprop_tf"
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
    schedule: str = "cosine"
    """'cosine', 'exp_staircase' (x decay_rate every decay_epochs) or 'constant' (after warmup)."""
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    """Warmup length in epochs (converted with the dataset size); used when warmup_steps is 0."""
    decay_rate: float = 0.97
    decay_epochs: float = 2.4
    min_lr_ratio: float = 0.0
    clip_grad_norm: float = 0.0
    """0 disables gradient clipping."""


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    tf_warmup: bool = True
    """Decay min(decay, (1 + t) / (10 + t)) as in the TF code."""
    every: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    """'auto' (newest complete checkpoint in the run dir), 'none', or a checkpoint folder."""
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    requeue: bool = True
    """Under SLURM, rank 0 requeues the job after a preemption save."""
    preempt_check_every: int = 1
    """Steps between preemption checks (one 1-element all-reduce each); raise it if that shows in step time."""


@dataclass
class EvalConfig:
    every_steps: int = 5000
    at_stage_size: bool = False
    """Evaluate at the current stage's image size instead of data.eval_image_size."""
    max_batches: int = 0
    """0: the whole validation split."""
    micro_batch_size: int = 0
    """0: train.micro_batch_size."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    total_steps: int = 0
    """Optimizer steps; 0 means epochs * (train samples / global batch)."""
    epochs: float = 0.0
    global_batch_size: int = 4096
    micro_batch_size: int = 32
    """Per-rank micro-batch size (stages may override it; accumulation adjusts to keep the global batch)."""
    seed: int = 0
    precision: str = "auto"
    """'auto' (bf16 autocast on GPU, fp32 on CPU), 'fp32', 'bf16' (autocast, fp32 weights / BN), 'bf16_weights'."""
    zero_stage: int = 2
    label_smoothing: float = 0.0
    log_every: int = 20
    collective_timeout_s: int = 1800
    """A rank that dies makes the others fail after this many seconds instead of hanging."""
    sync_bn: bool = False
    """SyncBatchNorm instead of averaging BN running statistics across ranks before eval / save."""
    image_grid: bool = True
    """Log a grid of augmented training images at the start of each stage."""


@dataclass
class FinetuneConfig:
    head_seed: bool = True
    """Seed the new classifier's rows from the pretrained head where the class wnids agree (21k -> 1k);
    False: a freshly initialised classifier."""
    init_weights: str = "auto"
    """Weights of a DeepSpeed checkpoint or timm file to start from: 'auto' (EMA when present, else raw),
    'ema' or 'raw'. An export folder holds one set: the one it was exported with."""
    export_weights: str = "ema"
    """Weights written to RUN_DIR/export at the end: 'ema' (raw when ema.enabled is false) or 'raw'."""


@dataclass
class Config:
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


def _schema():
    return OmegaConf.structured(Config)


def _load_yaml(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one of the files under {CONFIG_DIR}")
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None


def _merge(base, delta, source: str):
    try:
        return OmegaConf.merge(base, delta)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: key '{key}': {_short(e)}; see configs/base.yaml for the keys and "
                          "their types") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0]


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
        try:
            delta = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {_short(e)}") from None
        cfg = _merge(cfg, delta, f"override '{item}'")
    obj: Config = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Cross-field checks with fix-it messages (type checks are the schema's job)."""
    m, p, d, o, t = cfg.model, cfg.progressive, cfg.data, cfg.optim, cfg.train
    _require(m.padding in ("symmetric", "same"), "model.padding", f"'{m.padding}' is not 'symmetric' or 'same'")
    _require(m.grad_checkpointing in ("none", "block", "stage"), "model.grad_checkpointing",
             f"'{m.grad_checkpointing}' is not one of none / block / stage")
    _require(p.preset in ("paper", "official"), "progressive.preset", f"'{p.preset}' is not 'paper' or 'official'")
    _require(p.num_stages >= 1, "progressive.num_stages", "must be at least 1")
    _require(0 < p.min_image_size <= p.max_image_size, "progressive.min_image_size",
             f"must be positive and at most progressive.max_image_size ({p.max_image_size})")
    _require(p.size_multiple >= 1, "progressive.size_multiple", "must be at least 1")
    _require(not p.stage_micro_batch or len(p.stage_micro_batch) == p.num_stages, "progressive.stage_micro_batch",
             f"has {len(p.stage_micro_batch)} entries for {p.num_stages} stages; give one per stage or none")
    _require((p.min_drop_path is None) == (p.max_drop_path is None), "progressive.min_drop_path",
             "set both min_drop_path and max_drop_path, or neither")
    _require(len(d.mean) == 3 and len(d.std) == 3, "data.mean", "mean and std need 3 values (RGB)")
    _require(len(d.crop_area) == 2 and 0 < d.crop_area[0] <= d.crop_area[1] <= 1, "data.crop_area",
             "needs [min, max] with 0 < min <= max <= 1")
    _require(not d.train_weights or len(d.train_weights) == len(d.train), "data.train_weights",
             f"has {len(d.train_weights)} weights for {len(d.train)} datasets")
    _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", "must be within [0, 1]")
    _require(o.name in ("rmsprop_tf", "adamw", "lamb"), "optim.name", f"'{o.name}' is not rmsprop_tf / adamw / lamb")
    _require(o.schedule in ("cosine", "exp_staircase", "constant"), "optim.schedule",
             f"'{o.schedule}' is not cosine / exp_staircase / constant")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} is not 0, 1, 2 or 3")
    _require(t.precision in ("auto", "fp32", "bf16", "bf16_weights"), "train.precision",
             f"'{t.precision}' is not auto / fp32 / bf16 / bf16_weights")
    _require(t.global_batch_size > 0 and t.micro_batch_size > 0, "train.global_batch_size",
             "global and micro batch sizes must be positive")
    _require(0 <= cfg.ema.decay < 1, "ema.decay", "must be within [0, 1)")
    reserved = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"}
    clash = sorted(reserved & set(cfg.deepspeed))
    _require(not clash, "deepspeed", f"{clash} come from the train / optim sections (one source of truth); "
             "set train.global_batch_size, train.micro_batch_size, train.precision or optim.* instead")


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
