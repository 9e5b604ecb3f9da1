"""Exact resume of the real trainer, as users run it: loader workers on, ZeRO 0 / 2 / 3, cut by kill -9 or a
preemption signal mid-stage or at a stage boundary, launched by torchrun or as a SLURM job (srun tasks).

Every case is compared with its uninterrupted run (the same settings, one launch): every logged loss
bit-identical, and the final raw and EMA weights equal. A covering design, not the full product: every value of
every factor appears at least once with ``data.workers=2``, and ``data.workers=0`` once; the test ids name the
combination.

The runs: tiny_cpu (3 progressive stages of 15 steps: 32 / 48 / 64 px, RandAugment, mixup and cutmix rising to
0.3, dropout and stochastic depth), 2 ranks, 45 steps of 16 images (micro-batch 8), a checkpoint every 7 steps
(7, 14, 15, 21, 28, 30, 35, 42, 45 with the stage boundaries). The cuts:

- ``kill9_mid``: kill -9 of every process right after the step-21 checkpoint (mid-stage: its loader readers
  are half way through their shards and the resumed run restarts them at step 21, where the uninterrupted
  run did not);
- ``preempt_mid``: SIGUSR1 to the ranks once step 23 is logged: all save at the next step, exit 0 (SLURM:
  rank 0 requeues the job), and the rerun (the requeued job) continues;
- ``kill9_boundary``: kill -9 right after the stage-boundary checkpoint at step 30.

These are the DeepSpeed backend's cases (pretraining). The accelerate backend's (fine-tuning, 2 processes with a
loader worker each, 2 stages with an accumulation change: kill -9 mid-stage and at the boundary, SIGUSR1) are
``test_two_process_resume_with_loader_workers_is_exact`` in tests/test_finetune.py; both run the same trainer.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pretrain_launch as launch
from pipeline.checkpoint import MARKER, latest, list_checkpoints, read_marker, step_tag

pytestmark = pytest.mark.slow

REPO = launch.REPO
STEPS = 45
EVERY = 7
MID_CUT = 21  # a periodic checkpoint in stage 2 (steps 15-29)
BOUNDARY_CUT = 30  # the checkpoint at the start of stage 3
PREEMPT_AFTER = 23  # the signal goes out once this step is logged


@dataclass(frozen=True)
class Case:
    workers: int
    zero: int
    cut: str  # kill9_mid | preempt_mid | kill9_boundary
    launcher: str  # torchrun | srun

    @property
    def id(self) -> str:
        return f"workers{self.workers}-zero{self.zero}-{self.cut}-{self.launcher}"

    @property
    def straight_key(self) -> tuple[int, int]:
        return self.workers, self.zero


CASES = [
    Case(2, 3, "kill9_mid", "torchrun"),
    Case(2, 0, "preempt_mid", "torchrun"),
    Case(2, 2, "kill9_boundary", "torchrun"),
    Case(2, 3, "preempt_mid", "srun"),
    Case(0, 2, "kill9_mid", "torchrun"),
]
STRAIGHT = sorted({c.straight_key for c in CASES})


def _settings(workers: int, zero: int) -> list[str]:
    return [f"data.workers={workers}", f"train.zero_stage={zero}", f"train.total_steps={STEPS}",
            "train.global_batch_size=16", "train.micro_batch_size=8", f"checkpoint.every_steps={EVERY}",
            "checkpoint.keep_last=3", "progressive.max_mixup=0.3", "progressive.max_cutmix=0.3",
            "progressive.max_dropout=0.3", "model.drop_path_rate=0.2", "train.precision=fp32"]


def _overrides(shards: Path, run_dir: Path, workers: int, zero: int) -> list[str]:
    return [f"data.train=[{shards}]", f"train.run_dir={run_dir}", *_settings(workers, zero)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return launch.write_demo_shards(tmp_path_factory.mktemp("matrix_shards") / "demo")


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict[tuple[int, int], Path]:
    """The uninterrupted runs, one per (workers, ZeRO) in the cases, in one launch: {key: run dir}."""
    root = tmp_path_factory.mktemp("straight")
    runs = {key: root / f"workers{key[0]}-zero{key[1]}" for key in STRAIGHT}
    launch.run(root, 2, [{"overrides": _overrides(shards, d, *key)} for key, d in runs.items()])
    return runs


def _exported(run_dir: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The final checkpoint's raw and EMA weights, each consolidated by the export (ZeRO-3 EMA shards too)."""
    from pipeline.export import export_checkpoint

    return {kind: load_file(str(export_checkpoint(run_dir, ema=kind == "ema", out_dir=out / kind)
                                / "model.safetensors")) for kind in ("raw", "ema")}


def _assert_same_run(straight_dir: Path, resumed_dir: Path, tmp: Path, resumed_from: int) -> None:
    a, b = launch.losses_by_step(straight_dir), launch.losses_by_step(resumed_dir)
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == list(range(1, STEPS + 1))
    differ = [(s, a[s], b[s]) for s in sorted(a) if a[s] != b[s]]
    assert not differ, (f"resumed from step {resumed_from}: {len(differ)} logged losses differ from the "
                        f"uninterrupted run's, the first (step, uninterrupted, resumed): {differ[:3]}")
    assert latest(straight_dir) == latest(resumed_dir) == STEPS
    wa, wb = _exported(straight_dir, tmp / "a"), _exported(resumed_dir, tmp / "b")
    for kind in ("raw", "ema"):
        assert wa[kind].keys() == wb[kind].keys()
        for k in wa[kind]:
            assert torch.equal(wa[kind][k], wb[kind][k]), f"final {kind} weights differ: {k}"


def _kill_after_checkpoint(tmp: Path, shards: Path, run_dir: Path, case: Case, target: int) -> None:
    proc = launch.start(tmp, 2, _overrides(shards, run_dir, case.workers, case.zero))
    marker = run_dir / "checkpoints" / step_tag(target)
    try:
        launch.wait_for(lambda: read_marker(marker) is not None, proc, 300, f"the step-{target} checkpoint",
                        poll=0.05)
    finally:
        launch.kill9(proc)
    # "Right after" the target: a checkpoint the run completed between the marker and the kill is removed, as
    # if the kill had come earlier (the next one is 5-7 steps later, so this is rare).
    for c in list_checkpoints(run_dir, include_incomplete=True):
        if c.step > target:
            shutil.rmtree(c.path)
    assert latest(run_dir) == target
    launch.run(tmp, 2, [{"overrides": _overrides(shards, run_dir, case.workers, case.zero)}])


def _preempt_torchrun(tmp: Path, shards: Path, run_dir: Path, case: Case) -> int:
    proc = launch.start(tmp, 2, _overrides(shards, run_dir, case.workers, case.zero))
    try:
        launch.wait_for(lambda: launch.logged_steps(run_dir) >= PREEMPT_AFTER, proc, 300,
                        f"step {PREEMPT_AFTER}", poll=0.05)
    except AssertionError:
        launch.kill9(proc)
        raise
    out = launch.preempt(proc)
    stopped = latest(run_dir)
    assert f"preemption signal: checkpoint at step {stopped} saved" in out
    assert (run_dir / "summary_preempted.json").is_file()
    launch.run(tmp, 2, [{"overrides": _overrides(shards, run_dir, case.workers, case.zero)}])
    return stopped


def _preempt_srun(tmp: Path, shards: Path, run_dir: Path, case: Case, slurm) -> int:
    """slurm/pretrain_s.sh as a 2-task job running the real trainer: scancel --signal=USR1 -> all ranks save ->
    rank 0 requeues -> release -> the requeued job resumes -> COMPLETED."""
    import slurm_cluster

    log = tmp / "job.out"
    env = launch.env()
    env.update(PYTHONPATH=str(REPO), PYTHON=sys.executable, REPO=str(REPO), RUN_DIR=str(run_dir),
               CONFIG="configs/pretrain/tiny_cpu.yaml")
    small = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]
    job = slurm.sbatch(REPO / "slurm" / "pretrain_s.sh", *small, f"--output={log}",
                       script_args=_overrides(shards, run_dir, case.workers, case.zero)[:1]
                       + _settings(case.workers, case.zero), env=env, cwd=REPO)

    def job_log() -> str:
        return log.read_text() if log.exists() else ""

    def fail(e: Exception) -> None:
        slurm_cluster.fail_job(e, logs="" if isinstance(e, slurm_cluster.ClusterError) else slurm.logs(),
                               job_output=log)

    try:
        slurm.wait_until(lambda: launch.logged_steps(run_dir) >= PREEMPT_AFTER, job, 300, f"step {PREEMPT_AFTER}")
        slurm.run(["scancel", "--signal=USR1", job])
        info = slurm.wait_for(job, ["PENDING"], timeout=120)
        assert info.get("Restarts") == "1", info
        stopped = latest(run_dir)
        slurm.release_now(job)
        slurm.wait_for(job, ["COMPLETED"], timeout=300)
    except (slurm_cluster.ClusterError, AssertionError) as e:
        fail(e)
    text = job_log()
    assert text.count("(restart 0)") == 1 and text.count("(restart 1)") == 1, text[-4000:]
    assert f"preemption signal: checkpoint at step {stopped} saved" in text
    marker = json.loads((run_dir / "checkpoints" / step_tag(STEPS) / MARKER).read_text())
    assert marker["slurm_job_id"] == job and marker["world_size"] == 2
    return stopped


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_resume_is_exact(case: Case, shards, straight, tmp_path, request):
    run_dir = tmp_path / "run"
    if case.cut == "kill9_mid":
        _kill_after_checkpoint(tmp_path, shards, run_dir, case, MID_CUT)
        resumed_from = MID_CUT
    elif case.cut == "kill9_boundary":
        _kill_after_checkpoint(tmp_path, shards, run_dir, case, BOUNDARY_CUT)
        resumed_from = BOUNDARY_CUT
    elif case.launcher == "srun":
        resumed_from = _preempt_srun(tmp_path, shards, run_dir, case, request.getfixturevalue("slurm"))
    else:
        resumed_from = _preempt_torchrun(tmp_path, shards, run_dir, case)
    if case.cut == "preempt_mid":
        assert PREEMPT_AFTER <= resumed_from < BOUNDARY_CUT, f"the preemption checkpoint is at {resumed_from}"
    _assert_same_run(straight[case.straight_key], run_dir, tmp_path, resumed_from)
