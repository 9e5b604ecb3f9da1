"""``python -m pipeline.evaluate``: top-1 / top-5 of an export at several test image sizes (a resolution sweep).

    python -m pipeline.evaluate EXPORT --data SHARDS [--split val] --sizes 224 256 288 320 384 480
    python -m pipeline.evaluate EXPORT --hf-dataset FOLDER [--split test] --sizes 224 288 384
    accelerate launch [--multi_gpu --num_processes N] -m pipeline.evaluate EXPORT ...    (or torchrun)

EXPORT is a folder written by ``python -m pipeline.export`` (or by fine-tuning), ours or in timm's hub layout
(:func:`pipeline.export.load_model`). The data are the validation shards of a folder written by
``python -m shards write`` (``info.json``), or a split of a ``datasets`` folder (``Dataset.save_to_disk``). At
each size the images go through the eval transform of training (:class:`pipeline.data.transforms.EvalTransform`,
the reference's ``preprocess_for_eval``): below ``--crop-threshold`` a centre square of size / (size + 32) of the
short side, at or above it the whole image, resized to size x size. The threshold defaults to the one the
export's run evaluated with (its ``data.eval_crop_threshold``), else the reference's 320; mean / std are the
export's.

The paper evaluates at a larger size than the last training stage; the table shows where accuracy peaks (the
peak row is marked, and so is the size the export was trained at). Per size: top-1, top-5, the images counted
and images/s (all processes' images over the wall time of the pass, loader start included). Under a launcher
every process evaluates its part of the split (the eval loader splits it by rank and pads; padding does not
count) and the counts are summed, so every image counts once; rank 0 prints and writes. ``--json OUT`` writes
the same table as JSON, ``--tensorboard DIR`` logs ``eval_sweep/top1``, ``eval_sweep/top5`` and
``eval_sweep/images_per_s`` with the image size as the step. Bad input (no export, no such split) ends with one
``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from pipeline import distributed
from pipeline.config import ConfigError, DataConfig
from pipeline.data.hf import load_hf_dataset
from pipeline.data.loader import build_eval_loader, remote_options
from pipeline.data.shards import DataError, read_info
from pipeline.export import ExportError, load_model
from pipeline.metrics import evaluate_topk, write_json

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SIZES = (224, 256, 288, 320, 384, 480)


class EvalError(ValueError):
    """A user error in the evaluation's arguments; the message says what to do."""


# ---------------------------------------------------------------------------------------------- pieces


def crop_rule(size: int, threshold: int) -> dict:
    """The eval geometry at ``size`` (as :func:`pipeline.data.transforms.eval_crop_box`): ``crop`` 'centre' with
    ``crop_fraction`` size / (size + 32) of the short side below ``threshold``, else 'full' (fraction 1)."""
    if size < threshold:
        return {"crop": "centre", "crop_fraction": size / (size + 32)}
    return {"crop": "full", "crop_fraction": 1.0}


def normalisation(meta: dict) -> tuple[list[float], list[float]]:
    """Mean and std of the export's metadata."""
    if not (meta.get("mean") and meta.get("std")):
        raise EvalError("the export's metadata has no mean / std (model.json 'mean' and 'std'); re-export it with "
                        "`python -m pipeline.export`")
    return [float(x) for x in meta["mean"]], [float(x) for x in meta["std"]]


def crop_threshold(given: Optional[int], meta: dict) -> tuple[int, str]:
    """The crop threshold and where it comes from: --crop-threshold, else the export's (its run's
    data.eval_crop_threshold), else data.eval_crop_threshold's default (the reference's 320)."""
    if given is not None:
        return int(given), "--crop-threshold"
    if meta.get("eval_crop_threshold") is not None:
        return int(meta["eval_crop_threshold"]), "the export's"
    return int(DataConfig.eval_crop_threshold), "default"


def data_config(args: argparse.Namespace, mean: list[float], std: list[float], threshold: int) -> DataConfig:
    """The data section the eval loader reads: the validation source, split, workers, crop rule, normalisation."""
    kw: dict[str, Any] = dict(workers=args.workers, mean=mean, std=std, eval_crop_threshold=threshold)
    if args.data:
        kw.update(val=args.data, val_split=args.split or DataConfig.val_split)
    else:
        kw.update(hf_dataset=args.hf_dataset, hf_val_split=args.split or DataConfig.hf_val_split,
                  hf_image_column=args.image_column, hf_label_column=args.label_column)
    return DataConfig(**kw)


def check_data(cfg: DataConfig) -> Optional[list]:
    """That the data and the split exist, before anything starts (the split named with --split in the message);
    returns the shards' class list (None for a datasets folder)."""
    if cfg.val:
        if "://" not in cfg.val and not Path(cfg.val).exists():
            raise EvalError(f"--data {cfg.val}: does not exist; pass a shard folder written by `python -m shards "
                            "write` (with its info.json)")
        info, path = read_info(cfg.val, remote_options(cfg))  # s3:// with data.s3_endpoint_url, retries
        splits, split = list(info.get("splits") or {}), cfg.val_split
        if split not in splits:
            raise EvalError(f"{path}: no split {split!r} (it has: {', '.join(splits) or 'none'}); pass one of "
                            "those with --split")
        return info.get("classes")
    dict_file = Path(cfg.hf_dataset) / "dataset_dict.json"  # save_to_disk of a DatasetDict
    if dict_file.is_file():
        try:
            splits = list(json.loads(dict_file.read_text())["splits"])
        except (ValueError, KeyError, TypeError):
            splits = None
        if splits is not None and cfg.hf_val_split not in splits:
            raise EvalError(f"--hf-dataset {cfg.hf_dataset}: no split {cfg.hf_val_split!r} (it has: "
                            f"{', '.join(splits) or 'none'}); pass one of those with --split")
    load_hf_dataset(cfg.hf_dataset, cfg.hf_val_split)  # any other problem, said by the datasets reader
    return None


def class_mismatch(model_classes: Optional[list], data_classes: Optional[list]) -> Optional[str]:
    """A warning when both sides name their classes by wnid and class i is not the same class on both."""
    def wnids(classes):
        if not classes or not all(isinstance(c, dict) and c.get("wnid") for c in classes):
            return None
        return [c["wnid"] for c in sorted(classes, key=lambda c: c.get("index", 0))]

    m, d = wnids(model_classes), wnids(data_classes)
    if m is None or d is None or m[:len(d)] == d:
        return None
    i = next((i for i, (a, b) in enumerate(zip(m, d)) if a != b), min(len(m), len(d)))
    return (f"warning: the export's classes are not the data's (class {i}: {m[i] if i < len(m) else 'none'} in the "
            f"export, {d[i] if i < len(d) else 'none'} in the data); the accuracies compare different label sets")


def eval_loaders(cfg: DataConfig, sizes: Sequence[int], *, batch_size: int, num_classes: int, rank: int = 0,
                 world_size: int = 1) -> dict[int, Any]:
    """This rank's eval loader per size (built before any pass, so a data error comes first)."""
    return {int(size): build_eval_loader(cfg, image_size=size, micro_batch_size=batch_size, rank=rank,
                                         world_size=world_size, num_classes=num_classes) for size in sizes}


def sweep(model: nn.Module, loaders: dict[int, Any], *, crop_threshold: int, device: torch.device,
          precision: str = "fp32", group: Any = None, progress=None) -> list[dict]:
    """One eval pass per size (``loaders``: :func:`eval_loaders`); the rows of the table, the same on every rank
    (a collective per size under a process group)."""
    dtype = PRECISIONS[precision]

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return model(x)

    rows = []
    for size, loader in loaders.items():
        if device.type == "cuda":  # first-call costs of this input shape out of the timing
            with torch.no_grad():
                forward(torch.zeros(loader.batch_size, 3, size, size, device=device))
            torch.cuda.synchronize(device)
        distributed.barrier(group)
        t0 = time.perf_counter()
        res = evaluate_topk(forward, loader, device=device, group=group)
        seconds = distributed.all_reduce_max(time.perf_counter() - t0, group)  # the slowest rank's pass
        bad = int(distributed.all_reduce_sum(float(loader.bad_samples), group))
        row = {"size": size, **crop_rule(size, crop_threshold), **res, "seconds": seconds,
               "images_per_s": res["samples"] / seconds if seconds > 0 else 0.0, "bad_samples": bad}
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def peak(rows: Sequence[dict]) -> dict:
    """The row of the highest top-1 (then top-5; then the smaller size)."""
    return max(rows, key=lambda r: (r["top1"], r["top5"], -r["size"]))


def _crop_text(row: dict) -> str:
    return f"centre {row['crop_fraction']:.3f}" if row["crop"] == "centre" else "whole image"


def format_table(result: dict) -> str:
    """The sweep as a fixed-width table (a JSON written by this module in, text out)."""
    rows, train = result["results"], result.get("train_image_size")
    best = peak(rows)["size"] if rows else None
    lines = [f"{'size':>6}  {'crop':<13} {'top-1':>7} {'top-5':>7} {'images':>8} {'images/s':>9}"]
    for r in rows:
        notes = [n for n, on in (("<- peak", r["size"] == best), ("trained at this size", r["size"] == train)) if on]
        lines.append(f"{r['size']:>6}  {_crop_text(r):<13} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['samples']:>8} "
                     f"{r['images_per_s']:>9.1f}  {', '.join(notes)}".rstrip())
    return "\n".join(lines)


def header(result: dict) -> str:
    m, src = result["model"], result.get("source") or {}
    weights = f", {'EMA' if src.get('weights') == 'ema' else src['weights']} weights" if src.get("weights") else ""
    step = f" of step {src['step']}" if src.get("step") is not None else ""
    procs = f"{result['world_size']} process{'es' if result['world_size'] > 1 else ''}"
    return (f"{m['name']} ({m['num_classes']} classes{weights}{step}) from {result['export']}\n"
            f"on {result['data']}: {procs}, {result['device']}, {result['precision']}, batch {result['batch_size']} "
            f"per process, crop threshold {result['crop_threshold']}px ({result['crop_threshold_from']})")


def log_tensorboard(log_dir: str | Path, result: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - tensorboard: only with --tensorboard

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for r in result["results"]:
            for key in ("top1", "top5", "images_per_s", "precision_at_1"):
                if key in r:
                    writer.add_scalar(f"eval_sweep/{key}", float(r[key]), r["size"])
        writer.add_text("eval_sweep/table", "    " + format_table(result).replace("\n", "\n    "), 0)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------- command


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate",
                                 description="Top-1 / top-5 of an export at several test image sizes")
    ap.add_argument("export", metavar="EXPORT", help="export folder: ours (model.safetensors + model.json) or "
                    "timm's hub layout (config.json + model.safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="SHARDS", help="shard folder with info.json (python -m shards write)")
    src.add_argument("--hf-dataset", metavar="FOLDER", help="a datasets folder (Dataset.save_to_disk)")
    ap.add_argument("--split", help="the split to evaluate (default: val for shards, test for a datasets folder)")
    ap.add_argument("--image-column", default=DataConfig.hf_image_column, help="datasets folder: image column")
    ap.add_argument("--label-column", default=DataConfig.hf_label_column, help="datasets folder: label column")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="SIZE",
                    help=f"test image sizes (default: {' '.join(map(str, DEFAULT_SIZES))})")
    ap.add_argument("--crop-threshold", type=int, metavar="PX",
                    help="below this size a centre crop of size / (size + 32), at or above it the whole image "
                         "(0: always the whole image; default: the export's data.eval_crop_threshold, else "
                         f"{DataConfig.eval_crop_threshold} as in the reference)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batch and process (default: 64)")
    ap.add_argument("--workers", type=int, default=DataConfig.workers,
                    help=f"loader processes per process (default: {DataConfig.workers}; 0: in the main process)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                    help="autocast dtype of the forward pass (default: fp32)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="read a timm folder whose weights are only pytorch_model.bin (a pickle; read as tensors "
                         "only). Refused without it: unpickling can run code the file brings")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    ap.add_argument("--tensorboard", metavar="DIR", help="log eval_sweep/* scalars (step = image size) here")
    return ap.parse_args(argv)


def _device(name: str, env: distributed.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EvalError("--device cuda: no CUDA device here; use --device cpu")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise EvalError(f"--device {name!r}: use auto, cpu or cuda")
    return torch.device("cpu")


def run(args: argparse.Namespace) -> dict:
    """The sweep of ``args`` on this process (a collective under a launcher); the result dict on every rank."""
    sizes = sorted(set(args.sizes))
    if any(s < 1 for s in sizes):
        raise EvalError(f"--sizes: image sizes must be positive, got {args.sizes}")
    if args.batch_size < 1 or args.workers < 0:
        raise EvalError("--batch-size must be >= 1 and --workers >= 0")
    model, meta = load_model(args.export, allow_pickle=args.allow_pickle)
    model.eval()
    mean, std = normalisation(meta)
    threshold, threshold_from = crop_threshold(args.crop_threshold, meta)
    cfg = data_config(args, mean, std, threshold)
    data_classes = check_data(cfg)
    env = distributed.detect_env()
    if env.is_distributed:  # a single process starts no group (and leaves os.environ alone)
        env = distributed.init_distributed()
    group = distributed.control_group()  # every rank, right after the group starts
    device = _device(args.device, env)
    loaders = eval_loaders(cfg, sizes, batch_size=args.batch_size, num_classes=int(getattr(model, "num_classes", 0)),
                           rank=env.rank, world_size=env.world_size)
    model.to(device)
    main = env.rank == 0
    warn = class_mismatch(meta.get("classes"), data_classes)
    if warn and main:
        print(warn, flush=True)
    arch = meta.get("architecture") or {}
    result: dict[str, Any] = {
        "export": str(args.export),
        "model": {"name": arch.get("name", type(model).__name__),
                  "num_classes": int(arch.get("num_classes", getattr(model, "num_classes", 0)))},
        "source": meta.get("source") or {},
        "train_image_size": (meta.get("image_size") or {}).get("train"),
        "data": (f"{cfg.val} [{cfg.val_split}]" if cfg.val else f"{cfg.hf_dataset} [{cfg.hf_val_split}]"),
        "world_size": env.world_size, "device": device.type, "precision": args.precision,
        "batch_size": args.batch_size, "workers": args.workers, "crop_threshold": threshold,
        "crop_threshold_from": threshold_from,
        "mean": mean, "std": std,
    }

    def progress(row: dict) -> None:
        if main:
            print(f"  {row['size']}px: top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}  ({row['samples']} images, "
                  f"{row['seconds']:.1f} s)", flush=True)

    if main:
        print(header(result), flush=True)
    result["results"] = sweep(model, loaders, crop_threshold=threshold, device=device, precision=args.precision,
                              group=group, progress=progress)
    best = peak(result["results"])
    result["peak"] = {k: best[k] for k in ("size", "top1", "top5")}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (EvalError, ExportError, DataError, ConfigError, distributed.DistributedError) as e:
        # One line per job, not one per rank: every rank hits the same input error.
        if distributed.launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if distributed.get_rank() == 0:
        print("\n" + format_table(result), flush=True)
        bad = sum(r["bad_samples"] for r in result["results"])
        if bad:
            print(f"warning: {bad} unreadable images (not counted) over the sweep", file=sys.stderr)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, result)
        if args.tensorboard:
            log_tensorboard(args.tensorboard, result)
    return 0



if __name__ == "__main__":
    distributed.exit_process(main())
