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

from pipeline.models import strip_prefixes

EXPORT_FORMAT = "effnetv2-export"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class ExportError(ValueError):
    """A user error about an export or a checkpoint to export; the message says what to do."""


def save_export(state_dict: dict, meta: dict, out_dir: str | os.PathLike) -> Path:
    """Write model.safetensors (fp32, contiguous) and model.json atomically into out_dir."""
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

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
    from pipeline.models import create_model

    state, meta = load_export(path)
    arch = meta["architecture"]
    kwargs = dict(arch.get("options", {}))
    kwargs.update(overrides)
    model = create_model(arch["name"], num_classes=arch["num_classes"], **kwargs)
    model.load_state_dict(state, strict=True)
    return model, meta


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export",
                                 description="Consolidate a pretraining checkpoint into model.safetensors + model.json")
    ap.add_argument("run_dir", help="pretraining run directory (holds config.yaml and checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw weights")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        from pipeline.trainer import export_checkpoint

        out = export_checkpoint(args.run_dir, step=args.step, ema=args.ema, out_dir=args.out)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {'EMA' if args.ema else 'raw'} weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
