"""Multi-node jobs on a real multi-node SLURM cluster (tests/cluster.py: one network namespace, hostname and slurmd
per node, on one machine): the real slurm/ scripts and the real trainer, tiny config, CPU, gloo.

The ranks of node 2 reach the rendezvous on node 1 over the cluster's bridge, as on a real cluster.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

import cluster as mn
import pretrain_launch as launch
from ds_launch import child_env
from pipeline.checkpoint import MARKER, latest, step_tag

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
        yield mn.get_multinode(3)  # jobs take --nodes=2 unless they grow to 3
    except mn.ClusterError as e:
        pytest.fail(str(e))
    finally:
        mn.stop_multinode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return launch.write_demo_shards(tmp_path_factory.mktemp("mn") / "shards", per_class=12, val_per_class=2,
                                    shard_size=6)


STEPS = 10
# A global batch that 4 ranks (2 nodes) and 6 ranks (3 nodes) both divide with micro-batches of 2; two loader
# workers per rank, as on a real cluster.
OVERRIDES = [f"train.total_steps={STEPS}", "checkpoint.every_steps=5", "train.global_batch_size=24",
             "train.micro_batch_size=2", "data.workers=2"]


def _env(subprocess_env, repo_root, run_dir: Path, **extra) -> dict:
    env = dict(subprocess_env)
    env.update(PYTHONPATH=str(repo_root), PYTHON=sys.executable, REPO=str(repo_root), RUN_DIR=str(run_dir),
               CONFIG="configs/pretrain/tiny_cpu.yaml", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _submit(cluster, repo_root, subprocess_env, run_dir: Path, shards: Path, nodes: int = 2,
            script: str = "pretrain_xl.sh", extra: tuple = (), options: tuple = (), **env) -> tuple[str, Path]:
    log = run_dir.parent / f"{run_dir.name}-job.out"
    job = cluster.sbatch(repo_root / "slurm" / script, f"--nodes={nodes}", *TWO_NODES[1:], f"--output={log}", *options,
                         script_args=[f"data.train=[{shards}]", *OVERRIDES, *extra],
                         env=_env(subprocess_env, repo_root, run_dir, **env), cwd=repo_root)
    return job, log


def _wait(cluster, job: str, log: Path, states=("COMPLETED",), timeout: float = 300) -> dict:
    try:
        return cluster.wait_for(job, list(states), timeout=timeout)
    except mn.ClusterError as e:
        mn.fail_job(e, job_output=log)


@pytest.fixture(scope="module")
def straight(cluster, shards, tmp_path_factory):
    """An uninterrupted 2-node run: the reference of the other tests. (job id, run dir, job output, bytes each
    node sent into the bridge while it ran)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    before = cluster.bytes_sent()
    job, log = _submit(cluster, TESTS.parent, child_env(), run_dir, shards)
    _wait(cluster, job, log)
    sent = {n: b - before[n] for n, b in cluster.bytes_sent().items()}
    return job, run_dir, _read(log), sent


def test_two_node_pretraining_job(cluster, straight):
    """sbatch --nodes=2 --ntasks-per-node=2 slurm/pretrain_xl.sh: 4 ranks on two hosts, the rendezvous on the
    first node's bridge address, LOCAL_RANK / LOCAL_WORLD_SIZE per node, checkpoints that record both hosts."""
    job, run_dir, out, sent = straight
    first, second = cluster.nodes[:2]
    assert f"rendezvous {first}:" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 4
    marker = json.loads((run_dir / "checkpoints" / step_tag(STEPS) / MARKER).read_text())
    assert marker["world_size"] == 4 and marker["slurm_job_id"] == job
    ranks = marker["ranks"]
    assert [r["host"] for r in ranks] == [first, first, second, second], ranks
    assert [(r["local_rank"], r["local_world_size"]) for r in ranks] == [(0, 2), (1, 2)] * 2, ranks
    assert {r["master_addr"] for r in ranks} == {first}
    # The traffic went over the bridge: node 2's ranks sent their gradient shards through its veth (the
    # model has ~0.1M parameters: 10 steps of ZeRO-2 reduce-scatter + all-gather are megabytes); the third
    # node, not in the job, sent next to nothing (its slurmd's heartbeats).
    assert sent[second] > 1_000_000, sent
    assert sent[cluster.nodes[2]] < sent[second] / 10, sent


def test_two_node_preemption_resumes_exactly(cluster, shards, straight, repo_root, subprocess_env, tmp_path):
    """USR1 to the 4 ranks of a 2-node job: all save, rank 0 requeues, the job restarts and resumes; every
    logged loss equals the uninterrupted run's."""
    run_dir = tmp_path / "run"
    job, log = _submit(cluster, repo_root, subprocess_env, run_dir, shards)
    try:
        cluster.wait_until(lambda: launch.logged_steps(run_dir) >= 3, job, 240, "step 3 of the 2-node job")
    except mn.ClusterError as e:
        mn.fail_job(e, job_output=log)
    cluster.run(["scancel", "--signal=USR1", job])
    info = _wait(cluster, job, log, ["PENDING"], timeout=120)
    assert info.get("Restarts") == "1", info
    stopped = latest(run_dir)
    assert stopped is not None and 3 <= stopped < STEPS, _read(log)
    cluster.release_now(job)
    _wait(cluster, job, log)
    text = _read(log)
    assert text.count("(restart 0)") == 1 and text.count("(restart 1)") == 1, text
    assert f"checkpoint at step {stopped} saved" in text, text
    a, b = launch.losses_by_step(straight[1]), launch.losses_by_step(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    differ = [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert not differ, f"resumed at {stopped}: logged losses differ from the uninterrupted run's: {differ[:3]}"


def test_three_nodes_continue_a_two_node_run(cluster, shards, straight, repo_root, subprocess_env, tmp_path):
    """A run checkpointed by 2 nodes (4 ranks) continues on 3 (6 ranks): the universal-checkpoint path."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight[1], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / step_tag(STEPS))  # as if the 2-node job had stopped at step 5
    job, log = _submit(cluster, repo_root, subprocess_env, run_dir, shards, nodes=3)
    _wait(cluster, job, log)
    text = _read(log)
    marker = json.loads((run_dir / "checkpoints" / step_tag(STEPS) / MARKER).read_text())
    assert marker["world_size"] == 6 and {r["host"] for r in marker["ranks"]} == set(cluster.nodes), marker
    assert "resuming a 4-rank checkpoint on 6 ranks: converting to a universal checkpoint" in text, text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["world_size"] == 6


def test_two_node_finetuning_with_accelerate(cluster, shards, straight, repo_root, subprocess_env, tmp_path):
    """slurm/finetune_transfer.sh with LAUNCHER=accelerate on 2 nodes: one `accelerate launch` per node, 2
    processes each, initialised from the 2-node pretraining run; the checkpoint records the 4 processes on
    both hosts."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    env = _env(subprocess_env, repo_root, run_dir, CONFIG="configs/finetune/demo.yaml", LAUNCHER="accelerate",
               PROCS_PER_NODE=2)
    job = cluster.sbatch(repo_root / "slurm" / "finetune_transfer.sh", "--nodes=2", "--ntasks-per-node=1",
                         "--cpus-per-task=2", "--gpus-per-node=0", "--time=10", f"--output={log}",
                         script_args=[f"init={straight[1]}", f"data.train=[{shards}]", "train.total_steps=4",
                                      "train.global_batch_size=16", "train.micro_batch_size=4",
                                      "checkpoint.every_steps=2", "progressive.min_image_size=48",
                                      "progressive.max_image_size=48", "data.eval_image_size=48", "data.cutout=0"],
                         env=env, cwd=repo_root)
    _wait(cluster, job, log)
    text = _read(log)
    first, second = cluster.nodes[:2]
    assert "launcher accelerate" in text and f"rendezvous {first}:" in text, text
    marker = json.loads((run_dir / "checkpoints" / step_tag(4) / MARKER).read_text())
    assert marker["world_size"] == 4, marker
    assert [r["host"] for r in marker["ranks"]] == [first, first, second, second], marker["ranks"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["init_kind"] == "deepspeed" and metrics["step"] == 4
    # every validation image evaluated once across the 4 processes on 2 hosts (10 classes x 2)
    assert metrics["results"]["ema"]["samples"] == metrics["results"]["raw"]["samples"] == 20, metrics


# The node-loss test runs last: it leaves its node down.
LOSS_STEPS = 12
LOSS_TIMEOUT_S = 20  # train.collective_timeout_s of the run that loses a node


@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory):
    """240 training images: one epoch is 10 steps of 24 (each of 4 ranks x 2 workers reads 5 shards of 6)."""
    return launch.write_demo_shards(tmp_path_factory.mktemp("mn-epoch") / "shards", per_class=24, val_per_class=2,
                                    shard_size=6)


def _keys(folder: Path) -> dict[int, list[tuple[int, str]]]:
    """(epoch, key) of every sample by step, all ranks of a job together (the EFFNETV2_TEST_KEYS test hook)."""
    out: dict[int, list[tuple[int, str]]] = {}
    for path in sorted(folder.glob("keys.rank*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["step"], []).extend((r["epoch"], k) for k in r["keys"])
    return out


def test_node_loss_survivors_exit_and_one_node_continues_the_epoch(cluster, epoch_shards, repo_root, subprocess_env,
                                                                    tmp_path):
    """Node 2 of a 2-node job fails mid-step (its link down, every process on it killed): node 1's ranks exit
    within the collective timeout with one line naming the lost ranks and host; the job ends (--no-requeue);
    the last complete checkpoint stays valid; a 1-node job (2 ranks: a world-size change through the universal
    path) continues the epoch without repeating or skipping a sample."""
    first, second = cluster.nodes[:2]
    run_dir = tmp_path / "run"
    extra = (f"train.total_steps={LOSS_STEPS}", f"train.collective_timeout_s={LOSS_TIMEOUT_S}")
    (tmp_path / "keys-2nodes").mkdir()
    job, log = _submit(cluster, repo_root, subprocess_env, run_dir, epoch_shards, extra=extra,
                       options=("--no-requeue",), EFFNETV2_TEST_KEYS=tmp_path / "keys-2nodes")
    try:
        cluster.wait_until(lambda: latest(run_dir) == 5 and launch.logged_steps(run_dir) >= 6, job, 240,
                           "step 6 of the 2-node job")
    except mn.ClusterError as e:
        mn.fail_job(e, job_output=log)
    lost_at = time.monotonic()
    cluster.lose_node(second)
    lines: list[str] = []

    def survivors_reported() -> bool:
        lines[:] = [ln for ln in _read(log).splitlines() if "a collective operation failed" in ln]
        return len(lines) >= 2

    deadline = lost_at + LOSS_TIMEOUT_S + 40
    while not survivors_reported() and time.monotonic() < deadline:
        time.sleep(0.2)
    took = time.monotonic() - lost_at
    assert survivors_reported(), f"node 1's ranks did not report within {took:.0f} s:\n{_read(log)}"
    for rank in (0, 1):
        [line] = [ln for ln in lines if f"rank {rank}: a collective operation failed" in ln]
        assert f"lost ranks 2, 3 on host {second} (every rank of {second}: the node is lost)" in line, line
        assert f"rerun the same command to resume from {run_dir / 'checkpoints' / step_tag(5)}" in line, line
    assert "Traceback" not in _read(log), _read(log)
    assert took < LOSS_TIMEOUT_S + 20, f"the survivors took {took:.0f} s:\n{_read(log)}"
    info = _wait(cluster, job, log, ["FAILED", "NODE_FAIL"], timeout=120)
    assert info.get("Restarts", "0") == "0", info
    assert latest(run_dir) == 5  # complete and intact: the resume below loads it

    one_log = tmp_path / "one-node.out"
    (tmp_path / "keys-1node").mkdir()
    job1 = cluster.sbatch(repo_root / "slurm" / "pretrain_xl.sh", "--nodes=1", f"--nodelist={first}",
                          *TWO_NODES[1:], f"--output={one_log}",
                          script_args=[f"data.train=[{epoch_shards}]", *OVERRIDES, *extra],
                          env=_env(subprocess_env, repo_root, run_dir, EFFNETV2_TEST_KEYS=tmp_path / "keys-1node"),
                          cwd=repo_root)
    _wait(cluster, job1, one_log)
    text = _read(one_log)
    assert "resuming a 4-rank checkpoint on 2 ranks: converting to a universal checkpoint" in text, text
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    # steps 1-5 from the 2-node job (its steps after the checkpoint are lost work), 6-12 from the 1-node job
    before, after = _keys(tmp_path / "keys-2nodes"), _keys(tmp_path / "keys-1node")
    steps = {**{s: before[s] for s in range(1, 6)}, **after}
    assert sorted(steps) == list(range(1, LOSS_STEPS + 1)) and all(len(k) == 24 for k in steps.values())
    epoch0 = [k for s in sorted(steps) for e, k in steps[s] if e == 0]
    assert len(set(epoch0)) == len(epoch0), "a sample was trained on twice in epoch 0"
    # Every image of the epoch: the 4 readers of the 1-node job share the 120 images the 8 readers of the 2-node
    # job had not read (halves of 8 shards and 16 whole ones) evenly, 30 each, 15 micro-batches of 2.
    assert len(epoch0) == 240, len(epoch0)
