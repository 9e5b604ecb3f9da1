"""Preemption: signals become a stop (and a SLURM requeue) that every rank agrees on at a step boundary.

The trainer creates a :class:`PreemptionHandler` first thing (a signal during start-up is then not fatal), asks
:meth:`PreemptionHandler.should_stop` after every optimizer step, saves a checkpoint when it says so, then calls
:meth:`PreemptionHandler.requeue` and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any, Iterable, Optional, Union

from pipeline import distributed
from pipeline.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)


def _parse_signal(sig: Union[str, int, signal.Signals]) -> signal.Signals:
    if isinstance(sig, signal.Signals):
        return sig
    if isinstance(sig, int):
        return signal.Signals(sig)
    name = sig.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        s = signal.Signals[name]
    except KeyError:
        raise ConfigError(f"checkpoint.preempt_signals: '{sig}' is not a signal name; use e.g. SIGUSR1, "
                          "SIGUSR2, SIGTERM") from None
    if s in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigError(f"checkpoint.preempt_signals: {s.name} cannot be caught; use e.g. SIGUSR1 or SIGTERM")
    return s


# Signals that mean "this job is over" (scancel, Ctrl-C, SLURM ending or preempting the job): save and exit,
# but do not requeue, or a user's scancel would bring the job straight back. SLURM requeues preempted jobs
# itself when its PreemptMode says so. Any other configured signal (SIGUSR1 from --signal=USR1@180, a time
# limit warning) means "come back later": save, requeue, exit.
_FINAL_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Codes all-reduced with MAX: a requeue request from any rank wins over a plain stop.
_NONE, _STOP, _REQUEUE = 0, 1, 2


class PreemptionHandler:
    """Turns preemption signals into a decision that every rank agrees on at a step boundary.

    The signal handler only records the signal (no I/O, no save: a handler runs between two arbitrary
    bytecodes of the main thread, possibly inside a collective). :meth:`should_stop` is called by the trainer
    after each optimizer step on every rank: with a process group it all-reduces (MAX) one number over the
    control group (gloo, CPU: see :func:`pipeline.distributed.control_group`), so a signal that reached one rank
    stops all of them at the same step, and the GPU stream is never waited for; otherwise it uses the local
    flag. Cost: one 8-byte gloo all-reduce per check (tens of microseconds); ``check_every`` spreads it over
    N steps. All ranks must
    call :meth:`should_stop` equally often, as they do in a training loop.

    SLURM: ``#SBATCH --signal=USR1@180`` delivers SIGUSR1 to every task 180 s before the time limit: after
    the save, :meth:`requeue` on rank 0 puts the job back in the queue (``scontrol requeue``) and it resumes
    from the checkpoint. SIGTERM (``scancel``, preemption, the time limit itself) and SIGINT also stop the run
    with a checkpoint but do not requeue: a cancelled job stays cancelled, and SLURM requeues preempted jobs
    itself when configured to.

    Installs its handlers on construction (main thread only); :meth:`close` restores the previous ones.
    """

    def __init__(self, signals: Iterable[Union[str, int, signal.Signals]] = ("SIGUSR1", "SIGTERM"), *,
                 check_every: int = 1, rank: int = 0, requeue: bool = True):
        if check_every < 1:
            raise ConfigError(f"checkpoint.preempt_check_every: {check_every} must be at least 1")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread (Python delivers signals "
                               "only there)")
        self.signals = [_parse_signal(s) for s in signals]
        self.check_every = check_every
        self.rank = rank
        self.requeue_enabled = requeue
        self.received: Optional[signal.Signals] = None
        self._decision = _NONE
        self._calls = 0
        self._reported = False
        self._previous: dict[signal.Signals, Any] = {}
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, *, rank: int) -> "PreemptionHandler":
        return cls(cfg.preempt_signals, check_every=cfg.preempt_check_every, rank=rank, requeue=cfg.requeue)

    def _on_signal(self, signum, frame) -> None:
        # Keep the first signal: SLURM may follow USR1 with TERM, and the first says why we stop.
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def triggered(self) -> bool:
        """This rank received one of the signals (no collective)."""
        return self.received is not None

    @property
    def wants_requeue(self) -> bool:
        """The agreed stop came from a requeue signal (e.g. SIGUSR1) on at least one rank."""
        return self._decision == _REQUEUE

    def _local_code(self) -> int:
        if self.received is None:
            return _NONE
        return _STOP if self.received in _FINAL_SIGNALS else _REQUEUE

    def should_stop(self) -> bool:
        """True on every rank once any rank received a signal, decided every ``check_every``-th call."""
        if self._decision != _NONE:
            return True
        self._calls += 1
        if self._calls % self.check_every:
            return False
        local = self._local_code()
        if local and not self._reported:
            self._reported = True
            log.warning("rank %d received %s; stopping at the next step boundary after a checkpoint",
                        self.rank, self.received.name)
        self._decision = int(distributed.all_reduce_max(local, distributed.control_group()))
        if self._decision and self.rank == 0:
            if not self.wants_requeue:
                then = "exit 0 without requeueing (SIGTERM / SIGINT: cancelled, preempted or out of time)"
            elif self.requeue_enabled and _slurm_job_id():
                then = f"requeue SLURM job {_slurm_job_id()}, exit 0"
            else:
                then = "exit 0 (not under SLURM or checkpoint.requeue=false: resubmit to resume)"
            log.warning("preemption: all ranks stop now: save a checkpoint, %s", then)
        return self._decision != _NONE

    def requeue(self) -> bool:
        """Rank 0, under SLURM, with requeue enabled and a requeue signal agreed: ``scontrol requeue
        $SLURM_JOB_ID``. Returns whether the job was requeued; failures are logged, never raised (the
        checkpoint is already safe). Call it after the checkpoint is complete: SLURM stops the job at once."""
        job = _slurm_job_id()
        if self.rank != 0 or not self.requeue_enabled or not job or not self.wants_requeue:
            return False
        cmd = ["scontrol", "requeue", job]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("could not requeue SLURM job %s (%s: %s); resubmit it to resume from the checkpoint",
                      job, " ".join(cmd), e)
            return False
        if res.returncode != 0:
            log.error("could not requeue SLURM job %s (%s exited %d: %s); resubmit it to resume from the "
                      "checkpoint", job, " ".join(cmd), res.returncode, (res.stderr or res.stdout).strip())
            return False
        log.warning("requeued SLURM job %s; it resumes from the newest checkpoint when it starts again", job)
        return True

    def close(self) -> None:
        """Restore the signal handlers that were installed before this one."""
        for s, prev in self._previous.items():
            try:
                signal.signal(s, prev if prev is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not the main thread any more, or interpreter shutdown
                pass
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _slurm_job_id() -> Optional[str]:
    # An array task's own id is SLURM_JOB_ID as well; scontrol requeue accepts it.
    return os.environ.get("SLURM_JOB_ID") or None
