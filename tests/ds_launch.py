"""Runs tests/ds_worker.py under torchrun; child-process environments and ports for every test launch.

test_engine.py and test_ema.py both assert on the same two launches (2 ranks, then 1 rank loading the
2-rank checkpoints): conftest's session-scoped ``ds_runs`` fixture runs them once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.distributed import free_port

WORKER = Path(__file__).resolve().parent / "ds_worker.py"


def launch(world: int, root: Path, env: dict, universal_from: Path | None = None, timeout: int = 600) -> Path:
    """Run the worker on ``world`` ranks; returns its output folder."""
    out = root / f"world{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out)]
    if universal_from is not None:
        cmd += ["--universal-from", str(universal_from)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                 if "[WARNING]" not in ln and "[INFO]" not in ln]
        raise AssertionError(f"ds_worker.py on {world} rank(s) failed (exit {proc.returncode}):\n"
                             + "\n".join(lines[-60:]))
    return out


def child_env(**overrides: str) -> dict:
    """Environment for child processes (torchrun, accelerate, python -m ...): the source tree importable,
    CPU DeepSpeed, one OpenMP thread unless the caller's environment says otherwise; then ``overrides``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(WORKER.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(overrides)
    return env


def worker_env() -> dict:
    return child_env(OMP_NUM_THREADS="1")


def both_worlds(root: Path) -> dict[int, Path]:
    """The 2-rank launch, then the 1-rank launch that loads its checkpoints: {world size: output folder}."""
    two = launch(2, root, worker_env())
    one = launch(1, root, worker_env(), universal_from=two)
    return {1: one, 2: two}


def results(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"results_rank{rank}.json").read_text())
