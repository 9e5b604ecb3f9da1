"""Export: a training checkpoint -> one fp32 ``model.safetensors`` + ``model.json``; and loading an export back.

An export folder is what fine-tuning, evaluation and users start from::

    model.safetensors   fp32 weights of pipeline.models.create_model(...), no wrapper prefixes
    model.json          {"format": "effnetv2-export", "version": 1,
                         "architecture": {"name": ..., "num_classes": ..., "options": {bn_eps, bn_momentum, padding}},
                         "classes": [{"index", "wnid", "name"}, ...],
                         "image_size": {"train": ..., "eval": ...}, "mean": [...], "std": [...],
                         "source": {"run_dir", "tag", "step", "weights": "ema" | "raw"}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpoint import checkpoints_dir, latest, load_rank_file, parts_of, read_marker, step_tag
from pipeline.config import load_config, model_options
from pipeline.ema import ModelEMA
from pipeline.engine import consolidate_fp32_state_dict
from pipeline.models import create_model, strip_prefixes

EXPORT_FORMAT = "effnetv2-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
RUN_META = "run.json"
"""Written into a run dir by the trainer at start: what an export needs without the data (classes with wnids,
image sizes)."""


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
    os.replace(tmp_w, out / WEIGHTS_FILE)
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
    """Build the exported architecture with create_model and load its weights (strict)."""
    state, meta = load_export(path)
    arch = meta["architecture"]
    kwargs = dict(arch.get("options", {}))
    kwargs.update(overrides)
    model = create_model(arch["name"], num_classes=arch["num_classes"], **kwargs)
    model.load_state_dict(state, strict=True)
    return model, meta


def export_checkpoint(run_dir: str | os.PathLike, *, step: Optional[int] = None, ema: bool = False,
                      out_dir: str | os.PathLike) -> Path:
    """Consolidate checkpoint ``step`` (default: the newest complete one) of a pretraining run into an export
    folder: fp32 weights from the ZeRO shards, or the EMA weights (reassembled from the per-rank shards under
    ZeRO-3)."""
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
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "source": {"run_dir": str(run.resolve()), "tag": tag, "step": step, "weights": "ema" if ema else "raw"},
    }
    return save_export(state, meta, out_dir)


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
                                 description="Consolidate a pretraining checkpoint into model.safetensors + model.json")
    ap.add_argument("run_dir", help="pretraining run directory (holds config.yaml and checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw weights")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, step=args.step, ema=args.ema, out_dir=args.out)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {'EMA' if args.ema else 'raw'} weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
