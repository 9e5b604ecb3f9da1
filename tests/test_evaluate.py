"""python -m pipeline.evaluate: the resolution sweep of an export on validation shards or a datasets folder.

Every image counts once at every size (also under a 2-process launch), each size's accuracy is the trainer's
evaluation of the same weights at that size (build_eval_loader + topk_correct), the crop rule switches at the
threshold, and bad input ends with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_launch import child_env
from pipeline.config import DataConfig
from pipeline.data.loader import build_eval_loader
from pipeline.evaluate import format_table, main
from pipeline.export import model_from_export, save_export
from pipeline.metrics import topk_correct
from pipeline.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
MODEL = "efficientnetv2_test"
CLASSES = 7
VAL = CLASSES * 3  # an odd count: uneven parts and padding under 2 processes
SIZES = [32, 40, 48]
THRESHOLD = 40  # 32 is centre-cropped, 40 and 48 are whole images
BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from shards.cli import main as shards_main

    out = tmp_path_factory.mktemp("data") / "shards"
    rc = shards_main(["write", "demo", "pretrain", str(out), "--classes", str(CLASSES), "--per-class", "1",
                      "--val-per-class", str(VAL // CLASSES), "--image-size", "64", "--shard-size", "5",
                      "--workers", "1", "--no-progress"])
    assert rc == 0
    return out


def _export(path: Path, num_classes: int = CLASSES, **extra) -> Path:
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=num_classes)
    meta = {"architecture": {"name": MODEL, "num_classes": num_classes,
                             "options": {"bn_eps": 1e-3, "bn_momentum": 0.1, "padding": "symmetric"}},
            "classes": [{"index": i, "wnid": None, "name": f"class {i}"} for i in range(num_classes)],
            "image_size": {"train": 40, "eval": 40}, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
            "source": {"run_dir": "test", "tag": "step-00000007", "step": 7, "weights": "ema"}, **extra}
    return save_export(model.state_dict(), meta, path)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("export") / "export")


def _args(export: Path, data: list[str], out: Path, *extra: str) -> list[str]:
    return [str(export), *data, "--sizes", *map(str, SIZES), "--crop-threshold", str(THRESHOLD), "--workers", "0",
            "--batch-size", str(BATCH), "--json", str(out), *extra]


@torch.no_grad()
def _trainer_style(export: Path, cfg: DataConfig, size: int) -> tuple[float, float, int]:
    """Top-1, top-5 and images as the trainer's evaluation counts them, computed here from the same pieces."""
    model, meta = model_from_export(export)
    model.eval()
    cfg.mean, cfg.std = meta["mean"], meta["std"]
    loader = build_eval_loader(cfg, image_size=size, micro_batch_size=BATCH, num_classes=model.num_classes)
    c1 = c5 = n = 0
    for batch in loader:
        valid = batch["valid"]
        a, b = topk_correct(model(batch["image"])[valid], batch["label"][valid], (1, 5))
        c1, c5, n = c1 + a, c5 + b, n + int(valid.sum())
    return 100 * c1 / n, 100 * c5 / n, n


def _accuracies(result: dict) -> list[float]:
    return [float(r[k]) for r in result["results"] for k in ("size", "samples", "top1", "top5")]


def test_sweep_counts_every_image_and_equals_the_trainer_evaluation(tmp_path, shards, export, capsys):
    out = tmp_path / "sweep.json"
    assert main(_args(export, ["--data", str(shards)], out, "--tensorboard", str(tmp_path / "tb"))) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["size"] for r in result["results"]] == SIZES
    assert [r["samples"] for r in result["results"]] == [VAL] * len(SIZES)
    # the crop rule per size: a centre square of S / (S + 32) below the threshold, the whole image from it on
    assert [(r["crop"], r["crop_fraction"]) for r in result["results"]] == [("centre", 0.5), ("full", 1.0),
                                                                            ("full", 1.0)]
    cfg = DataConfig(val=str(shards), workers=0, eval_crop_threshold=THRESHOLD)
    for r in result["results"]:
        top1, top5, n = _trainer_style(export, cfg, r["size"])
        assert (r["top1"], r["top5"], r["samples"]) == pytest.approx((top1, top5, n)), r
        assert r["images_per_s"] > 0 and r["bad_samples"] == 0
    assert result["mean"] == [0.5, 0.4, 0.3] and result["crop_threshold"] == THRESHOLD
    assert result["train_image_size"] == 40 and result["world_size"] == 1
    best = max(result["results"], key=lambda r: (r["top1"], r["top5"], -r["size"]))
    assert result["peak"] == {k: best[k] for k in ("size", "top1", "top5")}
    # the table: one row per size, the peak marked once, on its row; the training size marked
    table = format_table(result)
    assert table in stdout
    rows = {int(line.split()[0]): line for line in table.splitlines()[1:]}
    assert list(rows) == SIZES and sum("<- peak" in line for line in rows.values()) == 1
    assert "<- peak" in rows[best["size"]] and "trained at this size" in rows[40]
    assert "centre 0.500" in rows[32] and "whole image" in rows[40]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_crop_threshold_defaults_to_the_exports(tmp_path, shards, capsys):
    """Without --crop-threshold: the one the export's run evaluated with, else the reference's 320."""
    for extra, threshold, crop in (({"eval_crop_threshold": 0}, 0, "full"), ({}, 320, "centre")):
        exp = _export(tmp_path / f"export{threshold}", **extra)
        out = tmp_path / f"{threshold}.json"
        assert main([str(exp), "--data", str(shards), "--sizes", "32", "--workers", "0", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["crop_threshold"] == threshold and result["results"][0]["crop"] == crop
        top1, top5, n = _trainer_style(exp, DataConfig(val=str(shards), workers=0, eval_crop_threshold=threshold),
                                       32)
        assert (result["results"][0]["top1"], result["results"][0]["top5"]) == pytest.approx((top1, top5))
    capsys.readouterr()


def _hf_dataset(path: Path, per_class: int = 3, classes: int = 4) -> Path:
    """A datasets DatasetDict on disk (train / test; Image + ClassLabel columns) of noisy colour images."""
    import datasets
    import numpy as np
    from PIL import Image

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    names = [f"colour{i}" for i in range(classes)]

    def split(n: int) -> datasets.Dataset:
        rows = {"image": [], "label": []}
        for label in range(classes):
            for _ in range(n):
                a = rng.integers(0, 256, 3) * 0.7 + rng.normal(0, 40, (56, 72, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                rows["image"].append({"bytes": buf.getvalue(), "path": None})
                rows["label"].append(label)
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict(rows, features=feats)

    datasets.DatasetDict({"train": split(1), "test": split(per_class)}).save_to_disk(str(path))
    return path


def test_datasets_folder(tmp_path, export, capsys):
    ds = _hf_dataset(tmp_path / "hf")
    out = tmp_path / "hf.json"
    assert main(_args(export, ["--hf-dataset", str(ds)], out)) == 0  # split: test by default
    result = json.loads(out.read_text())
    assert result["data"].endswith("[test]")
    assert [r["samples"] for r in result["results"]] == [12] * len(SIZES)
    cfg = DataConfig(hf_dataset=str(ds), workers=0, eval_crop_threshold=THRESHOLD)
    for r in result["results"]:
        top1, top5, _ = _trainer_style(export, cfg, r["size"])
        assert (r["top1"], r["top5"]) == pytest.approx((top1, top5))

    capsys.readouterr()
    assert main(_args(export, ["--hf-dataset", str(ds), "--split", "validation"], tmp_path / "x.json")) == 2
    _one_error(capsys, "no split 'validation'", "train, test", "--split")


def _one_error(capsys, *words: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_bad_input_one_clear_error(tmp_path, shards, export, capsys):
    out = tmp_path / "out.json"
    assert main(_args(tmp_path / "missing", ["--data", str(shards)], out)) == 2
    _one_error(capsys, "missing", "does not exist")
    assert main(_args(export, ["--data", str(shards), "--split", "test"], out)) == 2
    _one_error(capsys, "no split 'test'", "train, val", "--split")
    assert main(_args(export, ["--data", str(tmp_path / "nodata")], out)) == 2
    _one_error(capsys, "--data", "does not exist")
    small = _export(tmp_path / "small", num_classes=3)
    assert main(_args(small, ["--data", str(shards)], out)) == 2
    _one_error(capsys, "3 classes", f"has {CLASSES}")
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_count_every_image_once(tmp_path, shards, export, capsys):
    """accelerate launch with 2 processes (gloo on CPU): the same counts and accuracies as one process."""
    one = tmp_path / "one.json"
    assert main(_args(export, ["--data", str(shards)], one)) == 0
    capsys.readouterr()
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "pipeline.evaluate", *_args(export, ["--data", str(shards)], two)]
    res = subprocess.run(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(two.read_text())
    assert result["world_size"] == 2
    assert _accuracies(result) == pytest.approx(_accuracies(json.loads(one.read_text())))
    assert res.stdout.count("<- peak") == 1  # rank 0 prints, the other rank does not


def test_demo_summary_prints_the_sweep(tmp_path, capsys):
    """make demo's summary shows the sweep's table, read from the JSON the command writes."""
    from pipeline import demo

    (tmp_path / "shards" / "pretrain").mkdir(parents=True)
    (tmp_path / "shards" / "pretrain" / "info.json").write_text(json.dumps({"num_classes": 100}))
    run = tmp_path / "pretrain"
    run.mkdir()
    stage = {"index": 0, "start_step": 0, "end_step": 10, "image_size": 96, "randaug": 5.0, "mixup": 0.1,
             "dropout": 0.2, "images_per_s": 50.0, "seconds": 2.0}
    (run / "summary.json").write_text(json.dumps({
        "world_size": 2, "zero_stage": 2, "total_steps": 10, "stages": [stage],
        "eval": {"image_size": 96, "raw": {"samples": 1000, "top1": 30.0, "top5": 60.0}}}))
    rows = [{"size": s, "crop": "full", "crop_fraction": 1.0, "top1": t, "top5": 60.0, "samples": 1000,
             "images_per_s": 400.0} for s, t in zip(demo.SWEEP_SIZES, (20.0, 28.0, 31.0, 33.0, 32.0))]
    sweep = {"results": rows, "train_image_size": 96, "crop_threshold": 0}
    demo.print_summary({"progressive": (run, 12.0)}, None, tmp_path, tmp_path / "export", 30.0, sweep=sweep)
    out = capsys.readouterr().out
    assert "crop threshold 0px" in out
    peak_line = next(line for line in out.splitlines() if "<- peak" in line)
    assert peak_line.split()[0] == "112" and "trained at this size" in next(
        line for line in out.splitlines() if line.split()[:1] == ["96"] and "whole image" in line)
