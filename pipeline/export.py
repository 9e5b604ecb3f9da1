"""Export: a training checkpoint -> one fp32 ``model.safetensors`` + ``model.json`` (ours) or a folder in timm's
Hugging Face Hub layout; and loading either back (:func:`load_model`).

An export folder (``--format ours``, the default) is what fine-tuning, evaluation and users start from::

    model.safetensors   fp32 weights of pipeline.models.create_model(...), no wrapper prefixes
    model.json          {"format": "effnetv2-export", "version": 1,
                         "architecture": {"name": ..., "num_classes": ..., "options": {bn_eps, bn_momentum, padding}},
                         "classes": [{"index", "wnid", "name"}, ...],
                         "image_size": {"train": ..., "eval": ...}, "mean": [...], "std": [...],
                         "eval_crop_threshold": ...,  (data.eval_crop_threshold; absent in older exports)
                         "source": {"run_dir", "tag", "step", "weights": "ema" | "raw"}}

A timm folder (``--format timm``) is what ``timm.create_model("local-dir:DIR", pretrained=True)`` reads and what
``timm.models.push_to_hf_hub`` / ``save_for_hf`` write (the JSON is written here: timm is not a dependency)::

    model.safetensors   fp32 weights under timm's key names (pipeline.models.to_timm_state_dict's map)
    config.json         {"architecture": timm model name (tf_efficientnetv2_s, efficientnetv2_m ...),
                         "num_classes", "num_features", "global_pool": "avg",
                         "label_names": [wnid (or name) per class], "label_descriptions": {wnid: name},
                         "model_args": {"num_classes", "in_chans", and bn_eps / pad_type / bn_momentum where
                                        our options differ from the named variant's},
                         "pretrained_cfg": {"input_size": [3, eval, eval], "interpolation": "bilinear",
                                            "crop_pct", "crop_mode" (our eval crop rule), "mean", "std", ...},
                         "effnetv2_export": our model.json's content (timm ignores it; load_model reads it)}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Union, get_args

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpoint import checkpoints_dir, latest, load_rank_file, parts_of, read_marker, step_tag
from pipeline.config import DataConfig, ExportFormat, load_config, model_options
from pipeline.ema import ModelEMA
from pipeline.engine import consolidate_fp32_state_dict
from pipeline.models import (
    EfficientNetV2,
    create_model,
    load_timm_state_dict,
    strip_prefixes,
    timm_key_map,
    timm_model_args,
    timm_model_options,
)
from pipeline.models.timm_import import TIMM_PAD_TYPES
from pipeline.testhooks import TestHooks

EXPORT_FORMAT = "effnetv2-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
RUN_META = "run.json"
"""Written into a run dir by the trainer at start: what an export needs without the data (classes with wnids,
image sizes)."""
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
"""'ours' (model.json), 'timm' (timm's hub layout), 'both' (ours in the folder, timm's beside it: DIR_timm)."""
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS_PT = "pytorch_model.bin"
"""timm's other weights file name (read by load_model when a hub folder has no model.safetensors)."""
TIMM_META_KEY = "effnetv2_export"
"""config.json key holding our model.json content in the timm folders written here (timm ignores it)."""
TIMM_DIR_SUFFIX = "_timm"
TIMM_INTERPOLATION = "bilinear"
"""Our eval (and training) resize is antialiased bilinear (pipeline.data.transforms); timm's transforms resize
PIL images with antialiasing too, so 'bilinear' reproduces what the weights were evaluated with."""
_TIMM_ARGS_READ = {"num_classes", "in_chans", "global_pool", "bn_eps", "bn_momentum", "pad_type", "drop_rate",
                   "drop_path_rate"}
"""model_args keys of a timm config.json that load_model understands (others change the architecture)."""


class ExportError(ValueError):
    """A user error about an export or a checkpoint to export; the message says what to do."""


def save_export(state_dict: dict, meta: dict, out_dir: str | os.PathLike) -> Path:
    """Write model.safetensors (fp32, contiguous) and model.json atomically into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in strip_prefixes(state_dict).items()}
    meta = dict(meta, format=EXPORT_FORMAT, version=EXPORT_VERSION)
    tmp_w, tmp_m = out / (WEIGHTS_FILE + ".tmp"), out / (META_FILE + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": EXPORT_FORMAT})
    tmp_m.write_text(json.dumps(meta, indent=2))
    # Over an earlier export: its model.json goes first, so that a kill between the two renames leaves a folder
    # that is incomplete, never new weights under the old model.json.
    (out / META_FILE).unlink(missing_ok=True)
    os.replace(tmp_w, out / WEIGHTS_FILE)
    TestHooks(0).pause("export")
    os.replace(tmp_m, out / META_FILE)  # written last: an export with model.json is complete
    return out


def is_export(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / META_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def load_export(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (state_dict, meta) of an export folder, with a clear error when it is not one."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: does not exist; pass an export folder written by `python -m pipeline.export`")
    if not is_export(p):
        raise ExportError(f"{p}: not an export folder (needs {WEIGHTS_FILE} and {META_FILE}); "
                          f"create one with `python -m pipeline.export RUN_DIR --out {p}`")
    meta = json.loads((p / META_FILE).read_text())
    if meta.get("format") != EXPORT_FORMAT or meta.get("version", 0) > EXPORT_VERSION:
        raise ExportError(f"{p / META_FILE}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                          f"a {EXPORT_FORMAT} v<={EXPORT_VERSION} export")
    return load_file(str(p / WEIGHTS_FILE)), meta


def architecture_meta(model) -> dict:
    """The export's ``architecture`` block for a create_model() model: what :func:`model_from_export` passes
    back to create_model (name, class count, and the options that change what the weights compute)."""
    return {"name": model.pretrained_cfg["architecture"], "num_classes": model.num_classes,
            "options": {"bn_eps": model.opts.bn_eps, "bn_momentum": model.opts.bn_momentum,
                        "padding": model.opts.padding}}


def model_from_export(path: str | os.PathLike, **overrides):
    """Build the exported architecture with create_model and load its weights (strict); an export of ours only
    (:func:`load_model` also reads timm folders)."""
    state, meta = load_export(path)
    arch = meta["architecture"]
    kwargs = dict(arch.get("options", {}))
    kwargs.update(overrides)
    model = create_model(arch["name"], num_classes=arch["num_classes"], **kwargs)
    model.load_state_dict(state, strict=True)
    return model, meta


# ---- timm's hub layout --------------------------------------------------------------------------------------

def timm_export_dir(out_dir: str | os.PathLike) -> Path:
    """Where format 'both' puts the timm folder: beside ``out_dir``, named ``<out_dir>_timm``."""
    out = Path(out_dir)
    return out.with_name(out.name + TIMM_DIR_SUFFIX)


def is_timm_export(path: str | os.PathLike) -> bool:
    """A folder in timm's hub layout: config.json and model.safetensors (or pytorch_model.bin)."""
    p = Path(path)
    return (p / TIMM_CONFIG).is_file() and ((p / WEIGHTS_FILE).is_file() or (p / TIMM_WEIGHTS_PT).is_file())


def timm_eval_crop(image_size: int, crop_threshold: int) -> tuple[float, str]:
    """Our eval crop rule as timm's (crop_pct, crop_mode): below the threshold a centre square of S / (S + 32) of
    the short side -> ('center', S / (S + 32)) (timm resizes the short side to floor(S / crop_pct) = S + 32, then
    crops S); else the whole image squashed to S x S -> ('squash', 1.0)."""
    if image_size >= crop_threshold:
        return 1.0, "squash"
    pct = image_size / (image_size + 32)
    while math.floor(image_size / pct) < image_size + 32:  # float rounding: timm must get S + 32 exactly
        pct = math.nextafter(pct, 0.0)
    return pct, "center"


def timm_labels(classes: list[dict], num_classes: int) -> tuple[Optional[list[str]], Optional[dict[str, str]]]:
    """timm's label_names (the wnid of each class, else its name) and label_descriptions ({wnid: name}); (None,
    None) when the class list does not describe the classifier's rows."""
    if not classes or len(classes) != num_classes:
        return None, None
    ordered = sorted(classes, key=lambda c: int(c.get("index", 0)))
    names = [str(c.get("wnid") or c.get("name") or c.get("index")) for c in ordered]
    desc = {str(c["wnid"]): str(c["name"]) for c in ordered if c.get("wnid") and c.get("name")}
    return names, (desc or None)


def timm_config(meta: dict, *, num_features: int, in_chans: int = 3) -> dict:
    """config.json for timm (the layout timm's save_for_hf writes) from an export's meta (our model.json)."""
    arch = meta["architecture"]
    opts = arch.get("options", {})
    num_classes = int(arch["num_classes"])
    try:
        timm_name, extra = timm_model_args(arch["name"], opts.get("padding", "symmetric"), opts.get("bn_eps", 1e-3),
                                           opts.get("bn_momentum", 0.1))
    except ValueError as e:
        raise ExportError(f"--format timm: {e}") from None
    size = int(meta["image_size"]["eval"])
    threshold = meta.get("eval_crop_threshold")  # older exports have none: the config's default
    threshold = int(DataConfig.eval_crop_threshold if threshold is None else threshold)
    crop_pct, crop_mode = timm_eval_crop(size, threshold)
    cfg: dict[str, Any] = {"architecture": timm_name, "num_classes": num_classes, "num_features": num_features,
                           "global_pool": "avg"}
    names, desc = timm_labels(meta.get("classes") or [], num_classes)
    if names:
        cfg["label_names"] = names
    if desc:
        cfg["label_descriptions"] = desc
    cfg["model_args"] = {"num_classes": num_classes, "in_chans": in_chans, **extra}
    cfg["pretrained_cfg"] = {
        "custom_load": False,
        "input_size": [in_chans, size, size],
        "fixed_input_size": False,
        "interpolation": TIMM_INTERPOLATION,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "num_classes": num_classes,
        "pool_size": [math.ceil(size / 32)] * 2,
        "first_conv": "conv_stem",
        "classifier": "classifier",
    }
    cfg[TIMM_META_KEY] = {k: v for k, v in meta.items() if k not in ("format", "version")}
    return cfg


def save_timm_export(model_or_state: Union[nn.Module, dict], meta: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir`` in timm's hub layout (model.safetensors under timm's keys, config.json; both atomically,
    config.json last) from our model, or from our state dict plus ``meta["architecture"]``. ``meta`` is what
    model.json would hold (architecture, classes, image_size, mean, std, eval_crop_threshold, source)."""
    if isinstance(model_or_state, nn.Module):
        model = model_or_state
        state = model.state_dict()
        meta = dict(meta, architecture=meta.get("architecture") or architecture_meta(model))
    else:
        state = strip_prefixes(dict(model_or_state))
        arch = meta["architecture"]
        stem = state.get("stem.conv.weight")
        in_chans = int(stem.shape[1]) if isinstance(stem, torch.Tensor) else 3
        with torch.device("meta"):  # the structure only: key map and num_features, nothing allocated
            model = create_model(arch["name"], num_classes=int(arch["num_classes"]), in_chans=in_chans,
                                 **arch.get("options", {}))
    if not isinstance(model, EfficientNetV2):
        raise ExportError(f"save_timm_export: expected a create_model() model, got {type(model).__name__}")
    cfg = timm_config(meta, num_features=model.num_features, in_chans=model.stem.conv.in_channels)
    mapping = timm_key_map(model)
    missing = sorted(set(mapping) - set(state))
    if missing or set(state) - set(mapping):
        raise ExportError(f"save_timm_export: the state dict does not fit {meta['architecture']['name']} "
                          f"(missing {missing[:4]}, unexpected {sorted(set(state) - set(mapping))[:4]})")
    tensors = {mapping[k]: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (TIMM_CONFIG + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / TIMM_CONFIG)
    return out


def save_exports(model_or_state: Union[nn.Module, dict], meta: dict, out_dir: str | os.PathLike,
                 fmt: str = "ours") -> dict[str, Path]:
    """Write ``out_dir`` in format ``fmt`` ('ours', 'timm'; 'both': ours in ``out_dir``, timm's in
    :func:`timm_export_dir`). Returns {format: folder}."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"format={fmt!r}: expected one of {EXPORT_FORMATS}")
    out: dict[str, Path] = {}
    if fmt in ("timm", "both"):  # first: it refuses architectures timm has no variant of
        out["timm"] = save_timm_export(model_or_state, meta, out_dir if fmt == "timm" else timm_export_dir(out_dir))
    if fmt in ("ours", "both"):
        state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
        out = {"ours": save_export(state, meta, out_dir), **out}
    return out


def _timm_classes(cfg: dict, pcfg: dict, num_classes: int) -> list[dict]:
    names = cfg.get("label_names", pcfg.get("label_names")) or []
    desc = cfg.get("label_descriptions", pcfg.get("label_descriptions")) or {}
    if isinstance(names, dict):  # {index: name} with gaps
        names = [names.get(str(i), names.get(i)) for i in range(num_classes)]
    out = []
    for i, n in enumerate(names):
        is_wnid = isinstance(n, str) and re.fullmatch(r"n\d{8}", n) is not None
        out.append({"index": i, "wnid": n if is_wnid else None, "name": desc.get(n) if is_wnid else n})
    return out


def model_from_timm_folder(path: str | os.PathLike, allow_pickle: bool = False,
                           **overrides) -> tuple[EfficientNetV2, dict]:
    """Our model from a timm hub folder (config.json + model.safetensors / pytorch_model.bin) of a timm
    efficientnetv2_* / tf_efficientnetv2_* model: the architecture's options (plus the folder's bn_eps / pad_type
    arguments), timm's weights through our key map. The meta is the one of our model.json (``format`` 'timm',
    ``timm``: {architecture, model_args, pretrained_cfg}); folders written here carry ours (classes with index,
    sizes, eval_crop_threshold, source), others get one built from config.json (``image_size`` from input_size,
    ``source.path``). A folder whose weights are only ``pytorch_model.bin`` (a pickle) is refused unless
    ``allow_pickle``; then it is read with ``torch.load(weights_only=True)``: tensors only, nothing run."""
    p = Path(path)
    try:
        cfg = json.loads((p / TIMM_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{p / TIMM_CONFIG}: cannot read it ({e})") from None
    pcfg = dict(cfg.get("pretrained_cfg") or {k: v for k, v in cfg.items() if k != "architecture"})
    arch = cfg.get("architecture") or pcfg.get("architecture")
    args = dict(cfg.get("model_args") or {})
    unknown = sorted(set(args) - _TIMM_ARGS_READ)
    if unknown or args.get("global_pool", "avg") != "avg" or args.get("pad_type", "") not in TIMM_PAD_TYPES.values():
        raise ExportError(f"{p / TIMM_CONFIG}: model_args {args} change the architecture in ways create_model has no "
                          f"option for")
    try:
        _, opts = timm_model_options(str(arch))
    except ValueError as e:
        raise ExportError(f"{p / TIMM_CONFIG}: {e}") from None
    if "bn_eps" in args:
        opts["bn_eps"] = float(args["bn_eps"])
    if "pad_type" in args:
        opts["padding"] = {v: k for k, v in TIMM_PAD_TYPES.items()}[args["pad_type"]]
    if "bn_momentum" in args:
        opts["bn_momentum"] = float(args["bn_momentum"])
    num_classes = int(args.get("num_classes", cfg.get("num_classes", pcfg.get("num_classes", 1000))))
    in_chans = int(args.get("in_chans", (pcfg.get("input_size") or [3])[0]))
    if (p / WEIGHTS_FILE).is_file():
        state = load_file(str(p / WEIGHTS_FILE))
    elif not allow_pickle:
        raise ExportError(f"{p / TIMM_WEIGHTS_PT}: a pickle file (the folder has no {WEIGHTS_FILE}), refused because "
                          "unpickling can run code that the file brings; convert it to safetensors, or, for a file "
                          "you trust, pass --allow-pickle (it is then read as tensors only)")
    else:
        try:
            with warnings.catch_warnings():  # "pickle protocol 4 ..." and the like: the error below says enough
                warnings.simplefilter("ignore")
                state = torch.load(str(p / TIMM_WEIGHTS_PT), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # objects beyond tensors: refused by the weights-only unpickler, not run
            detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                          "not tensors")
            raise ExportError(f"{p / TIMM_WEIGHTS_PT}: holds pickled objects other than tensors ({detail}); they were "
                              "not loaded, since unpickling them could run code") from None
    kwargs = dict(opts, num_classes=num_classes, in_chans=in_chans)
    kwargs.update(overrides)
    name = timm_model_options(str(arch))[0]
    try:
        model = create_model(name, **kwargs)
        load_timm_state_dict(model, state, check_options=False)  # the folder names its options
    except ValueError as e:
        raise ExportError(f"{p}: {e}") from None
    ours = cfg.get(TIMM_META_KEY)
    if isinstance(ours, dict):
        meta = dict(ours)
    else:
        size = int((pcfg.get("input_size") or [3, 224, 224])[-1])
        meta = {"architecture": architecture_meta(model), "classes": _timm_classes(cfg, pcfg, num_classes),
                "image_size": {"train": size, "eval": size},
                "mean": list(pcfg.get("mean", (0.485, 0.456, 0.406))),
                "std": list(pcfg.get("std", (0.229, 0.224, 0.225))),
                "source": {"path": str(p.resolve())}}
    meta.update(format="timm", timm={"architecture": arch, "model_args": args, "pretrained_cfg": pcfg})
    return model, meta


def load_model(path: str | os.PathLike, allow_pickle: bool = False, **overrides) -> tuple[EfficientNetV2, dict]:
    """(model, meta) from an export folder of ours (model.json) or a timm hub folder (config.json +
    model.safetensors, e.g. written by ``--format timm`` or downloaded from the Hub). ``overrides`` go to
    create_model (``channels_last`` ...); ``allow_pickle`` lets a timm folder holding only pytorch_model.bin be
    read (tensors only). The meta has our model.json's keys (architecture, classes,
    image_size, mean, std, and eval_crop_threshold and source where known); see :func:`model_from_timm_folder`."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: does not exist; pass an export folder (ours or timm's hub layout)")
    if is_export(p):
        return model_from_export(p, **overrides)
    if is_timm_export(p):
        return model_from_timm_folder(p, allow_pickle=allow_pickle, **overrides)
    raise ExportError(f"{p}: neither an export folder ({WEIGHTS_FILE} + {META_FILE}) nor a timm folder "
                      f"({TIMM_CONFIG} + {WEIGHTS_FILE}); create one with "
                      f"`python -m pipeline.export RUN_DIR --out {p}`")


# ---- from a training checkpoint ----------------------------------------------------------------------------

def export_checkpoint(run_dir: str | os.PathLike, *, step: Optional[int] = None, ema: bool = False,
                      out_dir: str | os.PathLike, fmt: str = "ours") -> Path:
    """Consolidate checkpoint ``step`` (default: the newest complete one) of a pretraining run into an export
    folder: fp32 weights from the ZeRO shards, or the EMA weights (reassembled from the per-rank shards under
    ZeRO-3). ``fmt``: see :func:`save_exports`; returns ``out_dir``."""
    run = Path(run_dir)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise ExportError(f"{run}: no config.yaml; pass the run directory of a pretraining run (train.run_dir)")
    cfg = load_config(cfg_file, base=None)
    if step is None:
        step = latest(run)
        if step is None:
            raise ExportError(f"{run}: no complete checkpoint under {checkpoints_dir(run)}")
    ckpt_dir = checkpoints_dir(run)
    tag = step_tag(step)
    marker = read_marker(ckpt_dir / tag)
    if marker is None:
        raise ExportError(f"{ckpt_dir / tag}: missing or incomplete checkpoint (no COMPLETE.json)")
    meta_file = run / RUN_META
    if not meta_file.is_file():
        raise ExportError(f"{run}: no {RUN_META} (written when a run starts); is this a pretraining run folder?")
    run_meta = json.loads(meta_file.read_text())
    m = cfg.model
    model = create_model(m.name, num_classes=m.num_classes or run_meta["num_classes"], drop_rate=None,
                         drop_path_rate=m.drop_path_rate, **model_options(m))
    raw = consolidate_fp32_state_dict(ckpt_dir, tag)
    if ema:
        ema_states = _rank_parts(ckpt_dir / tag, int(marker.get("world_size", 1)), "ema")
        if not ema_states:
            raise ExportError(f"{ckpt_dir / tag}: holds no EMA weights (ema.enabled was false); export without --ema")
        model.load_state_dict(raw, strict=True)  # the EMA reassembles against the model's shapes
        holder = ModelEMA(model, decay=cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup)
        holder.load_state_dict(ema_states if ema_states[0].get("sharded") else ema_states[0])
        state = holder.full_state_dict(rank0_only=False, sync=False)
    else:
        state = raw
    model.load_state_dict(state, strict=True)  # the export must load into create_model as it is
    meta = {
        "architecture": architecture_meta(model),
        "classes": run_meta["classes"],
        "image_size": {"train": run_meta["train_image_size"], "eval": run_meta["eval_image_size"]},
        "mean": list(cfg.data.mean), "std": list(cfg.data.std), "eval_crop_threshold": cfg.data.eval_crop_threshold,
        "source": {"run_dir": str(run.resolve()), "tag": tag, "step": step, "weights": "ema" if ema else "raw"},
    }
    save_exports(state, meta, out_dir, fmt)
    return Path(out_dir)


def _rank_parts(ckpt: Path, world_size: int, name: str) -> list:
    """The ``name`` part of every rank file that holds one (rank order)."""
    out = []
    for r in range(world_size):
        parts = parts_of(load_rank_file(ckpt, r))
        if parts.get(name) is not None:
            out.append(parts[name])
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export",
                                 description="Consolidate a pretraining checkpoint into model.safetensors + model.json "
                                             "(ours) or a folder timm and the Hugging Face Hub read (--format timm)")
    ap.add_argument("run_dir", help="pretraining run directory (holds config.yaml and checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw weights")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--format", choices=EXPORT_FORMATS, default="ours",
                    help="ours: model.safetensors + model.json; timm: timm's hub layout (config.json + "
                         "model.safetensors under timm's keys: timm.create_model('local-dir:OUT', pretrained=True)); "
                         "both: ours in OUT, timm's in OUT_timm")
    args = ap.parse_args(argv)
    try:
        export_checkpoint(args.run_dir, step=args.step, ema=args.ema, out_dir=args.out, fmt=args.format)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    outs = [args.out] if args.format != "both" else [args.out, str(timm_export_dir(args.out))]
    print(f"exported {'EMA' if args.ema else 'raw'} weights to {' and '.join(outs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
