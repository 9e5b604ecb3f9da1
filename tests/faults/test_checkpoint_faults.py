"""Checkpoint faults, provoked for real on 2-rank CPU DeepSpeed runs of ``python -m pipeline.pretrain``.

- kill -9 of the whole job while it writes a checkpoint: the partial folder (no COMPLETE.json) is ignored, the
  next job resumes from the checkpoint before it and logs the losses of an uninterrupted run;
- a full disk during a save (a size-limited tmpfs as the checkpoints folder): one error line naming the folder
  and "no space left on device", exit non-zero, the previous checkpoint complete; the rerun after the space is
  freed resumes from it;
- a complete checkpoint whose rank file or DeepSpeed shard was deleted or truncated afterwards, or whose
  COMPLETE.json is garbage: found before loading, the newest intact checkpoint used, a warning naming the file;
- an unusable run dir (a file, under a file, on a read-only mount): one error line at start, exit non-zero;
- two jobs on one run dir: the second refuses, naming the first's host and pid; after the first is killed with
  -9, the next job starts (the kernel dropped its flock).

One uninterrupted run (module fixture ``baseline``: 6 steps, a checkpoint every 2) is the reference and the
source of the checkpoints the corruption tests damage (copies). The runs are launched as users launch them
(torchrun, ``-m pipeline.pretrain``), each rank's output in its own file (torchrun ``--redirects``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
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
from pipeline.distributed import free_port
from pipeline.runlock import LOCK_NAME, RunDirError, RunLock

REPO = launch.REPO
STEPS = 6
EVERY = 2
SETTINGS = [f"train.total_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0",
            "data.workers=0", "train.collective_timeout_s=60"]
DS_MODEL = "mp_rank_00_model_states.pt"
DS_OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


# --------------------------------------------------------------------------------------------- launching


@dataclass
class Job:
    """A torchrun launch of ``python -m pipeline.pretrain``; each rank's stdout / stderr in its own file."""

    proc: subprocess.Popen
    logs: Path

    def rank_out(self, rank: int, stream: str = "stderr") -> str:
        files = sorted(self.logs.glob(f"*/attempt_*/{rank}/{stream}.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    def report(self) -> str:
        parts = [f"--- rank {r} {s}\n{self.rank_out(r, s)[-3000:]}" for r in (0, 1) for s in ("stdout", "stderr")]
        return "\n".join(parts + [f"--- torchrun\n{(self.logs / 'torchrun.out').read_text()[-2000:]}"])

    def rank_pids(self) -> dict[int, int]:
        """{rank: pid} of the ranks under the launcher (read from their environment)."""
        out = {}
        for pid in launch.children(self.proc.pid):
            with contextlib.suppress(OSError):
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
                out[int(env["RANK"])] = pid
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            launch.kill9(self.proc)
            raise AssertionError(f"the job did not end within {timeout} s:\n{self.report()}") from None


def start(tmp: Path, run_dir: Path, *extra: str, shards: Path) -> Job:
    logs = tmp / f"logs-{time.monotonic_ns()}"
    logs.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--log-dir", str(logs), "--redirects", "3", "-m", "pipeline.pretrain", "--config", launch.CONFIG,
           f"data.train=[{shards}]", f"train.run_dir={run_dir}", *SETTINGS, *extra]
    with open(logs / "torchrun.out", "w") as out:
        proc = subprocess.Popen(cmd, env=launch.env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return Job(proc, logs)


def run(tmp: Path, run_dir: Path, *extra: str, shards: Path, ok: bool = True, timeout: float = 240) -> Job:
    job = start(tmp, run_dir, *extra, shards=shards)
    rc = job.wait(timeout)
    assert (rc == 0) == ok, f"exit {rc}, expected {'0' if ok else 'non-zero'}:\n{job.report()}"
    return job


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def assert_one_clean_error(job: Job, *needles: str) -> str:
    """Rank 0 printed one ``error:`` line holding every needle; no rank printed a traceback."""
    lines = error_lines(job.rank_out(0))
    assert len(lines) == 1 and all(n in lines[0] for n in needles), job.report()
    for rank in (0, 1):
        assert "Traceback" not in job.rank_out(rank), job.report()
    return lines[0]


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


class DirWatch:
    """inotify on one folder: returns as soon as an entry of a given name is created in it (no polling, so a kill
    can land within the few milliseconds a tiny model's save takes)."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(),
                                                      self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def wait_for(self, name: str, job: Job, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if not ready:
                assert job.proc.poll() is None, f"the run ended before creating {name}:\n{job.report()}"
                continue
            buf, i = os.read(self.fd, 1 << 16), 0
            while i < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, i)
                if buf[i + 16:i + 16 + length].rstrip(b"\0").decode() == name:
                    return
                i += 16 + length
        raise AssertionError(f"timed out waiting for {name}:\n{job.report()}")

    def close(self) -> None:
        os.close(self.fd)


def losses_agree(reference: Path, run_dir: Path) -> None:
    a, b = launch.losses_by_step(reference), launch.losses_by_step(run_dir)
    assert sorted(b) == list(range(1, STEPS + 1)), sorted(b)
    assert {s: b[s] for s in a} == a, "the resumed run's losses differ from the uninterrupted run's"


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / step_tag(step)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return launch.write_demo_shards(tmp_path_factory.mktemp("ckpt_fault_shards") / "demo")


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory) -> Path:
    """The uninterrupted run: complete checkpoints at steps 2, 4, 6, every logged loss."""
    root = tmp_path_factory.mktemp("baseline")
    run(root, root / "run", shards=shards)
    assert [c.step for c in list_checkpoints(root / "run")] == [2, 4, 6]
    return root / "run"


def copy_run(baseline: Path, dest: Path, steps: tuple[int, ...] = (2, 4, 6)) -> Path:
    """The baseline's checkpoints ``steps`` in a new run dir (nothing else: a resume needs nothing else)."""
    for step in steps:
        shutil.copytree(ckpt(baseline, step), ckpt(dest, step))
    return dest


def resume_point(run_dir: Path, **cfg):
    """Rank 0's resume decision for a 2-rank run of the baseline's settings, in this process."""
    c = load_config(launch.CONFIG, [f"train.run_dir={run_dir}", *SETTINGS, *(f"checkpoint.{k}={v}" for k, v in
                                                                              cfg.items())])
    return CheckpointManager(c.checkpoint, run_dir, rank=0, world_size=2).resolve_resume()


# --------------------------------------------------------------------------------------------- kill -9 and the lock


@dataclass
class LockScenario:
    first: Job
    first_pids: dict[int, int]
    second: Job
    third: Job
    run_dir: Path
    partial: list[str]


@pytest.fixture(scope="module")
def lock_scenario(shards, tmp_path_factory) -> LockScenario:
    """Job 1 starts; while it holds the run dir (its ranks stopped with SIGSTOP, so that it cannot finish first),
    job 2 is started on the same run dir and must refuse; job 1 goes on and is killed with -9 (every process)
    the moment its step-4 checkpoint folder appears; job 3 then starts on the same run dir and finishes."""
    tmp = tmp_path_factory.mktemp("lock")
    run_dir = tmp / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    watch = DirWatch(run_dir / "checkpoints")
    first = start(tmp, run_dir, shards=shards)
    try:
        def holds_lock() -> bool:
            try:
                holder = json.loads((run_dir / LOCK_NAME).read_text())
            except (OSError, ValueError):
                return False
            return holder.get("pid") in first.rank_pids().values()

        launch.wait_for(holds_lock, first.proc, 120, "job 1 to lock the run dir")
        pids = first.rank_pids()
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            second = run(tmp, run_dir, shards=shards, ok=False, timeout=120)
        finally:
            for pid in pids.values():
                os.kill(pid, signal.SIGCONT)
        watch.wait_for(step_tag(4), first, 180)
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
    finally:
        watch.close()
        launch.kill9(first.proc)
    folder = ckpt(run_dir, 4)
    partial = sorted(p.name for p in folder.iterdir())
    assert read_marker(folder) is None, f"the save completed before the kill landed; it held {partial}"
    third = run(tmp, run_dir, shards=shards)
    return LockScenario(first, pids, second, third, run_dir, partial)


def test_second_job_on_a_run_dir_refuses_naming_the_first_ones_host_and_pid(lock_scenario):
    s = lock_scenario
    line = assert_one_clean_error(s.second, "train.run_dir", str(s.run_dir), "in use by another job",
                                  f"host {socket.gethostname()}", f"pid {s.first_pids[0]}")
    assert LOCK_NAME in line
    assert s.second.proc.returncode != 0


def test_kill9_during_a_save_resumes_from_the_checkpoint_before_it(lock_scenario, baseline):
    s = lock_scenario
    out = s.third.rank_out(0, "stdout")
    assert f"resuming from {ckpt(s.run_dir, 2)} (step 2)" in out, s.third.report()
    # The partial step-4 folder was replaced by the resumed run's own, complete one.
    assert [c.step for c in list_checkpoints(s.run_dir, include_incomplete=True)] == [2, 4, 6]
    assert all(c.complete for c in list_checkpoints(s.run_dir, include_incomplete=True))
    losses_agree(baseline, s.run_dir)


def test_lock_of_a_job_killed_with_kill9_does_not_block_the_next_job(lock_scenario):
    s = lock_scenario
    assert all(not launch._alive(pid) for pid in s.first_pids.values())
    holder = json.loads((s.run_dir / LOCK_NAME).read_text())
    assert holder["pid"] not in s.first_pids.values() and holder["host"] == socket.gethostname()
    assert latest(s.run_dir) == STEPS and "in use by another job" not in s.third.rank_out(0)


# --------------------------------------------------------------------------------------------- full disk


def test_full_disk_during_a_save_fails_with_one_line_and_keeps_the_previous_checkpoint(baseline, shards, tmp_path):
    run_dir = tmp_path / "run"
    src = ckpt(baseline, 2)
    used = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    # Room for the step-2 checkpoint and half of the next one: the step-4 save runs out of space part way.
    with tmpfs(run_dir / "checkpoints", size=(used + used // 2) // 4096 * 4096 + 8 * 4096) as mount:
        shutil.copytree(src, mount / step_tag(2))
        t0 = time.monotonic()
        failed = run(tmp_path, run_dir, shards=shards, ok=False, timeout=180)
        took = time.monotonic() - t0
        lines = error_lines(failed.rank_out(0)) + error_lines(failed.rank_out(1))
        assert lines and all("no space left on device" in line and str(ckpt(run_dir, 4)) in line
                             and f"{ckpt(run_dir, 2)}, is intact" in line for line in lines), failed.report()
        assert "Traceback" not in failed.rank_out(0) + failed.rank_out(1), failed.report()
        assert took < 150
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
    run_dir = copy_run(baseline, tmp_path / "run")
    name, how = DAMAGE[case]
    damage(ckpt(run_dir, 6) / name, how)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        point = resume_point(run_dir)
    assert point.step == 4 and point.path == ckpt(run_dir, 4)
    assert str(ckpt(run_dir, 6) / name) in caplog.text
    if name == MARKER:
        assert f"{ckpt(run_dir, 6) / MARKER} is unreadable" in caplog.text
    else:
        assert "is damaged, not resuming from it" in caplog.text
        assert ("is missing" if how == "delete" else "truncated or overwritten") in caplog.text
        # Asked for by name, the damaged one is refused, naming the file and the intact one to use.
        with pytest.raises(CheckpointError, match="is damaged") as e:
            resume_point(run_dir, resume=ckpt(run_dir, 6))
        assert str(ckpt(run_dir, 6) / name) in str(e.value) and str(ckpt(run_dir, 4)) in str(e.value)


def test_every_checkpoint_damaged_is_refused_not_restarted(baseline, tmp_path):
    run_dir = copy_run(baseline, tmp_path / "run", steps=(2, 4))
    damage(ckpt(run_dir, 4) / DS_MODEL, "truncate")
    damage(ckpt(run_dir, 2) / "rank-00000.pt", "delete")
    with pytest.raises(CheckpointError, match="every complete checkpoint .* is damaged") as e:
        resume_point(run_dir)
    assert str(ckpt(run_dir, 4) / DS_MODEL) in str(e.value)


def test_run_skips_damaged_checkpoints_and_continues_exactly(baseline, shards, tmp_path):
    """End to end: a truncated DeepSpeed shard in step 6 and a missing rank file in step 4; the job warns about both,
    resumes from step 2 and logs the uninterrupted run's losses."""
    run_dir = copy_run(baseline, tmp_path / "run")
    damage(ckpt(run_dir, 6) / DS_OPTIM.format(1), "truncate")
    damage(ckpt(run_dir, 4) / "rank-00001.pt", "delete")
    job = run(tmp_path, run_dir, shards=shards)
    err = job.rank_out(0)
    for bad in (ckpt(run_dir, 6) / DS_OPTIM.format(1), ckpt(run_dir, 4) / "rank-00001.pt"):
        assert f"is damaged, not resuming from it: {bad}" in err, job.report()
    assert f"resuming from {ckpt(run_dir, 2)} (step 2)" in job.rank_out(0, "stdout")
    losses = launch.losses_by_step(run_dir)
    assert losses == {s: v for s, v in launch.losses_by_step(baseline).items() if s > 2}
    # The damaged ones were set aside when the resumed run wrote their steps again.
    assert [c.step for c in list_checkpoints(run_dir)] == [2, 4, 6]
    assert all(checkpoint_problem(c.path, read_marker(c.path)) is None for c in list_checkpoints(run_dir))


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
