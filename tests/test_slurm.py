"""The slurm/ scripts on a real one-node SLURM cluster: process group from srun, preemption -> save -> requeue.

The jobs are the real ``slurm/pretrain_s.sh`` (and ``finetune_transfer.sh`` with LAUNCHER=accelerate), shrunk to
one node with 2 CPU tasks on the sbatch command line, running the stand-in entry point ``slurm_cluster``
(tests/slurm_cluster.py: job_main) instead of pipeline.pretrain.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import pretrain_launch as launch
import slurm_cluster
from pipeline.checkpoint import MARKER, latest, list_checkpoints, step_tag

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
# One node, 2 tasks of 1 CPU, no GPUs: the scripts' #SBATCH defaults are for GPU clusters.
SMALL = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]


def _job_env(subprocess_env, repo_root, tmp_path, **extra) -> dict:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(subprocess_env)
    env.update(
        PYTHONPATH=f"{TESTS}{os.pathsep}{repo_root}",
        PYTHON=sys.executable,
        REPO=str(repo_root),
        ENTRY="slurm_cluster",
        RUN_DIR=str(tmp_path / "run"),
        PROBE_OUT=str(out),
        OMP_NUM_THREADS="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_srun_tasks_form_a_process_group(slurm, repo_root, subprocess_env, tmp_path):
    env = _job_env(subprocess_env, repo_root, tmp_path, PROBE_MODE="allreduce")
    log = tmp_path / "job.out"
    job = slurm.sbatch(repo_root / "slurm" / "pretrain_s.sh", *SMALL, f"--output={log}", env=env, cwd=repo_root)
    try:
        slurm.wait_for(job, ["COMPLETED"], timeout=90)
    except slurm_cluster.ClusterError as e:
        slurm_cluster.fail_job(e, job_output=log)
    lines = sorted(_read(tmp_path / "out" / f"rank{r}.log").strip() for r in range(2))
    # Each rank reads its place from srun (SLURM_PROCID ... exported as RANK for DeepSpeed / accelerate) and
    # the all-reduce of rank + 1 over both ranks gives 3.
    assert lines == [f"rank={r} world=2 local_rank={r} launcher=torchrun env_rank={r} sum=3" for r in range(2)], \
        _read(log)
    text = _read(log)
    assert "launcher srun" in text and "training processes exited with 0" in text


@pytest.mark.parametrize("script,launcher", [("pretrain_s.sh", "srun"), ("finetune_transfer.sh", "accelerate")])
def test_preemption_saves_requeues_and_resumes(slurm, repo_root, subprocess_env, tmp_path, script, launcher):
    steps = 16
    env = _job_env(subprocess_env, repo_root, tmp_path, PROBE_MODE="loop", PROBE_STEPS=steps, PROBE_SLEEP=0.2,
                   LAUNCHER=launcher, CONFIG="configs/base.yaml", PROCS_PER_NODE=2)
    log = tmp_path / "job.out"
    out = tmp_path / "out"
    run_dir = tmp_path / "run"
    job = slurm.sbatch(repo_root / "slurm" / script, *SMALL, f"--output={log}",
                       script_args=["checkpoint.every_steps=5"], env=env, cwd=repo_root)

    # Let the loop run a few steps on both ranks, then send the time-limit warning to the job's tasks only.
    try:
        slurm.wait_until(lambda: all("step 3\n" in _read(out / f"rank{r}.log") for r in range(2)), job, 90,
                         "the job's two ranks reaching step 3")
    except slurm_cluster.ClusterError as e:
        slurm_cluster.fail_job(e, job_output=log)
    slurm.run(["scancel", "--signal=USR1", job])

    # The ranks agree, save, rank 0 requeues: the job goes back to PENDING (held ~2 min by SLURM: release it).
    try:
        info = slurm.wait_for(job, ["PENDING"], timeout=60)
    except slurm_cluster.ClusterError as e:
        slurm_cluster.fail_job(e, job_output=log, rank_0=out / "rank0.log")
    assert info.get("Restarts") == "1", info
    stopped = latest(run_dir)
    assert stopped is not None and stopped >= 3
    slurm.release_now(job)
    try:
        slurm.wait_for(job, ["COMPLETED"], timeout=90)
    except slurm_cluster.ClusterError as e:
        slurm_cluster.fail_job(e, job_output=log, rank_0=out / "rank0.log")

    text = _read(log)
    assert text.count("(restart 0)") == 1 and text.count("(restart 1)") == 1, text  # --open-mode=append
    for r in range(2):
        lines = _read(out / f"rank{r}.log").splitlines()
        assert lines[0] == "start restart=0 from=0 world=2"
        assert f"preempted at {stopped} signal=SIGUSR1 requeued={r == 0}" in lines
        assert f"start restart=1 from={stopped} world=2" in lines
        assert lines[-1] == f"done {steps}"
        # Every step exactly once: the second run continues after the checkpointed step.
        done = [int(x.split()[1]) for x in lines if x.startswith("step ")]
        assert done == list(range(1, steps + 1)), lines
    marker = json.loads((run_dir / "checkpoints" / step_tag(steps) / MARKER).read_text())
    assert marker["world_size"] == 2 and marker["slurm_job_id"] == job
    # keep_last (3) complete checkpoints remain, the newest at the final step.
    assert [c.step for c in list_checkpoints(run_dir)][-1] == steps
    assert len(list_checkpoints(run_dir)) <= 3


def test_real_pretraining_job_on_two_srun_tasks(slurm, repo_root, subprocess_env, tmp_path):
    """The real trainer (pipeline.pretrain, DeepSpeed ZeRO-2 on gloo) as a SLURM job of 2 srun tasks."""

    shards = launch.write_demo_shards(tmp_path / "shards", per_class=12, val_per_class=2, shard_size=10)
    env = _job_env(subprocess_env, repo_root, tmp_path, CONFIG="configs/pretrain/tiny_cpu.yaml",
                   PROCS_PER_NODE=2, DS_ACCELERATOR="cpu")
    env.pop("ENTRY")  # the scripts' default: pipeline.pretrain
    env["PYTHONPATH"] = str(repo_root)
    log = tmp_path / "job.out"
    run_dir = tmp_path / "run"
    job = slurm.sbatch(repo_root / "slurm" / "pretrain_s.sh", *SMALL, f"--output={log}",
                       script_args=[f"data.train=[{shards}]", "train.total_steps=6"], env=env, cwd=repo_root)
    try:
        slurm.wait_for(job, ["COMPLETED"], timeout=240)
    except slurm_cluster.ClusterError as e:
        slurm_cluster.fail_job(e, job_output=log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["world_size"] == 2 and summary["zero_stage"] == 2
    marker = json.loads((run_dir / "checkpoints" / step_tag(6) / MARKER).read_text())
    assert marker["slurm_job_id"] == job and marker["world_size"] == 2
