"""Data-parallel scaling on CPU: images/s of the real trainer with 1 rank against 2 ranks, same global batch.

Runs ``torchrun --nproc_per_node N -m pipeline.pretrain`` (DeepSpeed ZeRO-2, gloo, ``DS_ACCELERATOR=cpu``) on
the tiny CPU config (efficientnetv2_test, 3 progressive stages at 32 / 48 / 64 px) over generated demo shards
(``python -m shards write demo pretrain ...``), with the same cores for both: ``--threads`` intra-op threads
for the 1-rank run, ``--threads / 2`` per rank for the 2-rank run (OMP_NUM_THREADS, with OMP_WAIT_POLICY=PASSIVE:
see --omp-wait-policy). The global batch is the same; each rank takes ``global / N`` images per micro-batch (no
accumulation), so both runs see the same samples per step. Runs alternate 1 / 2 / 1 / 2 ... (``--repeats``
each) so machine noise hits both alike.

What is read back from each run folder:

    steady     images/s at the last step of each stage from train_log.jsonl (the trainer's sliding window
               over the stage's last <= 20 steps: start-up, loader rebuilds and checkpoints excluded)
    whole run  total images / total stage seconds from summary.json (stage switches, the loader's start,
               the checkpoints at stage boundaries and the final evaluation included)

The data loader runs inside each rank (data.workers=0, as in the tiny config), so decoding is part of the
step and is split across ranks like the model's work.

    python bench/scaling.py                          # ~3-5 minutes on 2 idle cores
    python bench/scaling.py --steps-per-stage 10 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env(threads: int, wait_policy: str = "PASSIVE") -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = str(threads)  # torch takes its intra-op thread count from it
    if wait_policy != "default":
        # OpenMP threads that spin while they wait take the core from the other rank (or another job) and
        # then wait for a thread that is not scheduled: on a shared 2-core machine a 2-thread step took
        # 15x longer with the default policy than with PASSIVE
        env["OMP_WAIT_POLICY"] = wait_policy
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(out: Path, classes: int, per_class: int, image_size: int) -> Path:
    dest = out / "shards"
    if (dest / "info.json").is_file():
        return dest
    cmd = [sys.executable, "-m", "shards", "write", "demo", "pretrain", str(dest), "--classes", str(classes),
           "--per-class", str(per_class), "--val-per-class", "2", "--image-size", str(image_size),
           "--no-progress"]
    subprocess.run(cmd, cwd=REPO, env=_env(1), check=True, stdout=subprocess.DEVNULL)
    return dest


def run_once(args, shards: Path, ranks: int, run_dir: Path, log: Path) -> dict:
    """One training run; returns its per-stage steady images/s, whole-run images/s and wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    sps = args.steps_per_stage
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(_free_port()), "-m", "pipeline.pretrain", "--config", str(args.config),
           f"data.train=[{shards}]", f"train.run_dir={run_dir}", f"model.name={args.model}",
           f"train.total_steps={3 * sps}", "progressive.num_stages=3",
           f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.global_batch // ranks}",
           # one log line at the end of each stage: the trainer's own window then covers the stage's last steps
           f"train.log_every={sps}", "train.image_grid=false", "checkpoint.every_steps=0", "checkpoint.resume=none",
           "eval.every_steps=0", "eval.max_batches=1", "data.workers=0", *args.overrides]
    threads = max(1, args.threads // ranks)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ OMP_NUM_THREADS={threads} OMP_WAIT_POLICY={args.omp_wait_policy} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads, args.omp_wait_policy), stdout=f,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM lets torchrun stop its ranks (they run in sessions of their own); SIGKILL would orphan them
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise RuntimeError(f"{ranks}-rank run did not finish within --timeout {args.timeout}s; see {log}") from None
        except BaseException:  # Ctrl-C or a signal: stop the run before leaving
            proc.terminate()
            proc.wait(40)
            raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"{ranks}-rank run failed (exit {proc.returncode}); end of {log}:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text())
    steady = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        steady[rec["image_size"]] = rec["images_per_s"]  # the last line of a stage wins
    images = sum(s.get("images", 0) for s in summary["stages"])
    seconds = sum(s.get("seconds", 0.0) for s in summary["stages"])
    return {"ranks": ranks, "threads_per_rank": threads, "steady": steady, "whole_run": images / seconds,
            "wall_s": wall, "load_before": load0, "load_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/pretrain/tiny_cpu.yaml"))
    p.add_argument("--model", default="efficientnetv2_test")
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--steps-per-stage", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="runs per rank count (alternating)")
    p.add_argument("--threads", type=int, default=2, help="cores shared by the ranks (default 2)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY of the runs ('default': leave it unset)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--image-size", type=int, default=96, help="longer side of the generated images")
    p.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = p.parse_args(argv)
    if args.global_batch % 2:
        p.error("--global-batch must be even (it is split over 2 ranks)")

    # a SIGTERM (bench/run_all.py's timeout) unwinds like Ctrl-C: the running torchrun is stopped, the folder removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    try:
        t0 = time.perf_counter()
        shards = write_shards(out, args.classes, args.per_class, args.image_size)
        print(f"shards: {args.classes} classes x {args.per_class} images ({time.perf_counter() - t0:.0f}s); "
              f"{args.model}, global batch {args.global_batch}, {args.steps_per_stage} steps per stage x 3 stages, "
              f"{args.threads} cores; log: {log}", flush=True)
        results: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(args.repeats):
            for ranks in ((1, 2) if r % 2 == 0 else (2, 1)):
                res = run_once(args, shards, ranks, out / f"run_{ranks}rank_{r}", log)
                results[ranks].append(res)
                print(f"  {ranks} rank(s) x {res['threads_per_rank']} thread(s): steady " +
                      ", ".join(f"{k}px {v:.1f}" for k, v in res["steady"].items()) +
                      f" images/s; whole run {res['whole_run']:.1f} images/s; {res['wall_s']:.0f}s wall; "
                      f"load {res['load_before']:.1f} -> {res['load_after']:.1f}", flush=True)
        sizes = list(results[1][0]["steady"])
        print(f"\nmedians over {args.repeats} run(s) each (images/s; ratio = 2 ranks / 1 rank, ideal on the "
              "same cores: 1.0 or above when one process cannot keep both cores busy)")
        print(f"{'':<12} {'1 rank':>9} {'2 ranks':>9} {'ratio':>7}")
        table = {}
        for key in [*sizes, "whole run"]:
            vals = {}
            for n in (1, 2):
                xs = [res["whole_run"] if key == "whole run" else res["steady"].get(key, float("nan"))
                      for res in results[n]]
                vals[n] = statistics.median(xs)
            label = key if key == "whole run" else f"{key}px steady"
            table[label] = {"1": vals[1], "2": vals[2], "ratio": vals[2] / vals[1]}
            print(f"{label:<12} {vals[1]:9.1f} {vals[2]:9.1f} {vals[2] / vals[1]:7.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "table": table}, indent=2))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
