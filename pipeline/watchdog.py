"""Where a rank was when it stopped making progress: every thread's stack, printed before the job ends.

A rank that stops making progress (a loader worker that never delivers, a file system that does not answer, a
peer that stopped answering a collective) is ended from outside: its peers' collectives time out after
``train.collective_timeout_s`` and the launcher (srun ``--kill-on-bad-exit``, torchrun) kills what is left. The
peers' one-line error says which rank stopped answering; what that rank was doing dies with it. The watchdog
keeps it: when a rank has not reported progress (:meth:`Watchdog.beat`: every optimizer step, evaluation batch
and checkpoint save) for ``after_s`` seconds, it prints one header line (rank, host, pid, the last progress and
how long ago, the pids of this rank's loader workers and their fork server, to inspect with ``py-spy dump --pid
PID``) and the stacks of every thread of the process to stderr, once per stall. It only reports: the run goes on
(a slow step that recovers loses nothing), and the collective timeout decides what ends it.

The trainer arms it with ``after_s`` = 3/4 of the collective timeout, so that a stuck rank reports before its
peers give up on it and the launcher kills it. The watchdog is a daemon thread that sleeps between checks; a beat
is two attribute writes.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional, TextIO


def child_pids(pid: Optional[int] = None) -> list[int]:
    """The descendants of ``pid`` (default: this process): its loader workers and their fork server; [] where
    /proc lacks the children lists."""
    todo, found = [os.getpid() if pid is None else pid], set()
    while todo:
        for task in _tasks(todo.pop()):
            try:
                kids = {int(p) for p in (task / "children").read_text().split()} - found
            except OSError:  # the process or thread ended meanwhile
                continue
            found |= kids
            todo += kids
    return sorted(found)


def _tasks(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


class Watchdog:
    """Prints this process's stacks when :meth:`beat` has not been called for ``after_s`` seconds (see the
    module). ``with Watchdog(...) as dog: ... dog.beat("step 12")``; :meth:`close` stops it."""

    def __init__(self, after_s: float, *, rank: int, file: Optional[TextIO] = None, check_s: Optional[float] = None):
        if after_s <= 0:
            raise ValueError(f"the watchdog's interval must be positive, got {after_s}")
        self.after_s = float(after_s)
        self.rank = rank
        self.file = file
        self.reports = 0
        self._check_s = check_s if check_s is not None else min(5.0, self.after_s / 4)
        self._last = time.monotonic()
        self._where = "start"
        self._reported_at: Optional[float] = None  # the beat time of the stall already reported
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="effnetv2-watchdog", daemon=True)
        self._thread.start()

    def beat(self, where: str) -> None:
        """Progress: ``where`` names it in a later report (e.g. "step 12", "evaluation batch 3")."""
        self._where = where
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._check_s):
            last = self._last
            idle = time.monotonic() - last
            if idle >= self.after_s and self._reported_at != last:
                self._reported_at = last
                self._report(idle)

    def _report(self, idle: float) -> None:
        out = self.file or sys.stderr
        workers = child_pids()
        who = (f"child processes (loader workers, their fork server) {', '.join(map(str, workers))} (py-spy dump "
               "--pid PID shows theirs)" if workers else "no child processes")
        idle_s = f"{idle:.0f}" if idle >= 10 else f"{idle:.1f}"
        try:
            out.write(f"\nwatchdog: rank {self.rank} (host {socket.gethostname()}, pid {os.getpid()}) has made no "
                      f"progress for {idle_s} s since {self._where}; {who}. The stacks of its threads follow.\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            out.flush()
            self.reports += 1
        except (OSError, ValueError):  # stderr closed or not a real file: nothing to report to
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._check_s + 1)

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
