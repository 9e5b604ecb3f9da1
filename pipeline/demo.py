"""The end-to-end demo on generated data: shards -> 2-rank DeepSpeed pretraining with progressive learning ->
export -> 2-process accelerate fine-tuning on a transfer set -> a summary. ``make demo`` runs it.

    python -m pipeline.demo [--out runs/demo] [--compare] [key=value ...]
    python -m pipeline.demo --ablation [--seeds 3] [--steps N] [key=value ...]

Every step is the user's real command (``python -m shards write``, ``torchrun -m pipeline.pretrain``,
``python -m pipeline.export``, ``accelerate launch -m pipeline.finetune``) run as a subprocess, so the demo
exercises exactly what a cluster run does, on CPU (DeepSpeed with DS_ACCELERATOR=cpu and gloo). With
``--compare`` it also pretrains the same number of steps at the fixed final image size (progressive learning
off) and prints both side by side. With ``--ablation`` it runs the paper's ablation instead (fixed size; progressive
size with regularization fixed at the final / first values; the paper's rising regularization), each arm with
several seeds, pretrained and fine-tuned: see ``pipeline.demo_ablation``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline import demo_ablation
from pipeline.config import load_config
from pipeline.distributed import free_port
from pipeline.evaluate import format_table

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_CONFIG = REPO / "configs/demo/pretrain.yaml"
FINETUNE_CONFIG = REPO / "configs/finetune/demo.yaml"
SWEEP_SIZES = (64, 80, 96, 112, 128)
"""Test sizes of the held-out sweep (python -m pipeline.evaluate) of the demo's model (trained up to 96 px)."""
# python -m shards write demo {pretrain,transfer} arguments
PRETRAIN_SET = ["--classes", "100", "--per-class", "60", "--val-per-class", "10"]
TRANSFER_SET = ["--classes", "12", "--per-class", "50", "--val-per-class", "20"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], what: str, log: Path) -> float:
    print(f"\n==> {what}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}); the last lines of {log}:\n{tail}")
    print(f"    done in {seconds:.0f}s", flush=True)
    return seconds


def write_shards(out: Path, log: Path, pretrain_args: list[str], transfer_args: list[str]) -> None:
    py = sys.executable
    for kind, args in (("pretrain", pretrain_args), ("transfer", transfer_args)):
        dest = out / "shards" / kind
        if (dest / "info.json").is_file():
            print(f"\n==> {kind} shards exist in {dest}; reusing them")
            continue
        _run([py, "-m", "shards", "write", "demo", kind, str(dest), "--no-progress", *args],
             f"generate the {kind} set and write it as shards", log)


def pretrain(out: Path, name: str, log: Path, overrides: list[str], ranks: int) -> tuple[Path, float]:
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "-m", "pipeline.pretrain", "--config", str(PRETRAIN_CONFIG),
           f"data.train=[{out / 'shards' / 'pretrain'}]", f"train.run_dir={run_dir}", *overrides]
    seconds = _run(cmd, f"pretrain ({name}): DeepSpeed ZeRO-2, {ranks} ranks on CPU", log)
    return run_dir, seconds


def finetune(out: Path, ft_dir: Path, export: Path, log: Path, ranks: int, overrides: tuple | list = ()) -> float:
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--multi_gpu", "--num_processes", str(ranks)] if ranks > 1 else ["--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())]
    return _run(launch + ["-m", "pipeline.finetune", "--config", str(FINETUNE_CONFIG), f"init={export}",
                          f"data.train=[{out / 'shards' / 'transfer'}]", f"train.run_dir={ft_dir}", *overrides],
                f"fine-tune on the transfer set with accelerate ({ranks} processes)", log)


def ablation(out: Path, args: argparse.Namespace) -> int:
    """The four arms x seeds (pipeline.demo_ablation), on the demo's shards, under OUT/ablation."""
    abl = out / "ablation"
    abl.mkdir(parents=True, exist_ok=True)
    log = abl / "ablation.log"
    write_shards(out, log, PRETRAIN_SET, TRANSFER_SET)
    user = [*args.overrides, *([f"train.total_steps={args.steps}"] if args.steps else [])]
    cfg = load_config(PRETRAIN_CONFIG, user)

    def run_pretrain(run_dir: Path, overrides: list[str]) -> float:
        return pretrain(out, str(run_dir.relative_to(out)), log, overrides, args.ranks)[1]

    commands = demo_ablation.Commands(
        pretrain=run_pretrain,
        export=lambda run_dir, dest: _run([sys.executable, "-m", "pipeline.export", str(run_dir), "--ema", "--out",
                                           str(dest)], "export the EMA weights", log),
        finetune=lambda export, ft_dir, overrides: finetune(out, ft_dir, export, log, args.ranks, overrides))
    demo_ablation.run_ablation(abl, cfg, args.seeds, commands, user_overrides=user, finetune=not args.skip_finetune,
                               ranks=args.ranks, command=" ".join(["python -m pipeline.demo", *sys.argv[1:]]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="where data, runs and logs go")
    ap.add_argument("--compare", action="store_true",
                    help="also pretrain at the fixed final image size with the same steps, and compare")
    ap.add_argument("--ablation", action="store_true",
                    help="run the paper's ablation (4 arms x --seeds: pretrain, fine-tune) instead of the demo")
    ap.add_argument("--seeds", type=int, default=3, help="--ablation: seeds 0..N-1 per arm")
    ap.add_argument("--steps", type=int, default=None,
                    help="--ablation: pretraining steps per run (train.total_steps; default: the config's)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("overrides", nargs="*", help="pretraining overrides, e.g. train.total_steps=200")
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ablation:
        return ablation(out, args)
    log = out / "demo.log"
    t_start = time.perf_counter()
    for name in ("pretrain", "pretrain_fixed", "finetune"):
        # runs start afresh (auto-resume would find the finished runs and do nothing); the data is reused
        shutil.rmtree(out / name, ignore_errors=True)

    write_shards(out, log, PRETRAIN_SET, TRANSFER_SET)

    runs = {}
    run_dir, secs = pretrain(out, "pretrain", log, list(args.overrides), args.ranks)
    runs["progressive"] = (run_dir, secs)
    if args.compare:
        run_dir_f, secs_f = pretrain(out, "pretrain_fixed", log, ["progressive.enabled=false", *args.overrides],
                                     args.ranks)
        runs["fixed final size"] = (run_dir_f, secs_f)

    export = out / "pretrain" / "export"
    _run([sys.executable, "-m", "pipeline.export", str(out / "pretrain"), "--ema", "--out", str(export)],
         "export the EMA weights", log)
    sweep_json = out / "pretrain" / "eval_sweep.json"
    _run([sys.executable, "-m", "pipeline.evaluate", str(export), "--data", str(out / "shards" / "pretrain"),
          "--split", "val", "--sizes", *map(str, SWEEP_SIZES), "--workers", "2", "--json", str(sweep_json),
          "--tensorboard", str(out / "pretrain" / "tb_eval_sweep")],
         "evaluate the export at several test image sizes on the held-out set", log)

    ft = None
    if not args.skip_finetune:
        ft_dir = out / "finetune"
        finetune(out, ft_dir, export, log, args.ranks)
        ft = json.loads((ft_dir / "metrics.json").read_text())

    print_summary(runs, ft, out, export, time.perf_counter() - t_start, sweep=json.loads(sweep_json.read_text()))
    return 0


def _classes(shard_dir: Path) -> int:
    return json.loads((shard_dir / "info.json").read_text())["num_classes"]


def print_summary(runs: dict, ft: Optional[dict], out: Path, export: Path, total_s: float,
                  sweep: Optional[dict] = None) -> None:
    main_run = runs["progressive"][0]
    summary = json.loads((main_run / "summary.json").read_text())
    n_pre = _classes(out / "shards" / "pretrain")
    print("\n" + "=" * 100)
    print("EfficientNetV2 demo: summary")
    print("=" * 100)
    print(f"\nPretraining ({summary['world_size']} ranks, DeepSpeed ZeRO-{summary['zero_stage']}, "
          f"{summary['total_steps']} steps, {n_pre} classes; chance = {100 / n_pre:.1f}%):")
    print(f"  {'stage':>5} {'steps':>11} {'size':>6} {'RandAug':>8} {'mixup':>6} {'dropout':>8} {'images/s':>9}"
          f" {'seconds':>8}")
    for s in summary["stages"]:
        print(f"  {s['index'] + 1:>5} {s['start_step']:>5}-{s['end_step'] - 1:<5} {s['image_size']:>4}px "
              f"{s['randaug']:>8.1f} {s['mixup']:>6.2f} {s['dropout']:>8.2f} {s.get('images_per_s', 0):>9.1f}"
              f" {s.get('seconds', 0):>8.1f}")
    ev = summary["eval"]
    print(f"  eval @{ev['image_size']}px on {ev['raw']['samples']} held-out images: raw top-1 "
          f"{ev['raw']['top1']:.1f}% / top-5 {ev['raw']['top5']:.1f}%" +
          (f", EMA top-1 {ev['ema']['top1']:.1f}% / top-5 {ev['ema']['top5']:.1f}%" if "ema" in ev else ""))
    if sweep is not None:
        print(f"\nThe EMA export at several test sizes on the held-out images (python -m pipeline.evaluate; crop "
              f"threshold {sweep['crop_threshold']}px):")
        print("\n".join("  " + line for line in format_table(sweep).splitlines()))
    if len(runs) > 1:
        print("\nProgressive learning vs a fixed final image size (same steps, same data):")
        print(f"  {'run':<18} {'wall s':>8} {'train s':>8} {'top-1':>7} {'EMA top-1':>10}")
        for name, (rd, secs) in runs.items():
            s = json.loads((rd / "summary.json").read_text())
            train_s = sum(st.get("seconds", 0) for st in s["stages"])
            e = s["eval"]
            print(f"  {name:<18} {secs:>8.0f} {train_s:>8.0f} {e['raw']['top1']:>6.1f}% "
                  f"{e.get('ema', {}).get('top1', float('nan')):>9.1f}%")
    if ft is not None:
        n_ft = _classes(out / "shards" / "transfer")
        r = ft["results"]
        print(f"\nFine-tuning on the transfer set ({n_ft} classes, chance = {100 / n_ft:.1f}%), {ft['step']} steps "
              f"@{ft['image_size']}px, {int(r['raw']['samples'])} test images: raw top-1 {r['raw']['top1']:.1f}% / "
              f"top-5 {r['raw']['top5']:.1f}%" + (f", EMA top-1 {r['ema']['top1']:.1f}% / top-5 {r['ema']['top5']:.1f}%"
                                                 if "ema" in r else ""))
    print(f"\nTensorBoard:    tensorboard --logdir {out}")
    print(f"Exported model: {export}/model.safetensors (+ model.json)")
    print(f"Log of every command: {out / 'demo.log'}")
    print(f"Total demo time: {total_s:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
