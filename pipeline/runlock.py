"""One job per run dir: a lock file that names its holder and that a crash releases.

Rank 0 of a training job takes ``RUN_DIR/.run.lock`` before it writes anything into the run dir and holds it
until the run ends; a second job started on the same run dir refuses at start, naming the first one's host and
pid (and SLURM job). The same step opens the run dir, so a run dir that cannot be used (a path that is a regular
file, a read-only file system, ...) is one clear error at start instead of a traceback or a hang later.

Why ``flock`` and not a pid file: the lock belongs to the open file, so the kernel drops it when the holder dies,
however it dies (kill -9, the OOM killer, a segfault), and nothing has to decide whether a recorded pid is
stale. That check cannot be made at all for a holder on another node, and a pid can be reused. On a shared
file system Linux maps ``flock`` onto the file system's own locks (NFS: byte-range locks held by the server;
Lustre and GPFS with their ``flock`` mount option: cluster-wide), so the lock works across nodes too; the file's
contents (host, pid, SLURM job, start time) are only there for the message. Two cases are handled on top:

- A node that crashed holding the lock: an NFS server keeps its lock until the client's lease runs out (about
  90 s). When SLURM requeues that job, the new run has the same ``SLURM_JOB_ID`` as the holder recorded in the
  file; SLURM never runs two instances of one job, so the holder is a dead earlier instance: the run goes on
  with a warning instead of refusing. (A requeue after a preemption needs none of this: the old processes exit
  before SLURM starts the job again, and their lock goes with them.)
- A file system without ``flock`` (ENOLCK / EOPNOTSUPP / ENOSYS, e.g. Lustre mounted with ``noflock``): the
  recorded holder is checked instead: a live pid on this host refuses, a dead one or the same SLURM job is
  taken over, a holder on another host refuses with a message that says to delete the file if that job is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional, Union

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD: dict[str, "RunLock"] = {}
"""Locks this process holds, by run dir: a second Trainer in the same process (tests, a resume in one launch)
reuses the lock instead of refusing itself (flock locks of two open files of one process conflict)."""


def _drop_in_child() -> None:
    """A forked child (a loader worker) must not keep the run dir locked once the job's own process is gone: a
    flock lasts while any descriptor of the open file does. Closing the child's copy leaves the parent's lock."""
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)  # exec'd children inherit nothing (descriptors are CLOEXEC)


class RunDirError(ConfigError):
    """The run dir cannot be used (not a folder, not writable) or is in use by another job."""


def holder_info() -> dict:
    """What the lock file records about this process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def describe(holder: dict) -> str:
    """``host H, pid P, SLURM job J, started T`` for a recorded holder."""
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"SLURM job {holder['slurm_job_id']}")
    if holder.get("started"):
        parts.append(f"started {holder['started']}")
    return ", ".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:  # a zombie (killed, not yet reaped) holds nothing any more
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """The lock of one run dir, taken by :meth:`acquire` (rank 0) and held until :meth:`release` or exit."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create the run dir if needed and lock it; RunDirError naming the holder or the problem."""
        key = str(self.run_dir.resolve())
        other = _HELD.get(key)
        if other is not None and other.held:
            return  # this process holds it already (an earlier run of the same process)
        self._open_run_dir()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._unusable(e) from None
        try:
            self._lock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD[key] = self

    def release(self) -> None:
        """Unlock (the file stays: deleting it would race with a job that has just opened it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(str(self.run_dir.resolve()), None)
        os.close(fd)  # closing the only descriptor of the open file drops the flock

    # ------------------------------------------------------------------ internals

    def _open_run_dir(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"train.run_dir: {self.run_dir} is a file, not a folder; pass a folder for the run "
                              "(it is created if missing)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unusable(e) from None
        if not os.access(self.run_dir, os.R_OK | os.W_OK | os.X_OK):
            read_only = bool(os.statvfs(self.run_dir).f_flag & os.ST_RDONLY)
            why = "is on a read-only file system" if read_only else "is not readable and writable by this user"
            raise RunDirError(f"train.run_dir: {self.run_dir} {why}; pass a writable folder, or fix the mount / "
                              "permissions")

    def _unusable(self, e: OSError) -> RunDirError:
        why = e.strerror or str(e)
        return RunDirError(f"train.run_dir: cannot use {self.run_dir} as the run folder ({why}: {e.filename or ''}); "
                           "pass a writable folder, or fix the mount / permissions")

    def _read_holder(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            holder = json.loads(data) if data else {}
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno in _NO_FLOCK:
                self._take_without_flock(fd, e)
                return
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._unusable(e) from None
        holder = self._read_holder(fd)
        if self._same_slurm_job(holder):
            log.warning("%s is locked by an earlier instance of this SLURM job (%s), which SLURM has ended (its "
                        "node's lock not yet released by the file server); continuing", self.path, describe(holder))
            return
        raise RunDirError(f"train.run_dir: {self.run_dir} is in use by another job ({describe(holder)}; lock "
                          f"{self.path}); wait for it to end or stop it, or pass another train.run_dir")

    @staticmethod
    def _same_slurm_job(holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        return bool(job) and holder.get("slurm_job_id") == job and holder.get("pid") != os.getpid()

    def _take_without_flock(self, fd: int, e: OSError) -> None:
        holder = self._read_holder(fd)
        here = socket.gethostname()
        log.warning("%s: the file system does not support flock (%s); checking the recorded holder instead",
                    self.path, e.strerror)
        if not holder or self._same_slurm_job(holder) or holder.get("pid") == os.getpid():
            return
        if holder.get("host") == here:
            if isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]):
                raise RunDirError(f"train.run_dir: {self.run_dir} is in use by another job ({describe(holder)}); "
                                  "wait for it to end or stop it, or pass another train.run_dir")
            return  # stale: that process is gone
        raise RunDirError(f"train.run_dir: {self.run_dir} may be in use by another job ({describe(holder)}; this "
                          f"file system has no flock, so it cannot be checked from {here}); if that job is gone, "
                          f"delete {self.path}, else pass another train.run_dir")
