"""Communication of the real trainer across nodes: bytes per optimizer step for ZeRO 1 / 2 / 3, and step time under
link limits, on a 2-node SLURM cluster in network namespaces (tests/cluster.py) on this machine.

Each case is a real job, ``sbatch --nodes=2 --ntasks-per-node=1 slurm/pretrain_xl.sh`` with overrides: one rank
per node, so every byte a rank sends to the other crosses its node's veth, where the kernel counts it (the host
end's receive counter = what the node sent, TCP/IP headers included; the payload is estimated by taking 66 bytes
of headers off per packet). The model is ``efficientnetv2_s`` with a 10-class head (20,190,298 parameters,
psi = 80.76 MB in fp32, the dtype gradients and weights travel in on CPU), 64 px images, micro-batch 4 on each
rank (no accumulation; then 2 micro-batches per step for ZeRO 1 and 2), no EMA, no evaluation, no checkpoint
during the window, and no skipped (non-finite) step, which would skip its communication. While the job runs, the
counters and the clock are read the moment step ``--from`` and step ``--to`` appear in train_log.jsonl (polled every
20 ms): bytes and seconds per step are their differences over the steps between (start-up, the initial broadcast
of the weights and the final save fall outside).

Expected volumes (the ZeRO paper, section 7, per rank and step, for N ranks): data-parallel all-reduce and ZeRO
1 / 2 2 psi (N-1)/N (a reduce-scatter and an all-gather of psi); ZeRO-3 3 psi (N-1)/N (the weights gathered in
forward and again in backward, the gradients reduce-scattered). With N = 2: psi and 1.5 psi.

Step time: a token-bucket rate limit (``tc qdisc ... tbf``) on each node's own interface (egress: the node's NIC),
1 and 10 Gbit/s, the same jobs, ZeRO 2 and 3: the bandwidth term of a step is volume / rate. Latency cannot be
injected here (this kernel has no ``sch_netem``); the latency term is the number of collectives per step, counted
by bench/comm_calls.py, times what one costs on the target network. bench/results/comm.md applies the model to
the XL plan.

    python bench/comm.py                      # as root, with slurm-wlm and munge; ~10 minutes on 2 idle cores
    python bench/comm.py --only volume        # or: --only rate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PARAMS = 20_190_298  # efficientnetv2_s, 10 classes (pipeline.models.count_params)
PSI = PARAMS * 4  # bytes, fp32
HEADER = 66  # bytes of Ethernet + IPv4 + TCP (with timestamps) headers per packet
NO_MULTI_RANK_ALLREDUCE = ("deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=false",)
VOLUME_CASES = [(0, 1, ()), (1, 1, ()), (2, 1, ()), (3, 1, ()), (1, 2, ()), (2, 2, ()),
                (1, 1, NO_MULTI_RANK_ALLREDUCE), (2, 1, NO_MULTI_RANK_ALLREDUCE), (2, 2, NO_MULTI_RANK_ALLREDUCE),
                (0, 2, ()), (3, 2, ())]
RATES = [  # (label, tbf rate, tbf burst): each node's NIC
    ("unlimited", None, None),
    ("10 Gbit/s", "10gbit", "1250kb"),
    ("1 Gbit/s", "1gbit", "125kb"),
]


def overrides(shards: Path, run_dir: Path, zero: int, steps: int, accum: int = 1) -> list[str]:
    return [f"data.train=[{shards}]", f"train.run_dir={run_dir}", "model.name=efficientnetv2_s",
            f"train.total_steps={steps}", f"train.zero_stage={zero}", f"train.global_batch_size={8 * accum}",
            "train.micro_batch_size=4", "progressive.num_stages=1", "progressive.min_image_size=64",
            "progressive.max_image_size=64", "data.eval_image_size=64", "data.workers=0", "ema.enabled=false",
            "eval.every_steps=0", "eval.max_batches=1", "checkpoint.every_steps=0", "train.log_every=1",
            "train.image_grid=false", "train.collective_timeout_s=300"]


def counters(cluster) -> dict[str, tuple[int, int]]:
    """(bytes, packets) each node has sent into the bridge so far."""
    out = {}
    for node, veth in zip(cluster.nodes, cluster.veths):
        stats = Path(f"/sys/class/net/{veth}/statistics")
        out[node] = (int((stats / "rx_bytes").read_text()), int((stats / "rx_packets").read_text()))
    return out


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def check_finite(run_dir: Path) -> None:
    """A skipped (non-finite) step skips the optimizer and its communication: such a run measures nothing."""
    last = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[-1])
    if last.get("nonfinite_steps"):
        raise RuntimeError(f"{run_dir}: {last['nonfinite_steps']} non-finite steps; the measurement is void")


def run_case(cluster, args, shards: Path, root: Path, zero: int, name: str, accum: int = 1,
             extra: tuple = ()) -> dict:
    run_dir = root / f"run-{name}"
    log = root / f"{name}.out"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, REPO=str(REPO), RUN_DIR=str(run_dir),
               CONFIG="configs/pretrain/tiny_cpu.yaml", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    job = cluster.sbatch(REPO / "slurm" / "pretrain_xl.sh", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                         "--gpus-per-node=0", "--time=20", "--no-requeue", f"--output={log}",
                         script_args=[*overrides(shards, run_dir, zero, args.to + 2, accum), *extra], env=env,
                         cwd=REPO)
    marks = {}
    deadline = time.monotonic() + args.timeout
    while len(marks) < 2:
        step = logged_step(run_dir)
        for want in (args.start, args.to):
            if want not in marks and step >= want:
                if step > want:
                    raise RuntimeError(f"{name}: missed step {want} (at {step}); poll faster or use more steps")
                marks[want] = (time.monotonic(), counters(cluster))
        if time.monotonic() > deadline or cluster.job_state(job) in ("FAILED", "CANCELLED", "COMPLETED",
                                                                      "NODE_FAIL", "TIMEOUT"):
            if len(marks) < 2:
                raise RuntimeError(f"{name}: job {job} is {cluster.job_state(job)} at step {step}\n"
                                   + (log.read_text() if log.exists() else ""))
        time.sleep(0.02)
    cluster.wait_for(job, ["COMPLETED"], timeout=args.timeout)
    check_finite(run_dir)
    steps = args.to - args.start
    (t0, c0), (t1, c1) = marks[args.start], marks[args.to]
    per_node = {}
    for node in cluster.nodes:
        b = (c1[node][0] - c0[node][0]) / steps
        p = (c1[node][1] - c0[node][1]) / steps
        per_node[node] = {"bytes": b, "packets": p, "payload": b - HEADER * p}
    return {"zero": zero, "accum": accum, "extra": list(extra), "step_s": (t1 - t0) / steps, "per_node": per_node}


def limit_rate(cluster, rate, burst) -> None:
    """A token-bucket rate limit on each node's interface (egress), or none. (This machine's kernel has no
    sch_netem, so latency cannot be injected: the latency term comes from the collective count instead.)"""
    for ns in cluster.netns:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        if rate is not None:
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                            "rate", rate, "burst", burst, "latency", "200ms"], check=True, capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["volume", "rate"])
    p.add_argument("--cases", help="volume cases to run, as indices into VOLUME_CASES (e.g. 6,7,8)")
    p.add_argument("--from", dest="start", type=int, default=3, help="first step of the measured window")
    p.add_argument("--to", type=int, default=13, help="last step of the measured window")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--repeats", type=int, default=2, help="rounds of the rate settings")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "comm.json"))
    args = p.parse_args(argv)
    import cluster as mn
    from pretrain_launch import write_demo_shards

    why = mn.unavailable_reason()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-comm-"))
    shards = write_demo_shards(root / "shards", per_class=12, val_per_class=1, shard_size=6)
    cluster = mn.get_multinode(2)
    results: dict = {"psi_bytes": PSI, "params": PARAMS, "window": [args.start, args.to], "volume": [], "rate": []}
    try:
        if args.only in (None, "volume"):
            # and with 2 micro-batches per step (ZeRO-2 reduces its partitioned gradients at every micro-batch),
            # and with DeepSpeed's all-reduce of buckets that span several ranks' partitions turned off
            chosen = [VOLUME_CASES[int(i)] for i in args.cases.split(",")] if args.cases else VOLUME_CASES
            for zero, accum, extra in chosen:
                r = run_case(cluster, args, shards, root, zero, f"volume-z{zero}-a{accum}-{len(extra)}", accum, extra)
                results["volume"].append(r)
                b = max(v["payload"] for v in r["per_node"].values())
                print(f"ZeRO-{zero}, accumulation {accum}{' ' + ' '.join(extra) if extra else ''}: {b / 1e6:.2f} MB "
                      f"payload per step per rank = {b / PSI:.3f} psi; step {r['step_s']:.3f} s", flush=True)
        if args.only in (None, "rate"):
            # rounds of every setting in turn, so that machine noise hits them alike; compare within a round
            for round_ in range(args.repeats):
                for label, rate, burst in RATES:
                    limit_rate(cluster, rate, burst)
                    for zero in (2, 3):
                        r = run_case(cluster, args, shards, root, zero, f"rate-z{zero}-{rate}-{round_}")
                        r.update(label=label, rate=rate, round=round_)
                        results["rate"].append(r)
                        print(f"round {round_}, {label}, ZeRO-{zero}: step {r['step_s']:.3f} s", flush=True)
                limit_rate(cluster, None, None)
    finally:
        mn.stop_multinode()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
