"""Run every CPU benchmark in bench/ with modest settings, then print a combined summary (``make bench``).

Each script measures its own baseline in the same run and prints its ratios; this driver only chooses sizes
that fit the whole suite into ~15 minutes on 2 cores, runs the scripts one after the other (each in its own
process group, with its own timeout), echoes their output, and collects their ratio lines. A script that fails
or times out is reported and the others still run; the exit status is 1 if any failed.

    python bench/run_all.py                        # everything (make bench)
    python bench/run_all.py --only train_step scaling
    python bench/run_all.py --list

The GPU benchmark (bench/gpu.sh) is not part of it: it needs a CUDA machine (see BENCHMARKS.md). A script in
bench/ that this file has no settings for runs with its own defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

# name -> (arguments, timeout in seconds, what it compares, lines of its output that go into the summary).
# Sizes are chosen for ~15 minutes in all on 2 busy cores (~5 on quiet ones); the scripts' defaults (used for
# the figures in BENCHMARKS.md) are larger.
SUITE: dict[str, tuple[list[str], int, str, str]] = {
    "model_step": (["--sizes", "128", "--batch", "8", "--reps", "6", "--warmup", "1"], 240,
                   "EfficientNetV2-S train step, ours vs timm (model only)", r"ratio"),
    "train_step": (["--batch", "8", "--reps", "4", "--warmup", "1"], 300,
                   "pretraining step through our DeepSpeed engine + EMA vs timm in a plain loop", r"^ratio"),
    "finetune_step": (["--model", "efficientnetv2_s", "--image-size", "128", "--batch", "8", "--reps", "4"], 240,
                      "fine-tuning step (accelerate) vs a plain loop", r"ratio to plain"),
    "loader": (["--images", "96", "--repeats", "3", "--sizes", "128"], 240,
               "training transforms per core vs PIL + torchvision",
               r"^images/s per worker|^ size +baseline|^\s+\d+\s+\d+\s+\d+\s+[\d.]+x"),
    "loader_stream": (["--images", "192", "--repeats", "2"], 180,
                      "streaming loader vs a plain webdataset pipeline", r"images/s|resume fast-forward"),
    "shard_write": (["--images", "100", "--repeat", "1", "--workers", "1", "2"], 180,
                    "shard writing per worker vs bare decode", r"^baseline|^\| source|^\| \d+x\d+ \|"),
    "zero_memory": (["--image-size", "32"], 240, "model-state bytes per rank, ZeRO 0/1/2/3, vs the formulas",
                    r"^\| (ZeRO|\d) \|"),
    "checkpoint_overhead": (["--repeats", "3", "--saves", "4"], 150,
                            "checkpoint save and preemption check vs bare torch.save / all_reduce",
                            r"us/call|ms(  |$)"),
    "scaling": (["--steps-per-stage", "15", "--repeats", "1"], 240, "trainer images/s, 1 vs 2 ranks",
                r"^ +1 rank +2 ranks|steady +\d|^whole run"),
}
DEFAULT = ([], 300, "(no settings in run_all.py: its defaults)", r"ratio|speed-?up|overhead")
KILL_GRACE_S = 40  # torchrun's own grace for its ranks is 30 s
NOT_BENCHMARKS = {"run_all", "gpu_bench"}  # this driver; the GPU bench (bench/gpu.sh)


def scripts_in_bench() -> list[str]:
    found = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    known = [n for n in SUITE if n in found]
    return known + [n for n in found if n not in SUITE]


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # Spinning OpenMP threads make multi-threaded CPU figures meaningless on a shared machine (bench/scaling.py)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_script(name: str, args: list[str], timeout: float, pick: str, log) -> dict:
    cmd = [sys.executable, str(BENCH / f"{name}.py"), *args]
    shown = " ".join(["python", f"bench/{name}.py", *args])
    print(f"\n{'=' * 100}\n$ {shown}   (timeout {timeout:.0f}s)\n{'=' * 100}", flush=True)
    log.write(f"\n$ {shown}\n")
    t0 = time.perf_counter()
    # own process group: a timeout also ends what the script started (torchrun and its ranks, loader workers)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill():
        # SIGTERM first: torchrun puts its ranks into sessions of their own, out of reach of a group kill, and
        # stops them only when it can handle the signal; SIGKILL what is left of the group after a grace period
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        timer.cancel()
        if timed_out.is_set():
            timer.join()  # the script's own children get their grace period before the next script starts
    seconds = time.perf_counter() - t0
    if timed_out.is_set():
        status = f"TIMEOUT after {timeout:.0f}s"
    elif rc != 0:
        status = f"FAILED (exit {rc})"
    else:
        status = "ok"
    tail = [ln for ln in lines if ln.strip()][-6:] if status != "ok" else []
    pattern = re.compile(pick, re.IGNORECASE)
    picked: list[str] = []
    for ln in lines:
        if pattern.search(ln) and ln.rstrip() not in picked:  # repeated table headers once
            picked.append(ln.rstrip())
    return {"name": name, "command": shown, "status": status, "seconds": seconds, "picked": picked, "tail": tail}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help="run only these scripts (names without .py)")
    p.add_argument("--skip", nargs="+", default=[], help="leave these out")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every script's timeout")
    p.add_argument("--log", default=str(REPO / "bench/out/run_all.log"), help="full output of every script")
    p.add_argument("--list", action="store_true", help="list the scripts and their settings, run nothing")
    args = p.parse_args(argv)

    names = scripts_in_bench()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"--only {unknown}: no such script in bench/; available: {', '.join(names)}")
        names = [n for n in names if n in args.only]
    names = [n for n in names if n not in args.skip]
    if args.list:
        for n in names:
            a, t, what, _ = SUITE.get(n, DEFAULT)
            print(f"{n:<20} {t:>4}s  {what}\n{'':<27}python bench/{n}.py {' '.join(a)}")
        return 0

    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"{len(names)} benchmark(s) on {os.cpu_count()} CPU core(s), load average {load[0]:.1f}; full log: "
          f"{log_path}", flush=True)
    t0 = time.perf_counter()
    results = []
    with open(log_path, "w") as log:
        for n in names:
            a, t, _, pick = SUITE.get(n, DEFAULT)
            results.append(run_script(n, a, t * args.timeout_scale, pick, log))
            log.flush()

    total = time.perf_counter() - t0
    print(f"\n{'=' * 100}\nSUMMARY ({total / 60:.1f} min, load average now {os.getloadavg()[0]:.1f}; "
          "each script's key lines as it printed them)\n" + "=" * 100)
    for r in results:
        print(f"\n{r['name']:<20} {r['status']:<22} {r['seconds']:6.0f}s   {SUITE.get(r['name'], DEFAULT)[2]}")
        for line in r["picked"]:
            print(f"    {line}")
        for line in r["tail"]:
            print(f"  | {line}")
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"\n{len(results) - len(failed)} of {len(results)} ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
