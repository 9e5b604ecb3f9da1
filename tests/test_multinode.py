"""Multi-node jobs on a real multi-node SLURM cluster (tests/cluster.py: one network namespace, hostname and slurmd
per node, on one machine): the real slurm/ scripts and the real trainer, tiny config, CPU, gloo.

The ranks of node 2 reach the rendezvous on node 1 over the cluster's bridge, as on a real cluster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import cluster as mn
import pretrain_launch as launch
from pipeline.checkpoint import MARKER, step_tag

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
# Two nodes of 2 CPU tasks, no GPUs (the scripts' #SBATCH defaults are for GPU clusters).
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]


@pytest.fixture(scope="module")
def cluster():
    why = mn.unavailable_reason()
    if why:
        pytest.skip(why)
    try:
        yield mn.get_multinode(2)
    except mn.ClusterError as e:
        pytest.fail(str(e))
    finally:
        mn.stop_multinode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return launch.write_demo_shards(tmp_path_factory.mktemp("mn") / "shards", per_class=12, val_per_class=2,
                                    shard_size=6)


def _env(subprocess_env, repo_root, run_dir: Path, **extra) -> dict:
    env = dict(subprocess_env)
    env.update(PYTHONPATH=str(repo_root), PYTHON=sys.executable, REPO=str(repo_root), RUN_DIR=str(run_dir),
               CONFIG="configs/pretrain/tiny_cpu.yaml", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_two_node_pretraining_job(cluster, shards, repo_root, subprocess_env, tmp_path):
    """sbatch --nodes=2 --ntasks-per-node=2 slurm/pretrain_xl.sh: 4 ranks on two hosts, the rendezvous on the
    first node's bridge address, LOCAL_RANK / LOCAL_WORLD_SIZE per node, checkpoints that record both hosts."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    before = cluster.bytes_sent()
    job = cluster.sbatch(repo_root / "slurm" / "pretrain_xl.sh", *TWO_NODES, f"--output={log}",
                         script_args=[f"data.train=[{shards}]", "train.total_steps=4", "checkpoint.every_steps=2",
                                      "train.global_batch_size=16", "train.micro_batch_size=4"],
                         env=_env(subprocess_env, repo_root, run_dir), cwd=repo_root)
    try:
        cluster.wait_for(job, ["COMPLETED"], timeout=300)
    except mn.ClusterError as e:
        pytest.fail(f"{e}\njob output:\n{_read(log)}")
    out = _read(log)
    first, second = cluster.nodes
    assert f"rendezvous {first}:" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["world_size"] == 4
    marker = json.loads((run_dir / "checkpoints" / step_tag(4) / MARKER).read_text())
    assert marker["world_size"] == 4 and marker["slurm_job_id"] == job
    ranks = marker["ranks"]
    assert [r["host"] for r in ranks] == [first, first, second, second], ranks
    assert [(r["local_rank"], r["local_world_size"]) for r in ranks] == [(0, 2), (1, 2)] * 2, ranks
    assert {r["master_addr"] for r in ranks} == {first}
    # the traffic went over the bridge: node 2 sent the gradients of its 2 ranks through its veth
    sent = {n: b - before[n] for n, b in cluster.bytes_sent().items()}
    assert sent[second] > 100_000, sent
