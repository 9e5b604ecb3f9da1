"""How the loader's worker processes start (``data.worker_start``).

``forkserver`` (the default): workers are forked from a small server process, not from the training process.
By the time a training process starts workers it has other threads (Gloo's, the rendezvous store's, the
TensorBoard writer, the progress-bar monitor, the watchdog); ``fork`` copies its memory with whatever locks those
threads held at that instant (C library, allocator, I/O, Python objects), and a worker that needs one of them
waits forever: a loader that never delivers, which the rank's peers see as a collective timeout. Python 3.12
warns about forking a multi-threaded process for this reason and 3.14 makes forkserver its default. The server
is started once per training process, from a fresh interpreter that loads torch, the readers and the entry
module (``python -m pipeline.pretrain``) and nothing else, so each worker start afterwards is a fork of that
single-threaded process plus the readers' few kilobytes of pickled state (shard lists, positions, transform
settings). Code that builds loaders must follow the usual rule of non-fork start methods: a script's top level
runs under ``if __name__ == "__main__":``.

``fork`` is the classic way (no server process; workers inherit every module state of the training process);
``spawn`` starts every worker as a fresh interpreter (slow: each stage change and epoch restarts the workers).

Signals: SLURM signals every process of a job step (``scancel --signal=USR1``, the ``--signal`` warning before the
time limit, SIGTERM on preemption). The training process handles them (pipeline.preemption) and stops at a
checkpoint; the processes under it must not die of them: a worker (the loader would fail the step being saved),
the fork server, or multiprocessing's resource tracker (which would leave the workers' semaphores behind). Both
servers are started with SIGUSR1, SIGUSR2 and SIGTERM blocked, a mask that exec and fork keep: none of them, and
no worker, ever receives those three (forked workers instead inherit the trainer's handlers). A worker still ends
with its training process: the loader stops it, and one whose parent is gone exits by itself.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing import context, forkserver, reduction, resource_tracker
from multiprocessing.context import BaseContext
from typing import Any, Optional

METHODS = ("forkserver", "fork", "spawn")
JOB_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def _preload() -> list[str]:
    """What the server loads before its first fork: torch and the readers' modules, then the entry module
    (``python -m pipeline.pretrain``), which every worker runs again as ``__mp_main__`` (cheap once its imports
    are loaded)."""
    names = ["pipeline.data._forkserver"]
    if "datasets" in sys.modules:  # a datasets folder is read (imported lazily; ~0.7 s in every worker otherwise)
        names.append("datasets")
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    main = getattr(spec, "name", None)
    if main and main != "__main__" and not main.endswith(".__main__"):
        names.append(main)
    return names


def worker_context(method: str) -> BaseContext:
    """The multiprocessing context for a DataLoader's workers (``multiprocessing_context=``)."""
    if method not in METHODS:
        raise ValueError(f"data.worker_start: '{method}' is not one of {', '.join(METHODS)}")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_preload())  # read when the server starts; it stays for the process
        _start_servers()
    return ctx


def _start_servers() -> None:
    """The resource tracker and the fork server, each started once per process, with JOB_SIGNALS blocked."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)  # this thread's mask, inherited by both
    try:
        resource_tracker.ensure_running()  # (it ignores SIGTERM itself, and unblocks it here when it starts)
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_options(method: str) -> dict:
    """A DataLoader's keyword arguments for workers started by ``method``: the context and, for workers not forked
    from the training process, a :class:`ParentState` as ``worker_init_fn``."""
    return {"multiprocessing_context": worker_context(method),
            "worker_init_fn": ParentState() if method != "fork" else None}


def prestart(method: str) -> None:
    """Start the fork server now (it loads its modules while the caller goes on), not at the first batch."""
    if method == "forkserver":
        worker_context(method)


class ParentState:
    """What a worker forked from its training process would share with it, carried to one that was not: the
    current stdout / stderr and environment.

    A forked worker writes (warnings about unreadable shards, ...) to the descriptors its training process has at
    that moment and sees its environment as it is then (credentials for object storage set by the program, ...);
    one from the fork server would have those of the moment the server started. It is the DataLoader's
    ``worker_init_fn`` (:func:`worker_options`): pickled for a new worker process it sends duplicates of
    descriptors 1 and 2 and a copy of ``os.environ`` along, and :meth:`install` (the call, in the worker) puts
    them in place. Not pickled for a new process, it does nothing.
    """

    def __init__(self) -> None:
        self._fds: Optional[tuple[Any, Any]] = None
        self._env: Optional[dict[str, str]] = None

    def __getstate__(self) -> dict:
        if context.get_spawning_popen() is None:  # not pickled for a new process
            return {"fds": None, "env": None}
        return {"fds": (reduction.DupFd(1), reduction.DupFd(2)), "env": dict(os.environ)}

    def __setstate__(self, state: dict) -> None:
        self._fds, self._env = state["fds"], state["env"]

    def __call__(self, worker_id: int) -> None:
        self.install()

    def install(self) -> None:
        fds, env, self._fds, self._env = self._fds, self._env, None, None
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        if fds is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        for target, carried in zip((1, 2), fds):
            fd = carried.detach()
            os.dup2(fd, target)
            os.close(fd)
