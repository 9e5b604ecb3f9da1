"""Launching real pretraining runs from the tests: torchrun over tests/pretrain_worker.py, kill -9 of a whole
launch, waits that end on a condition or a timeout, and what the runs wrote (per-step losses, final weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ds_launch import child_env
from pipeline.checkpoint import latest, step_tag
from pipeline.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs/pretrain/tiny_cpu.yaml")
WORKER = str(REPO / "tests/pretrain_worker.py")


def write_demo_shards(out: Path, *, classes: int = 10, per_class: int = 24, val_per_class: int = 4,
                      image_size: int = 64, shard_size: int = 12) -> Path:
    """Generated pretraining shards (``python -m shards write demo pretrain``), small enough for CPU runs."""
    subprocess.run([sys.executable, "-m", "shards", "write", "demo", "pretrain", str(out), "--classes", str(classes),
                    "--per-class", str(per_class), "--val-per-class", str(val_per_class), "--image-size",
                    str(image_size), "--shard-size", str(shard_size), "--no-progress", "--workers", "1"],
                   check=True, cwd=REPO, capture_output=True, env=env())
    return out


def env() -> dict:
    return child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def launch_cmd(nproc: int, spec: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), WORKER, str(spec)]


def _spec(tmp: Path, runs: list[dict], config: str) -> Path:
    spec = tmp / f"spec-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps({"config": config, "runs": runs}))
    return spec


def run(tmp: Path, nproc: int, runs: list[dict], timeout: int = 600,
        config: str = CONFIG) -> subprocess.CompletedProcess:
    """Runs ``runs`` ({"overrides": [...], "probe": FILE?}) one after another in one launch; asserts exit 0."""
    proc = subprocess.run(launch_cmd(nproc, _spec(tmp, runs, config)), env=env(), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:  # the whole output beside the run (the first error is often far from the end)
        (tmp / "launch.log").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    assert proc.returncode == 0, f"(whole output: {tmp / 'launch.log'})\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def start(tmp: Path, nproc: int, overrides: list[str], config: str = CONFIG) -> subprocess.Popen:
    """One run in the background (its own session), output on ``proc.stdout``."""
    return subprocess.Popen(launch_cmd(nproc, _spec(tmp, [{"overrides": overrides}], config)), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str,
             poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill9(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank (and their loader workers), as a node failure would, and wait until
    they are all gone.

    torchrun starts each rank in its own session, so killing the launcher's process group alone would leave
    the ranks running (and writing checkpoints) as orphans.
    """
    tree, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children(pid))
    for pid in reversed(tree):  # ranks and loader workers first, the launcher last
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, f"processes still alive 60 s after SIGKILL: {tree}"
        time.sleep(0.1)


def preempt(proc: subprocess.Popen, ranks: int = 2, timeout: float = 300) -> str:
    """SIGUSR1 to every rank of a launch (torchrun's / accelerate's direct children), as SLURM sends it before
    the time limit; waits for the launch to end and returns its output. On any failure the whole launch is
    killed, so no rank is left to load the rest of the suite."""
    try:
        pids = children(proc.pid)
        assert len(pids) == ranks, f"expected {ranks} ranks under the launcher, found {pids}"
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill9(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def logged_steps(run_dir: Path) -> int:
    """The highest step in train_log.jsonl so far (0 before the first line)."""
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for rec in train_log(run_dir):
        out[rec["step"]] = rec["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def final_state(run_dir: Path, step: Optional[int] = None) -> dict:
    """The fp32 weights of checkpoint ``step`` (default: the newest complete one)."""
    from pipeline.engine import consolidate_fp32_state_dict

    step = latest(run_dir) if step is None else step
    return consolidate_fp32_state_dict(run_dir / "checkpoints", step_tag(step))
