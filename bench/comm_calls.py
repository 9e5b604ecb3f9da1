"""Collective calls per optimizer step of the real trainer, for ZeRO 0 / 1 / 2 / 3: the latency term of the
communication model in bench/results/comm.md (each call costs at least one network latency, more for a ring).

Runs ``torchrun --nproc_per_node 2 -m pipeline.pretrain`` (gloo, CPU DeepSpeed) with the same model and settings
as bench/comm.py (efficientnetv2_s, 10 classes, 64 px, micro-batch 4 per rank, no EMA, no evaluation), twice per
stage: ``--short`` and ``--long`` steps. A ``sitecustomize`` module on the ranks' path wraps every collective of
``torch.distributed`` (DeepSpeed's comm layer calls them by attribute) and writes each rank's counts at exit; calls
per step = (long - short) / (long - short steps), so start-up, the weights' first broadcast and the final save
cancel out.

    python bench/comm_calls.py            # ~4 minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from comm import check_finite, overrides  # noqa: E402 - the same run settings as the volume benchmark

COUNTING = '''
import atexit, collections, json, os
import torch.distributed as _dist

_counts = collections.Counter()
_NAMES = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
          "reduce_scatter_tensor", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "gather",
          "scatter", "all_gather_object", "broadcast_object_list", "_all_gather_base", "_reduce_scatter_base")


def _wrap(name, fn):
    def counted(*args, **kwargs):
        _counts[name] += 1
        return fn(*args, **kwargs)
    return counted


for _name in _NAMES:
    _fn = getattr(_dist, _name, None)
    if _fn is not None:
        setattr(_dist, _name, _wrap(_name, _fn))


def _write():
    out, rank = os.environ.get("COMM_CALLS_OUT"), os.environ.get("RANK")
    if out and rank is not None:  # a rank (torchrun's agent has no RANK)
        with open(f"{out}.rank{rank}.json", "w") as f:
            json.dump(dict(_counts), f)


atexit.register(_write)
_os_exit = os._exit


def _exit(code):  # the trainer ends through os._exit (pipeline.distributed.exit_process): atexit does not run
    _write()
    _os_exit(code)


os._exit = _exit
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, shards: Path, zero: int, steps: int) -> dict[str, int]:
    out = root / f"calls-z{zero}-{steps}"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONWARNINGS="ignore", COMM_CALLS_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(root / "site"), str(REPO)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipeline.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml",
           *overrides(shards, root / f"run-z{zero}-{steps}", zero, steps)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"ZeRO-{zero}, {steps} steps: exit {proc.returncode}\n{tail}")
    check_finite(root / f"run-z{zero}-{steps}")
    return json.loads(Path(f"{out}.rank0.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", type=int, default=3)
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "comm_calls.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from pretrain_launch import write_demo_shards

    root = Path(tempfile.mkdtemp(prefix="bench-comm-calls-"))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(COUNTING)
    shards = write_demo_shards(root / "shards", per_class=12, val_per_class=1, shard_size=6)
    results = {}
    for zero in (0, 1, 2, 3):
        a, b = run(root, shards, zero, args.short), run(root, shards, zero, args.long)
        per_step = {k: (b.get(k, 0) - a.get(k, 0)) / (args.long - args.short) for k in sorted(set(a) | set(b))}
        per_step = {k: v for k, v in per_step.items() if v}
        results[f"zero{zero}"] = {"per_step": per_step, "total_per_step": sum(per_step.values())}
        print(f"ZeRO-{zero}: {sum(per_step.values()):.1f} collective calls per step on rank 0: "
              + ", ".join(f"{k} {v:g}" for k, v in per_step.items()), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
