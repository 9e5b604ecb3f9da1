"""Fine-tuning pieces that need no process group: where the initial weights come from, the new (seeded) head,
class lists and the result table. The :class:`pipeline.finetune.Finetune` recipe uses them.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpoint import CHECKPOINTS, checkpoints_dir, latest, tag_step
from pipeline.config import ConfigError, DataConfig, ModelConfig, load_config, model_options
from pipeline.data.hf import HFSource  # imports datasets only when it opens a dataset
from pipeline.data.shards import load_split
from pipeline.export import ExportError, export_checkpoint, is_export, load_export
from pipeline.models import (
    create_model,
    create_model_from_timm,
    load_timm_state_dict,
    nearest_timm_variant,
    strip_prefixes,
    timm_model_options,
)

TIMM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
"""Init files that are pickles (torch.save): refused unless finetune.allow_pickle is true."""
_WNID_RE = re.compile(r"^n\d{8}$")
_INIT_HELP = ("pass an export folder (python -m pipeline.export RUN_DIR --ema --out DIR), a pretraining run dir "
              "or its checkpoints/step-N folder, or a timm checkpoint file (.safetensors; .pth with "
              "finetune.allow_pickle=true)")


class FinetuneError(ValueError):
    """A user error in fine-tuning input (init, classes, data); the message names the key and the fix."""


# ---- class lists ------------------------------------------------------------------------------------------

def normalize_classes(classes: Sequence[Any]) -> list[dict]:
    """Class lists as [{"index", "wnid", "name"}]; plain strings count as a wnid when shaped like one."""
    out = []
    for i, c in enumerate(classes or []):
        if isinstance(c, dict):
            out.append({"index": int(c.get("index", i)), "wnid": c.get("wnid"), "name": c.get("name")})
        else:
            s = str(c)
            out.append({"index": i, "wnid": s if _WNID_RE.match(s) else None, "name": s})
    return out


def class_list(classes: Sequence[Any], num_classes: int) -> list[dict]:
    """Exactly ``num_classes`` entries, by index: the data's own where it has them, else just the index."""
    by_index = {c["index"]: c for c in normalize_classes(classes) if 0 <= c["index"] < num_classes}
    return [by_index.get(i, {"index": i, "wnid": None, "name": str(i)}) for i in range(num_classes)]


@dataclass
class DataInfo:
    """What fine-tuning needs to know about its training data before any loader exists."""

    classes: list[dict]
    num_classes: int
    samples: int
    describe: str


def describe_train_data(cfg: DataConfig) -> DataInfo:
    """Class list and size of the training data: shard folders (info.json) or a datasets dataset."""
    if cfg.hf_dataset:
        src = HFSource.from_config(cfg, cfg.hf_train_split)
        return DataInfo(class_list(src.classes, int(src.num_classes)), int(src.num_classes), len(src),
                        f"{cfg.hf_dataset} [{cfg.hf_train_split}]")
    if not cfg.train:
        raise FinetuneError("data.train is empty: list the shard folders of the target dataset (written by "
                            "`python -m shards write ...`), or set data.hf_dataset to a datasets folder / cached name")
    first = load_split(cfg.train[0], cfg.train_split)
    samples = first.samples + sum(load_split(r, cfg.train_split).samples for r in cfg.train[1:])
    return DataInfo(class_list(first.classes, first.num_classes), first.num_classes, samples, f"{first.info_path}")


def resolve_num_classes(configured: int, data_classes: int, data_source: str) -> int:
    """model.num_classes (0 = from the data) against the class count of the training data."""
    if configured and configured != data_classes:
        raise FinetuneError(f"model.num_classes={configured} but the training data ({data_source}) has "
                            f"{data_classes} classes; set model.num_classes=0 (take it from the data) or "
                            f"model.num_classes={data_classes}")
    return data_classes


# ---- init: what to start from -----------------------------------------------------------------------------

@dataclass
class InitSource:
    """Where fine-tuning starts, classified before anything heavy is loaded."""

    kind: str
    """'export', 'deepspeed' or 'timm'."""
    path: Path
    run_dir: Optional[Path] = None
    """DeepSpeed: the pretraining run dir."""
    step: Optional[int] = None
    """DeepSpeed: the checkpoint step (None: the newest complete one)."""


@dataclass
class InitWeights:
    """The loaded initial weights with what is known about them."""

    source: InitSource
    state_dict: dict[str, torch.Tensor]
    arch_name: Optional[str] = None
    """Registry name from the export's metadata (None for timm files: model.name decides)."""
    num_classes: Optional[int] = None
    classes: list[dict] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    weights: str = "raw"
    """'ema' or 'raw' (for timm files: the nested dict used)."""
    meta: dict[str, Any] = field(default_factory=dict)


def classify_init(path: Optional[str]) -> InitSource:
    """Decide what kind of init ``path`` is, or say clearly why it is none (cheap: reads no weights)."""
    if not path:
        raise FinetuneError(f"init: not set; {_INIT_HELP}, e.g. init=runs/pretrain_xl/export")
    p = Path(path)
    if not p.exists():
        raise FinetuneError(f"init={path}: does not exist; {_INIT_HELP}")
    if p.is_file():
        if p.name.endswith(TIMM_SUFFIXES):
            return InitSource("timm", p)
        raise FinetuneError(f"init={path}: a file that is not a checkpoint ({'/'.join(TIMM_SUFFIXES)}); {_INIT_HELP}")
    if is_export(p):
        return InitSource("export", p)
    step = tag_step(p.name)
    if step is not None and p.parent.name == CHECKPOINTS:
        return InitSource("deepspeed", p, run_dir=p.parent.parent, step=step)
    ckpts = checkpoints_dir(p)
    if ckpts.is_dir() and any(tag_step(c.name) is not None for c in ckpts.iterdir()):
        return InitSource("deepspeed", p, run_dir=p, step=None)
    raise FinetuneError(f"init={path}: a folder that is neither an export (model.safetensors + model.json) nor a "
                        f"pretraining run with checkpoints/step-N; {_INIT_HELP}")


def consolidate_deepspeed(src: InitSource, out_dir: Path, weights: str = "auto") -> Path:
    """Turn a DeepSpeed checkpoint of a pretraining run into an export folder; returns out_dir.

    ``weights`` 'auto' takes the EMA weights when the run kept an EMA (its config.yaml says ema.enabled),
    else the raw ones; 'ema' / 'raw' insist."""
    cfg_file = Path(src.run_dir) / "config.yaml"
    if not cfg_file.is_file():
        raise FinetuneError(f"init={src.path}: {cfg_file} is missing, so this is not a pretraining run folder; "
                            f"{_INIT_HELP}")
    if weights == "auto":
        try:
            weights = "ema" if load_config(cfg_file, base=None).ema.enabled else "raw"
        except ConfigError as e:
            raise FinetuneError(f"init={src.path}: cannot read the run's config ({e})") from None
    try:
        export_checkpoint(src.run_dir, step=src.step, ema=weights == "ema", out_dir=out_dir)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise FinetuneError(f"init={src.path}: cannot consolidate the checkpoint: {e}") from None
    return out_dir


def export_is_of(export_dir: Path, src: InitSource) -> bool:
    """Whether an export folder was consolidated from the checkpoint ``src`` names (its run dir and step; the
    newest complete step when ``src`` names a run dir)."""
    try:
        source = json.loads((Path(export_dir) / "model.json").read_text()).get("source") or {}
    except (OSError, ValueError):
        return False
    step = src.step if src.step is not None else latest(src.run_dir)
    return (source.get("run_dir") == str(Path(src.run_dir).resolve()) and source.get("step") == step)


def load_init(src: InitSource, *, weights: str = "auto", allow_pickle: bool = False) -> InitWeights:
    """Load the weights of an export folder or a timm file (a DeepSpeed source must be consolidated first).

    A pickle file (.pth / .pt / .bin) is refused unless ``allow_pickle`` (finetune.allow_pickle): unpickling can
    run code the file brings. When allowed it is read with ``torch.load(weights_only=True)``, which refuses any
    object but tensors and plain containers without running it."""
    if src.kind == "export":
        try:
            state, meta = load_export(src.path)
        except ExportError as e:
            raise FinetuneError(f"init={src.path}: {e}") from None
        arch = meta.get("architecture") or {}
        if "name" not in arch or "num_classes" not in arch:
            raise FinetuneError(f"init={src.path}/model.json: no architecture name / num_classes; re-export it "
                                f"with `python -m pipeline.export`")
        return InitWeights(src, state, arch_name=arch["name"], num_classes=int(arch["num_classes"]),
                           classes=normalize_classes(meta.get("classes") or []), options=dict(arch.get("options", {})),
                           weights=(meta.get("source") or {}).get("weights", "raw"), meta=meta)
    if src.kind == "timm":
        if src.path.name.endswith(PICKLE_SUFFIXES) and not allow_pickle:
            raise FinetuneError(f"init={src.path}: a pickle file, refused because unpickling can run code that the "
                                "file brings; pass a .safetensors file or an export folder, or, for a file you "
                                "trust, set finetune.allow_pickle=true (it is then read with torch.load("
                                "weights_only=True): tensors only)")
        state, used = _read_timm_file(src.path, weights)
        return InitWeights(src, state, weights=used)
    raise AssertionError(f"load_init({src.kind}): consolidate DeepSpeed checkpoints first")


def _read_timm_file(path: Path, weights: str) -> tuple[dict, str]:
    try:
        if path.name.endswith(".safetensors"):
            obj: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():  # "pickle protocol 4 ..." and the like: the error below says enough
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # objects beyond tensors: refused by the weights-only unpickler, never run
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      "not tensors")
        raise FinetuneError(f"init={path}: holds pickled objects other than tensors ({detail}); they were not "
                            "loaded, since unpickling them could run code. Pass a .safetensors file or an export "
                            "folder") from None
    except Exception as e:  # corrupt / truncated
        raise FinetuneError(f"init={path}: cannot read it as a checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); pass a timm .safetensors / .pth "
                            "file") from None
    if not isinstance(obj, dict):
        raise FinetuneError(f"init={path}: holds a {type(obj).__name__}, not a state dict")
    # timm training checkpoints nest the weights; the EMA copy is the one to fine-tune from when present.
    nests = {"ema": ("state_dict_ema", "model_ema"), "raw": ("state_dict", "model")}
    order = {"auto": ("ema", "raw"), "ema": ("ema",), "raw": ("raw",)}[weights]
    for which in order:
        for key in nests[which]:
            if isinstance(obj.get(key), dict):
                return obj[key], which
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "raw"
    raise FinetuneError(f"init={path}: no state dict inside (looked for {[k for w in order for k in nests[w]]}); "
                        f"top-level keys: {sorted(obj)[:8]}")


# ---- the model with its new head --------------------------------------------------------------------------

def class_wnids(classes: Sequence[dict]) -> list[Optional[str]]:
    return [c.get("wnid") for c in classes]


def seed_head_rows(classifier: nn.Linear, old_weight: torch.Tensor, old_bias: Optional[torch.Tensor],
                   old_classes: Sequence[dict], new_classes: Sequence[dict]) -> int:
    """Copy the pretrained head's rows into the new head where the wnids agree; returns how many rows."""
    old_index = {w: i for i, w in enumerate(class_wnids(old_classes)) if w}
    pairs = [(j, old_index[w]) for j, w in enumerate(class_wnids(new_classes)) if w and w in old_index]
    if not pairs:
        return 0
    if old_weight.shape[1] != classifier.weight.shape[1]:
        raise FinetuneError(f"pretrained head has {old_weight.shape[1]} input features, the model "
                            f"{classifier.weight.shape[1]}; the init does not match model.name")
    new_rows = torch.tensor([j for j, _ in pairs])
    old_rows = torch.tensor([i for _, i in pairs])
    with torch.no_grad():
        classifier.weight[new_rows] = old_weight[old_rows].to(classifier.weight)
        if old_bias is not None and classifier.bias is not None:
            classifier.bias[new_rows] = old_bias[old_rows].to(classifier.bias)
    return len(pairs)


def _load_backbone(model: nn.Module, state: dict, init: InitWeights) -> None:
    """Strict load of everything but the classifier, with a message that names what does not fit."""
    state = {k: v for k, v in strip_prefixes(state).items() if not k.startswith("classifier.")}
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)}" for k in set(ours) & set(state)
                    if state[k].shape != ours[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(f"{n} {what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for n, what, keys in ((len(missing), "missing", missing),
                                                 (len(unexpected), "unexpected", unexpected),
                                                 (len(shapes), "mis-shaped", shapes)) if keys)
        name = model.pretrained_cfg.get("architecture")
        raise FinetuneError(f"init={init.source.path}: weights do not fit model.name={name} "
                            f"({detail}); set model.name to the architecture the init was trained with")
    model.load_state_dict(state, strict=False)


def check_architecture(init: InitWeights, model_cfg: ModelConfig) -> None:
    """An export names its architecture: it must be model.name (timm files say nothing; model.name decides)."""
    if init.arch_name is not None and init.arch_name != model_cfg.name:
        raise FinetuneError(f"init={init.source.path} holds {init.arch_name} weights but model.name is "
                            f"{model_cfg.name}; set model.name={init.arch_name} (and its eval size), or pass an "
                            f"init of {model_cfg.name}")


def build_model(init: InitWeights, model_cfg: ModelConfig, classes: Sequence[dict], *, head_seed: bool,
                log: Callable[[str], None] = print) -> nn.Module:
    """create_model(model.name) for len(classes) outputs, the init's weights in it, and the head seeded from
    the pretrained head by wnid when both class lists carry wnids. A timm file builds model.name's timm variant
    (:func:`timm_name_for`) with that variant's padding and BN eps (:func:`create_model_from_timm`)."""
    check_architecture(init, model_cfg)
    options = model_options(model_cfg)
    if init.source.kind == "timm":
        return _build_from_timm_file(init, model_cfg, options, len(classes), log)
    # Padding and BN eps define what the pretrained weights compute: the init's values win over the config's.
    for key in ("padding", "bn_eps"):
        if key in init.options and init.options[key] != options[key]:
            log(f"model.{key}: using the init's {init.options[key]!r} (config: {options[key]!r})")
            options[key] = init.options[key]
    try:
        model = create_model(model_cfg.name, num_classes=len(classes), drop_rate=model_cfg.drop_rate,
                             drop_path_rate=model_cfg.drop_path_rate, **options)
    except ValueError as e:
        raise FinetuneError(f"model: {e}") from None

    _load_backbone(model, init.state_dict, init)
    old_w, old_b = init.state_dict.get("classifier.weight"), init.state_dict.get("classifier.bias")
    what = f"init: {init.source.kind} {init.source.path} ({init.arch_name}, {init.weights} weights)"
    if not head_seed or old_w is None:
        log(f"{what}; new classifier for {len(classes)} classes")
    elif not any(class_wnids(init.classes)) or not any(class_wnids(classes)):
        log(f"{what}; new classifier for {len(classes)} classes (no wnids on both sides to seed it from)")
    else:
        n = seed_head_rows(model.classifier, old_w, old_b, init.classes, classes)
        log(f"{what}; seeded {n} of {len(classes)} classifier rows from the pretrained head (matched by wnid)")
    return model


def timm_name_for(model_cfg: ModelConfig) -> Optional[str]:
    """The timm variant a timm file for model.name is taken to be (a timm state dict does not say which): with
    model.padding 'same' tf_efficientnetv2_*, else timm's own efficientnetv2_{s,m,l,xl} (B0-B3 exist only as
    tf_efficientnetv2_b*); None for a model timm has no variant of (efficientnetv2_test)."""
    return nearest_timm_variant(model_cfg.name, model_cfg.padding)


def _build_from_timm_file(init: InitWeights, model_cfg: ModelConfig, options: dict, num_classes: int,
                          log: Callable[[str], None]) -> nn.Module:
    """The model for a timm file: model.name's timm variant with that variant's padding and BN eps (they define
    what the weights compute; the config's values give way, with a line saying so), a new classifier."""
    timm_name = timm_name_for(model_cfg)
    hint = "; set model.name (and model.padding=same for tf_efficientnetv2_* weights) to match the file"
    try:
        if timm_name is None:  # no timm variant (the tiny test model): the config's options as they are
            model = create_model(model_cfg.name, num_classes=num_classes, drop_rate=model_cfg.drop_rate,
                                 drop_path_rate=model_cfg.drop_path_rate, **options)
            load_timm_state_dict(model, init.state_dict, ignore_classifier=True)
            what = model_cfg.name
        else:
            variant = timm_model_options(timm_name)[1]
            for key, value in variant.items():
                if options[key] != value:
                    log(f"model.{key}: using {timm_name}'s {value!r} (config: {options[key]!r})")
            rest = {k: v for k, v in options.items() if k not in variant}
            model = create_model_from_timm(timm_name, init.state_dict, ignore_classifier=True, num_classes=num_classes,
                                           drop_rate=model_cfg.drop_rate, drop_path_rate=model_cfg.drop_path_rate,
                                           **rest)
            what = f"{timm_name} (padding={variant['padding']!r}, bn_eps={variant['bn_eps']:g})"
            if variant["padding"] != "same":
                what += "; for tf_efficientnetv2_* weights set model.padding=same"
    except ValueError as e:
        raise FinetuneError(f"init={init.source.path}: {e}{hint}") from None
    log(f"init: timm file {init.source.path} ({init.weights} weights) as {what}; new classifier for "
        f"{num_classes} classes")
    return model


def check_export_format(model_cfg: ModelConfig, export_format: str) -> None:
    """finetune.export_format 'timm' / 'both' needs a model timm has a variant of; said before training."""
    if export_format != "ours" and nearest_timm_variant(model_cfg.name, model_cfg.padding) is None:
        raise FinetuneError(f"finetune.export_format={export_format}: timm has no variant of model.name="
                            f"{model_cfg.name}; use finetune.export_format=ours")


# ---- results -----------------------------------------------------------------------------------------------

def result_table(results: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per weight set (raw / ema), top-1 / top-5 in percent."""
    lines = [f"{'weights':<8} {'top-1':>7} {'top-5':>7} {'images':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<8} {r['top1']:>7.2f} {r['top5']:>7.2f} {int(r['samples']):>8d}")
    return "\n".join(lines)
