"""Checkpoint faults, provoked for real on 2-rank CPU DeepSpeed runs of ``python -m pipeline.pretrain``.

- kill -9 of the whole job while it writes a checkpoint: the partial folder (no COMPLETE.json) is ignored, the
  next job resumes from the checkpoint before it and logs the losses of an uninterrupted run;
- a full disk during a save (a size-limited tmpfs as the checkpoints folder): one error line naming the folder
  and "no space left on device", exit non-zero, the previous checkpoint complete and loadable;
- a complete checkpoint whose rank file or DeepSpeed shard was deleted or truncated afterwards, or whose
  COMPLETE.json is garbage: found before loading, the newest intact checkpoint used, a warning naming the file;
- an unusable run dir (a file, under a file, on a read-only mount, a checkpoints folder that is a file): one
  error at start;
- two jobs on one run dir: the second refuses, naming the first's host and pid; after the first is killed with
  -9, the next job starts (the kernel dropped its flock); a forked worker does not keep the lock.

The runs are tests/faults/rank_runs.py's: each rank started directly as srun starts tasks (no launcher that kills
the other ranks when one fails: what the trainer does alone is what is tested), the session's shards, and its
uninterrupted run (``baseline`` here: checkpoints every 2 of 12 steps), whose checkpoints the corruption tests
copy and damage. A kill "during a save" holds both ranks at the trainer's ``save`` test hook (DeepSpeed's files
written, rank files and COMPLETE.json not) and kills them there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import rank_runs
import torch

import pretrain_launch as launch
from pipeline.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    checkpoint_problem,
    latest,
    list_checkpoints,
    read_marker,
    step_tag,
)
from pipeline.config import load_config
from pipeline.runlock import LOCK_NAME, RunDirError, RunLock

STEPS = rank_runs.STEPS
DS_MODEL = "mp_rank_00_model_states.pt"
DS_OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def error_lines(ranks: rank_runs.Ranks) -> list[str]:
    """The ``error:`` lines of both ranks' stderr."""
    return [line for r in (0, 1) for line in ranks.err(r).splitlines() if line.startswith("error: ")]


def no_traceback(ranks: rank_runs.Ranks) -> None:
    assert all("Traceback" not in ranks.out(r) for r in (0, 1)), ranks.report()


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of ``size`` bytes mounted on ``path``, unmounted afterwards (skips where mounting is impossible)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on {path} (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def continues_exactly(reference: Path, run_dir: Path, after: int) -> None:
    """The resumed run logged every step after ``after``, to the end, with the uninterrupted run's loss."""
    a, b = launch.losses_by_step(reference), launch.losses_by_step(run_dir)
    want = {s: v for s, v in a.items() if s > after}
    assert sorted(want) == list(range(after + 1, STEPS + 1))
    assert {s: b.get(s) for s in want} == want, "the resumed run's losses differ from the uninterrupted run's"


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_tag(step)


def resumed_from(ranks: rank_runs.Ranks, run_dir: Path, step: int) -> bool:
    return f"resuming from {ckpt(run_dir, step)} (step {step})" in ranks.out(0)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return rank_runs.shards(tmp_path_factory)


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory) -> Path:
    """The uninterrupted run: complete checkpoints at steps 2, 4, ... 12, every logged loss."""
    return rank_runs.straight(tmp_path_factory, shards)


def copy_run(baseline: Path, dest: Path, steps: tuple[int, ...]) -> Path:
    """The baseline's checkpoints ``steps`` in a new run dir (nothing else: a resume needs nothing else)."""
    for step in steps:
        shutil.copytree(ckpt(baseline, step), ckpt(dest, step))
    return dest


def resume_point(run_dir: Path, **cfg):
    """Rank 0's resume decision for a 2-rank run of the baseline's settings, in this process."""
    over = [f"train.run_dir={run_dir}", *rank_runs.SETTINGS, *(f"checkpoint.{k}={v}" for k, v in cfg.items())]
    c = load_config(launch.CONFIG, over)
    return CheckpointManager(c.checkpoint, run_dir, rank=0, world_size=2).resolve_resume()


# --------------------------------------------------------------------------------------------- kill -9 and the lock


@dataclass
class LockScenario:
    first: rank_runs.Ranks
    second: rank_runs.Ranks
    third: rank_runs.Ranks
    run_dir: Path
    partial: list[str]


@pytest.fixture(scope="module")
def lock_scenario(baseline, shards, tmp_path_factory) -> LockScenario:
    """Job 1 resumes from the baseline's step-2 checkpoint and is held inside its step-4 save; meanwhile job 2 is
    started on the same run dir and must refuse; then every rank of job 1 is killed with -9, there; job 3 is then
    started on the same run dir and runs to the end."""
    tmp = tmp_path_factory.mktemp("lock")
    run_dir = copy_run(baseline, tmp / "run", steps=(2,))
    first = rank_runs.start(tmp, run_dir, shards, pause=["save"])
    try:
        first.wait_paused("save")
        second = rank_runs.start(tmp, run_dir, shards)
        codes = second.wait(120)
        assert all(c != 0 for c in codes), f"job 2 exits {codes}:\n{second.report()}"
        assert all(p.poll() is None for p in first.procs), first.report()
    finally:
        first.kill9()
    partial = sorted(p.name for p in ckpt(run_dir, 4).iterdir())
    assert read_marker(ckpt(run_dir, 4)) is None, partial
    third = rank_runs.start(tmp, run_dir, shards)
    third.expect_exit([0, 0], timeout=240)
    return LockScenario(first, second, third, run_dir, partial)


def test_second_job_on_a_run_dir_refuses_naming_the_first_ones_host_and_pid(lock_scenario):
    s = lock_scenario
    line = rank_runs.error_line(s.second, 0)
    for needle in ("train.run_dir", str(s.run_dir), "in use by another job", f"host {socket.gethostname()}",
                   f"pid {s.first.pids()[0]}", LOCK_NAME):
        assert needle in line, line
    no_traceback(s.second)


def test_kill9_during_a_save_resumes_from_the_checkpoint_before_it(lock_scenario, baseline):
    s = lock_scenario
    assert any(name.startswith("zero_pp_rank_") for name in s.partial) and MARKER not in s.partial, s.partial
    assert resumed_from(s.third, s.run_dir, 2), s.third.report()
    # The partial step-4 folder was replaced by the resumed run's own, complete one.
    every = list_checkpoints(s.run_dir, include_incomplete=True)
    assert [c.step for c in every] == list(range(2, STEPS + 1, 2)) and all(c.complete for c in every)
    continues_exactly(baseline, s.run_dir, after=2)


def test_lock_of_a_job_killed_with_kill9_does_not_block_the_next_job(lock_scenario):
    s = lock_scenario
    assert all(p.returncode is not None for p in s.first.procs)
    holder = json.loads((s.run_dir / LOCK_NAME).read_text())
    assert holder["pid"] == s.third.pids()[0] and holder["host"] == socket.gethostname()
    assert latest(s.run_dir) == STEPS and "in use by another job" not in s.third.out(0)


# --------------------------------------------------------------------------------------------- full disk


def test_full_disk_during_a_save_fails_with_one_line_and_keeps_the_previous_checkpoint(baseline, shards, tmp_path):
    run_dir = tmp_path / "run"
    src = ckpt(baseline, 2)
    used = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    # Room for the step-2 checkpoint and half of the next one: the step-4 save runs out of space part way.
    with tmpfs(run_dir / "checkpoints", size=(used + used // 2) // 4096 * 4096 + 8 * 4096) as mount:
        shutil.copytree(src, mount / step_tag(2))
        t0 = time.monotonic()
        failed = rank_runs.start(tmp_path, run_dir, shards)
        codes = failed.wait(180)
        took = time.monotonic() - t0
        assert all(c != 0 for c in codes), f"exit statuses {codes}:\n{failed.report()}"
        lines = error_lines(failed)
        assert lines and all("no space left on device" in line and str(ckpt(run_dir, 4)) in line
                             and f"{ckpt(run_dir, 2)}, is intact" in line for line in lines), failed.report()
        no_traceback(failed)
        assert took < 120, f"the ranks took {took:.0f} s to end"
        assert read_marker(ckpt(run_dir, 4)) is None
        assert [c.step for c in list_checkpoints(run_dir)] == [2]
        assert checkpoint_problem(ckpt(run_dir, 2), read_marker(ckpt(run_dir, 2))) is None
        # Usable and unchanged: DeepSpeed's files load (consolidated) to the uninterrupted run's step-2 weights.
        # (Resuming from a kept checkpoint is what test_run_skips_damaged_checkpoints_and_continues_exactly runs.)
        kept, reference = launch.final_state(run_dir, 2), launch.final_state(baseline, 2)
        assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)


# --------------------------------------------------------------------------------------------- damaged checkpoints


DAMAGE = {
    # name: (file in the newest checkpoint, what is done to it)
    "rank_file_missing": ("rank-00001.pt", "delete"),
    "rank_file_truncated": ("rank-00000.pt", "truncate"),
    "ds_optimizer_shard_missing": (DS_OPTIM.format(1), "delete"),
    "ds_optimizer_shard_truncated": (DS_OPTIM.format(0), "truncate"),
    "ds_model_file_truncated": (DS_MODEL, "truncate"),
    "marker_garbage": (MARKER, "truncate"),
}


def damage(file: Path, how: str) -> None:
    assert file.is_file(), f"{file} is not in the checkpoint: {sorted(p.name for p in file.parent.iterdir())}"
    if how == "delete":
        file.unlink()
    else:
        os.truncate(file, file.stat().st_size // 2)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_checkpoint_is_found_before_loading_and_the_previous_used(case, baseline, tmp_path, caplog):
    run_dir = copy_run(baseline, tmp_path / "run", steps=(STEPS - 4, STEPS - 2, STEPS))
    name, how = DAMAGE[case]
    newest, previous = ckpt(run_dir, STEPS), ckpt(run_dir, STEPS - 2)
    damage(newest / name, how)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        point = resume_point(run_dir)
    assert point.step == STEPS - 2 and point.path == previous
    assert str(newest / name) in caplog.text
    if name == MARKER:
        assert f"{newest / MARKER} is unreadable" in caplog.text
    else:
        assert "is damaged, not resuming from it" in caplog.text
        assert ("is missing" if how == "delete" else "truncated or overwritten") in caplog.text
        # Asked for by name, the damaged one is refused, naming the file and the intact one to use.
        with pytest.raises(CheckpointError, match="is damaged") as e:
            resume_point(run_dir, resume=newest)
        assert str(newest / name) in str(e.value) and str(previous) in str(e.value)


def test_every_checkpoint_damaged_is_refused_not_restarted(baseline, tmp_path):
    run_dir = copy_run(baseline, tmp_path / "run", steps=(2, 4))
    damage(ckpt(run_dir, 4) / DS_MODEL, "truncate")
    damage(ckpt(run_dir, 2) / "rank-00000.pt", "delete")
    with pytest.raises(CheckpointError, match="every complete checkpoint .* is damaged") as e:
        resume_point(run_dir)
    assert str(ckpt(run_dir, 4) / DS_MODEL) in str(e.value)


def test_run_skips_damaged_checkpoints_and_continues_exactly(baseline, shards, tmp_path):
    """End to end: a truncated DeepSpeed shard in the newest checkpoint and a missing rank file in the one before;
    the job warns about both, resumes from the one before those and logs the uninterrupted run's losses."""
    top = STEPS
    run_dir = copy_run(baseline, tmp_path / "run", steps=(top - 4, top - 2, top))
    bad = [ckpt(run_dir, top) / DS_OPTIM.format(1), ckpt(run_dir, top - 2) / "rank-00001.pt"]
    damage(bad[0], "truncate")
    damage(bad[1], "delete")
    job = rank_runs.start(tmp_path, run_dir, shards)
    job.expect_exit([0, 0], timeout=240)
    for file in bad:
        assert f"is damaged, not resuming from it: {file}" in job.err(0), job.report()
    assert resumed_from(job, run_dir, top - 4), job.report()
    continues_exactly(baseline, run_dir, after=top - 4)
    # The damaged ones were set aside when the resumed run wrote their steps again.
    assert [c.step for c in list_checkpoints(run_dir)] == [top - 4, top - 2, top]
    assert all(checkpoint_problem(c.path, read_marker(c.path)) is None for c in list_checkpoints(run_dir))
    assert len(list((run_dir / "checkpoints").glob("*.superseded-*"))) == 2


# --------------------------------------------------------------------------------------------- unusable run dir


def test_run_dir_on_a_read_only_mount_is_refused(baseline, tmp_path):
    """A run dir used before (a checkpoint and the lock file in it), now mounted read-only. (That such a refusal
    ends every rank of a job at start, with one line and no traceback, is the refused second job's test.)"""
    run_dir = tmp_path / "run"
    with tmpfs(run_dir, size=64 << 20):
        copy_run(baseline, run_dir, steps=(2,))
        lock = RunLock(run_dir)
        lock.acquire()
        lock.release()
        remount(run_dir, "ro")
        with pytest.raises(RunDirError, match=f"train.run_dir: {run_dir} is on a read-only file system"):
            RunLock(run_dir).acquire()


@pytest.mark.parametrize("kind", ["file", "under_a_file"])
def test_run_dir_that_is_not_a_folder_is_refused(tmp_path, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    run_dir = blocker if kind == "file" else blocker / "run"
    with pytest.raises(RunDirError, match=f"train.run_dir: (cannot use )?{run_dir}") as e:
        RunLock(run_dir).acquire()
    assert ("is a file, not a folder" if kind == "file" else "Not a directory") in str(e.value)


def test_checkpoints_folder_that_is_a_file_is_refused_at_start(tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoints'} is a file, where this run keeps"):
        resume_point(tmp_path)


# --------------------------------------------------------------------------------------------- the lock itself


_HOLDER = """
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"host": "node-a", "pid": os.getpid(), "slurm_job_id": sys.argv[2]}).encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("same_job", [True, False])
def test_lock_held_by_an_earlier_instance_of_the_same_slurm_job(tmp_path, monkeypatch, caplog, same_job):
    """A lock still held for a dead node (an NFS lease not yet expired) when SLURM requeues the job: the same job
    id goes on with a warning, another job is refused. The holder here is a live process with the lock."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir / LOCK_NAME), "4242"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SLURM_JOB_ID", "4242" if same_job else "777")
        lock = RunLock(run_dir)
        if same_job:
            with caplog.at_level(logging.WARNING, logger="pipeline.runlock"):
                lock.acquire()
            assert "earlier instance of this SLURM job" in caplog.text and "SLURM job 4242" in caplog.text
            lock.release()
        else:
            with pytest.raises(RunDirError, match=f"in use by another job \\(host node-a, pid {holder.pid}, SLURM "
                                                  "job 4242"):
                lock.acquire()
    finally:
        holder.communicate("")


_TRY_LOCK = "import fcntl, os, sys; fcntl.flock(os.open(sys.argv[1], os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)"


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A loader worker (forked) that outlives its rank for a few seconds must not keep the next job out."""
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: waits until the test is done
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        try_lock = [sys.executable, "-c", _TRY_LOCK, str(tmp_path / "run" / LOCK_NAME)]
        assert subprocess.run(try_lock, capture_output=True).returncode != 0  # the rank holds it
        lock.release()  # the rank is gone, its worker is not
        res = subprocess.run(try_lock, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    finally:
        os.close(w)
        os.waitpid(pid, 0)
