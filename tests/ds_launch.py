"""Runs tests/ds_worker.py under torchrun once per world size per test session; test modules share the results.

test_engine.py and test_ema.py both assert on the same two launches (2 ranks, then 1 rank loading the
2-rank checkpoints), so the launches are cached here, in a module every test module imports once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.distributed import free_port

WORKER = Path(__file__).resolve().parent / "ds_worker.py"
_cache: dict[int, Path] = {}


def launch(world: int, root: Path, env: dict, universal_from: Path | None = None, timeout: int = 600) -> Path:
    """Run the worker on ``world`` ranks (once per session); returns its output folder."""
    if world in _cache:
        return _cache[world]
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
    _cache[world] = out
    return out


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(WORKER.parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    return env


def both_worlds(root: Path) -> dict[int, Path]:
    """The 2-rank launch, then the 1-rank launch that loads its checkpoints: {world size: output folder}."""
    two = launch(2, root, worker_env())
    one = launch(1, root, worker_env(), universal_from=two)
    return {1: one, 2: two}


def results(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"results_rank{rank}.json").read_text())
