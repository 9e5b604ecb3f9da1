"""Checkpoint and preemption overhead: what pipeline.checkpoint adds on top of the work it wraps, 2 ranks, gloo.

Two processes on this machine (torch.multiprocessing, gloo, CPU), interleaved repeats, medians:

    preemption check   PreemptionHandler.should_stop() per call (check_every=1)
      baseline         a bare torch.distributed.all_reduce of one int32 (the least any agreement costs)
      local            the same handler without a process group (a flag read)
    save               CheckpointManager.save(step, save_fn, rank_state) with keep_last pruning
      baseline         save_fn alone: every rank torch.save()s its share of a model-sized state into dir/tag,
                       as DeepSpeed's save_checkpoint does, then one barrier

    python bench/checkpoint_overhead.py                   # ~30 s on 2 cores (idle)
    python bench/checkpoint_overhead.py --state-mb 200 --saves 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.checkpoint import CheckpointManager  # noqa: E402
from pipeline.config import CheckpointConfig  # noqa: E402
from pipeline.preemption import PreemptionHandler  # noqa: E402


def _time_calls(fn, n: int) -> float:
    dist.barrier()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


class _Loader:
    """Stands in for the loader's registered checkpoint part."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state.update(state)


def _worker(rank: int, world: int, port: int, args, root: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict[str, list[float]] = {"allreduce": [], "should_stop": [], "local": [], "save_fn": [], "save": []}
    flag = torch.zeros(1, dtype=torch.int32)
    handler = PreemptionHandler(["SIGUSR1"], rank=rank)
    # A model-sized state split over the ranks like ZeRO shards: state_mb in total.
    shard = torch.randn(args.state_mb * 2**20 // 4 // world)
    cfg = CheckpointConfig(keep_last=2)
    run_dir = Path(root) / "run"
    base_dir = Path(root) / "baseline"

    def save_fn(directory: Path, tag: str) -> None:
        (directory / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"shard": shard}, directory / tag / f"zero_rank_{rank}.pt")

    mgr = CheckpointManager(cfg, run_dir, rank=rank, world_size=world)
    position = {"position": 0}
    mgr.register("loader", _Loader(position))
    save_fn(base_dir, "warmup")  # first writes into a fresh folder are slower: not part of either figure
    for _ in range(args.repeats):
        out["allreduce"].append(_time_calls(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX), args.calls))
        out["should_stop"].append(_time_calls(handler.should_stop, args.calls))
        local = _time_calls(lambda: handler.received is not None, args.calls)
        out["local"].append(local)
    def baseline(i: int) -> None:
        dist.barrier()
        t = time.perf_counter()
        save_fn(base_dir, f"step-{i}")
        dist.barrier()
        out["save_fn"].append(time.perf_counter() - t)
        if rank == 0:  # keep the disk usage like keep_last pruning does
            shutil.rmtree(base_dir / f"step-{i - 2}", ignore_errors=True)

    def ours(i: int) -> None:
        dist.barrier()
        t = time.perf_counter()
        position["position"] = i
        mgr.save(i + 1, save_fn)
        out["save"].append(time.perf_counter() - t)

    for i in range(args.saves):  # alternate which one goes first
        for fn in ((baseline, ours) if i % 2 == 0 else (ours, baseline)):
            fn(i)
    handler.close()
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=500, help="should_stop calls per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--state-mb", type=int, default=100, help="model + optimizer state over all ranks, MB")
    p.add_argument("--saves", type=int, default=6)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tempfile.mkdtemp(prefix="ckpt-bench-")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.spawn(_worker, args=(2, port, args, root, queue), nprocs=2, join=True)
        r = queue.get()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in r.items()}
    print(f"2 ranks, gloo, CPU; {args.repeats} x {args.calls} checks, {args.saves} saves of {args.state_mb} MB")
    print(f"preemption check  all_reduce (baseline) {med['allreduce'] * 1e6:8.1f} us/call")
    print(f"                  should_stop()         {med['should_stop'] * 1e6:8.1f} us/call  "
          f"ratio {med['should_stop'] / med['allreduce']:.2f}")
    print(f"                  local flag            {med['local'] * 1e6:8.2f} us/call")
    print(f"save              save_fn + barrier     {med['save_fn'] * 1e3:8.1f} ms")
    print(f"                  CheckpointManager     {med['save'] * 1e3:8.1f} ms  "
          f"ratio {med['save'] / med['save_fn']:.2f}  (+{(med['save'] - med['save_fn']) * 1e3:.1f} ms: "
          "RNG + rank file, marker, fsync, 3 barriers, pruning)")


if __name__ == "__main__":
    from pipeline.distributed import exit_process

    main()
    exit_process(0)
