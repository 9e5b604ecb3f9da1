"""The paper's ablation at demo scale: is it the rising regularization that makes progressive resizing work?

``python -m pipeline.demo --ablation [--seeds 3] [--steps N]`` (``make demo-ablation``) pretrains four arms with
the same step budget, each with seeds 0..N-1 (``train.seed``: initial weights, shard order, shuffling,
augmentation and mixing; the shards are the same), fine-tunes every pretrained model on the transfer set, and
prints the arms side by side (mean and sample standard deviation over the seeds):

(a) ``fixed``        fixed final image size, final regularization (progressive learning off)
(b) ``final-reg``    progressive image size, regularization fixed at the last stage's values
(c) ``first-reg``    progressive image size, regularization fixed at the first stage's values
(d) ``rising-reg``   progressive image size with rising regularization (the config as it is: the paper's recipe)

The arms are config overrides derived from the loaded pretraining config (``arm_overrides``), not new trainer
code. This module holds the arms, the bookkeeping (run folders, reuse of finished runs, statistics, table,
``results.json``); ``pipeline.demo`` supplies the commands (torchrun pretraining, export, accelerate fine-tuning).

Layout: ``OUT/ablation/<arm>-seed<s>/{pretrain,export,finetune}`` plus ``request.json`` (the settings the run was
started with) and ``result.json`` (wall time and accuracies); ``OUT/ablation/results.json`` for all of them.
A rerun reuses every finished step whose settings are the same, so an interrupted ablation continues; an
unfinished pretraining starts again from step 0 (its wall time is the measurement).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline.config import Config, ConfigError
from pipeline.progressive import StageSchedule

# (key, title) in the order of the (a)..(d)
ARMS = (
    ("a-fixed", "(a) fixed final size, final reg."),
    ("b-final-reg", "(b) progressive, reg. fixed at final"),
    ("c-first-reg", "(c) progressive, reg. fixed at first stage"),
    ("d-rising-reg", "(d) progressive, rising reg. (paper)"),
)
# The regularization a stage carries (pipeline.data.protocol.Stage attributes = ProgressiveConfig min_/max_ keys).
REGULARIZATION = ("randaug", "mixup", "cutmix", "dropout", "drop_path")
# result.json keys summarised over the seeds, with their table headings
METRICS = (
    ("wall_s", "wall s"),
    ("train_s", "train s"),
    ("ema_top1", "EMA top-1"),
    ("ema_top5", "EMA top-5"),
    ("transfer_top1", "transfer top-1"),
)


def _fmt_value(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def arm_overrides(cfg: Config) -> dict[str, list[str]]:
    """The pretraining overrides of each arm, derived from the loaded config (whose progressive learning is on).

    The first and last stages of the config's own stage table give the "first stage's" and "final" values (with
    the paper preset these are the min_ and max_ values; with the official one too, except dropout, which is
    not scheduled there and stays at its maximum). An arm sets only what differs from the config.
    """
    prog = cfg.progressive
    if not prog.enabled:
        raise ConfigError("the ablation compares progressive arms: the pretraining config needs "
                          "progressive.enabled: true")
    # the values of a stage do not depend on the step count; num_stages steps give one step per stage
    sched = StageSchedule.from_config(prog, prog.num_stages, default_dropout=cfg.model.drop_rate)
    first, last = sched.stages[0], sched.stages[-1]
    scheduled = [r for r in REGULARIZATION if getattr(prog, f"min_{r}") is not None]

    def fixed_at(stage) -> list[str]:
        out = []
        for r in scheduled:
            value = getattr(stage, r)
            for bound in ("min", "max"):
                if getattr(prog, f"{bound}_{r}") != value:
                    out.append(f"progressive.{bound}_{r}={_fmt_value(value)}")
        return out

    fixed = ["progressive.enabled=false"]
    # without progressive learning the trainer takes dropout from model.drop_rate when it is set
    if cfg.model.drop_rate is not None and cfg.model.drop_rate != last.dropout:
        fixed.append(f"model.drop_rate={_fmt_value(last.dropout)}")
    return {"a-fixed": fixed, "b-final-reg": fixed_at(last), "c-first-reg": fixed_at(first), "d-rising-reg": []}


# ------------------------------------------------------------------------------------------------ statistics


def mean_sd(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; nan for one value) and count of the values that are not None."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan), len(xs)


def format_mean_sd(values: Sequence[Optional[float]], digits: int = 1, unit: str = "") -> str:
    """'17.3 ± 0.4%' over the values; one value: '17.3%'; none: '-'."""
    mean, sd, n = mean_sd(values)
    if n == 0:
        return "-"
    if n == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------ the runs


@dataclass
class Commands:
    """What runs a step (pipeline.demo gives its real commands; tests give fakes)."""

    pretrain: Callable[[Path, list[str]], float]
    """(run dir, pretraining overrides) -> wall seconds."""
    export: Callable[[Path, Path], object]
    """(pretraining run dir, export dir): the EMA weights."""
    finetune: Callable[[Path, Path, list[str]], object]
    """(export dir, fine-tuning run dir, fine-tuning overrides)."""


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def pretrain_finished(run_dir: Path) -> bool:
    s = _read_json(run_dir / "summary.json")
    return bool(s) and not s.get("preempted") and s.get("step") == s.get("total_steps") and "eval" in s


def run_one(run_dir: Path, overrides: list[str], seed: int, commands: Commands, *,
            finetune: bool = True, ranks: int = 2) -> dict:
    """One arm x seed: pretrain, export, fine-tune, each skipped when a finished one with these settings exists."""
    pre_overrides = [*overrides, f"train.seed={seed}"]
    ft_overrides = [f"train.seed={seed}"]
    request = {"pretrain_overrides": pre_overrides, "finetune_overrides": ft_overrides, "ranks": ranks}
    if run_dir.exists() and _read_json(run_dir / "request.json") != request:
        print(f"\n==> {run_dir}: made with other settings; starting it again", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "request.json", request)
    record = _read_json(run_dir / "result.json") or {}
    pre, export, ft = run_dir / "pretrain", run_dir / "export", run_dir / "finetune"

    if pretrain_finished(pre) and record.get("wall_s") is not None:
        print(f"\n==> {pre}: finished; reusing it", flush=True)
    else:
        shutil.rmtree(pre, ignore_errors=True)  # an interrupted run restarts: its wall time is the measurement
        shutil.rmtree(export, ignore_errors=True)
        shutil.rmtree(ft, ignore_errors=True)
        record = {"wall_s": float(commands.pretrain(pre, pre_overrides))}
        _write_json(run_dir / "result.json", record)
    summary = _read_json(pre / "summary.json")
    ev = summary["eval"]
    record.update(seed=seed, steps=summary["total_steps"],
                  train_s=sum(s.get("seconds", 0.0) for s in summary["stages"]),
                  top1=ev["raw"]["top1"], ema_top1=ev.get("ema", {}).get("top1"),
                  ema_top5=ev.get("ema", {}).get("top5"),
                  stages=[{k: s.get(k) for k in ("image_size", *REGULARIZATION, "steps")} for s in summary["stages"]])

    if finetune:
        if not (export / "model.safetensors").is_file():
            shutil.rmtree(export, ignore_errors=True)
            shutil.rmtree(ft, ignore_errors=True)
            commands.export(pre, export)
        metrics = _read_json(ft / "metrics.json")
        if metrics is None:
            shutil.rmtree(ft, ignore_errors=True)
            commands.finetune(export, ft, ft_overrides)
            metrics = _read_json(ft / "metrics.json")
        else:
            print(f"\n==> {ft}: finished; reusing it", flush=True)
        r = metrics["results"]
        record.update(transfer_top1=r.get("ema", r["raw"])["top1"], transfer_raw_top1=r["raw"]["top1"],
                      transfer_samples=int(r["raw"]["samples"]))
    _write_json(run_dir / "result.json", record)
    return record


def run_ablation(out: Path, cfg: Config, seeds: int, commands: Commands, *, user_overrides: Sequence[str] = (),
                 finetune: bool = True, ranks: int = 2, command: str = "") -> dict:
    """Every arm x seed, then the table and results.json.

    Seed-major, so a stopped ablation has whole seeds; seed s starts with arm s mod 4 (a b c d, b c d a, ...), so
    that the first run's cold start (page cache, imports) and slow drifts of the machine's load do not always fall
    on the same arm. ``cfg`` is the pretraining config with ``user_overrides`` applied (they go to every arm,
    before its own).
    """
    arms = arm_overrides(cfg)
    runs: dict[str, list[dict]] = {key: [] for key, _ in ARMS}
    for seed in range(seeds):
        first = seed % len(ARMS)
        for key, _ in ARMS[first:] + ARMS[:first]:
            overrides = [*user_overrides, *arms[key]]
            runs[key].append(run_one(out / f"{key}-seed{seed}", overrides, seed, commands, finetune=finetune,
                                     ranks=ranks))
    results = {
        "command": command,
        "machine": machine(),
        "ranks": ranks,
        "seeds": list(range(seeds)),
        "steps": runs[ARMS[0][0]][0]["steps"] if seeds else None,
        "user_overrides": list(user_overrides),
        "arms": {key: {"title": title, "overrides": arms[key], "runs": runs[key],
                       "summary": {m: dict(zip(("mean", "sd", "n"), mean_sd([r.get(m) for r in runs[key]])))
                                   for m, _ in METRICS}}
                 for key, title in ARMS},
    }
    _write_json(out / "results.json", results)
    print_table(results)
    print(f"\nResults: {out / 'results.json'}")
    return results


def machine() -> dict:
    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:  # Linux: the CPU model
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "processor": cpu,
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": version("torch"),
            "deepspeed": version("deepspeed")}


def _stages_text(stages: list[dict]) -> str:
    def seq(key: str, fmt: str) -> str:
        vals = [s.get(key) for s in stages]
        if all(v is None for v in vals):
            return "-"
        return "/".join(format(v, fmt) for v in vals) if len(set(vals)) > 1 else format(vals[0], fmt)

    return (f"size {seq('image_size', 'd')}px, RandAug {seq('randaug', 'g')}, mixup {seq('mixup', 'g')}, "
            f"cutmix {seq('cutmix', 'g')}, dropout {seq('dropout', 'g')}")


def print_table(results: dict) -> None:
    """The arms side by side: mean ± sd over the seeds."""
    arms = results["arms"]
    n_seeds = len(results["seeds"])
    print("\n" + "=" * 100)
    print(f"Ablation: {results['steps']} pretraining steps per run, {results['ranks']} ranks, seeds "
          f"{', '.join(map(str, results['seeds']))} (mean ± sample sd over {n_seeds} seed{'s' * (n_seeds != 1)})")
    if results.get("machine"):
        m = results["machine"]
        print(f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, DeepSpeed {m['deepspeed']}"
              + (f"; {results['command']}" if results.get("command") else ""))
    print("=" * 100)
    for arm in arms.values():
        stages = arm["runs"][0]["stages"] if arm["runs"] else []
        print(f"  {arm['title']:<44} {_stages_text(stages)}")
        print(f"  {'':<44} overrides: {' '.join(arm['overrides']) or '(none: the config as it is)'}")
    head = f"\n  {'arm':<44}" + "".join(f" {h:>15}" for _, h in METRICS)
    print(head)
    for arm in arms.values():
        cells = []
        for m, _ in METRICS:
            vals = [r.get(m) for r in arm["runs"]]
            cells.append(format_mean_sd(vals, 0, "") if m.endswith("_s") else format_mean_sd(vals, 1, "%"))
        print(f"  {arm['title']:<44}" + "".join(f" {c:>15}" for c in cells))
    print("\n  wall s: the pretraining command (start-up, training, final eval); train s: the training steps alone."
          "\n  EMA top-1 / top-5: the pretrained EMA weights on the held-out set; transfer top-1: their fine-tuning's"
          " EMA on the transfer set.")
