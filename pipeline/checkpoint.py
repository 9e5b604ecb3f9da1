"""Step checkpoints that count only when complete, keep-last-k, auto-resume, RNG state, and preemption on SLURM.

Layout of a run::

    RUN_DIR/checkpoints/step-00000500/      one folder per checkpoint (zero-padded: names sort by step)
        <files of the caller's save function> (DeepSpeed save_checkpoint(RUN_DIR/checkpoints, "step-00000500"))
        rank-00000.pt, rank-00001.pt ...    per-rank state: RNG states, loader position, sharded EMA ...
        COMPLETE.json                       written LAST by rank 0, after every rank has finished

A folder without ``COMPLETE.json`` is an interrupted save: it is never resumed from and is cleaned up by a
later save. This module is framework-agnostic: the model / optimizer state is written by a callable the
trainer passes in (``engine.save``); collectives default to ``torch.distributed`` when it is initialised.

Typical use in the trainer::

    preempt = PreemptionHandler.from_config(cfg.checkpoint, rank=rank)   # first: a signal during start-up
    ckpt = CheckpointManager(cfg.checkpoint, run_dir, rank=rank, world_size=world, settings=frozen_settings(cfg))
    point = ckpt.resolve_resume()                       # None: start from scratch
    if point is not None:
        log.info(point.message)
        if point.needs_universal:                       # saved on a different number of ranks
            convert_to_universal(point.directory, point.tag, point.universal_path)
            engine.load(point.universal_path.parent, point.universal_path.name)
        else:
            engine.load(point.directory, point.tag)
        state = ckpt.load_rank_state(point)             # restores this rank's RNG; None after a world change
    for step in range(start, total):
        ...one optimizer step...
        stop = preempt.should_stop()
        if stop or ckpt.should_save(step + 1, stage_boundary=..., final=step + 1 == total):
            ckpt.save(step + 1, lambda d, tag: engine.save(d, tag, client_state), {"loader": loader.state_dict()})
        if stop:
            preempt.requeue()                           # rank 0, under SLURM, after SIGUSR1 only
            return                                      # every rank exits 0
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import numpy as np
import torch

from pipeline.config import CheckpointConfig, ConfigError, resume_refusal, settings_diff, settings_hash

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^step-(\d+)$")

SaveFn = Callable[[Path, str], None]
"""``save_fn(directory, tag)`` writes the model / optimizer state into ``directory / tag`` on every rank."""


# --------------------------------------------------------------------------------------------------- naming


def step_tag(step: int) -> str:
    """``500 -> 'step-00000500'``: eight digits, so a plain sort of the folder names is a sort by step."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


def tag_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder name, or None for anything else (``latest``, ``step-5_universal`` ...)."""
    m = _TAG_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoints_dir(run_dir: Union[str, os.PathLike]) -> Path:
    return Path(run_dir) / CHECKPOINTS


def read_marker(path: Union[str, os.PathLike]) -> Optional[dict]:
    """The completion marker of a checkpoint folder, or None when it is missing or unreadable (= incomplete)."""
    try:
        with open(Path(path) / MARKER) as f:
            marker = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # a truncated marker cannot come from os.replace, but disks fail
        log.warning("ignoring checkpoint %s: unreadable %s (%s)", path, MARKER, e)
        return None
    return marker if isinstance(marker, dict) and "step" in marker else None


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    complete: bool


def list_checkpoints(run_dir: Union[str, os.PathLike], *, include_incomplete: bool = False) -> list[CheckpointInfo]:
    """Checkpoint folders of a run, oldest first; only complete ones unless asked."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        step = tag_step(entry.name)
        if step is None or not entry.is_dir():
            continue
        complete = (entry / MARKER).is_file() and read_marker(entry) is not None
        if complete or include_incomplete:
            out.append(CheckpointInfo(step, entry, complete))
    return sorted(out, key=lambda c: c.step)


def latest(run_dir: Union[str, os.PathLike]) -> Optional[int]:
    """The newest complete checkpoint's step in ``run_dir``, or None when there is none."""
    done = list_checkpoints(run_dir)
    return done[-1].step if done else None


# --------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """This process's RNG states: python ``random``, numpy's global generator, torch CPU and the current CUDA
    device. Plain lists / tensors only, so the file loads without unpickling numpy objects."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    # One process drives one GPU: the current device's generator is the one this rank uses. Saving only it
    # keeps the state independent of how many devices the process can see.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; a CUDA state is restored only where CUDA is available."""
    py = state["python"]
    # JSON-like round trips turn the inner tuple into a list; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            log.warning("the checkpoint holds a CUDA RNG state but CUDA is not available here; not restored")


# --------------------------------------------------------------------------------------------------- collectives


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _default_barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def _default_broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity when not distributed)."""
    if not _dist_ready():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------- manager


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues from, and what the trainer has to do for it."""

    path: Path
    """The checkpoint folder, RUN_DIR/checkpoints/step-00000500."""
    step: int
    marker: dict = field(repr=False)
    saved_world_size: int
    world_size: int

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def directory(self) -> Path:
        """The folder DeepSpeed's ``load_checkpoint(directory, tag)`` wants."""
        return self.path.parent

    @property
    def universal_path(self) -> Path:
        """Where a universal (world-size independent) copy of this checkpoint belongs; pruned with it."""
        return self.path.parent / f"{self.tag}_universal"

    @property
    def needs_universal(self) -> bool:
        """True when the checkpoint was written by a different number of ranks: ZeRO shards and per-rank
        states do not map one to one, so the engine must load a universal checkpoint instead."""
        return self.saved_world_size != self.world_size

    @property
    def message(self) -> str:
        s, n = self.saved_world_size, self.world_size
        base = f"resuming from {self.path} (step {self.step})"
        if not self.needs_universal:
            return base
        return (f"{base}: resuming a {s}-rank checkpoint on {n} rank{'s' if n != 1 else ''}: converting to a "
                f"universal checkpoint in {self.universal_path} (per-rank RNG and loader states are re-derived "
                "from the step and the samples seen)")


class CheckpointManager:
    """Writes, finds, prunes and resumes step checkpoints of one run (one instance per rank).

    Args:
        cfg: the ``checkpoint`` config section (every_steps, keep_last, resume).
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        rank, world_size: this process's place in the job.
        settings: the settings that must not change on resume (``pipeline.config.frozen_settings(cfg)``);
            stored in every marker and compared on resume.
        barrier, broadcast: collectives; default to ``torch.distributed`` when it is initialised, else no-ops.
            ``broadcast(obj)`` returns rank 0's ``obj`` on every rank.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Union[str, os.PathLike], *, rank: int, world_size: int,
                 settings: Optional[Mapping[str, Any]] = None, barrier: Optional[Callable[[], None]] = None,
                 broadcast: Optional[Callable[[Any], Any]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world size {world_size}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = checkpoints_dir(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.settings = dict(settings) if settings is not None else None
        self._barrier = barrier or _default_barrier
        self._broadcast = broadcast or _default_broadcast
        self.last_saved_step: Optional[int] = None

    # ------------------------------------------------------------------ paths

    def path(self, step: int) -> Path:
        return self.dir / step_tag(step)

    def rank_file(self, step_or_path: Union[int, Path], rank: Optional[int] = None) -> Path:
        base = self.path(step_or_path) if isinstance(step_or_path, int) else Path(step_or_path)
        return rank_file(base, self.rank if rank is None else rank)

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int, *, stage_boundary: bool = False, final: bool = False) -> bool:
        """Whether ``step`` (optimizer steps done) is a checkpoint step: every ``every_steps`` (0 disables the
        periodic saves), at a stage boundary, at the end; never twice for the same step."""
        if step == self.last_saved_step:
            return False
        every = self.cfg.every_steps
        return final or stage_boundary or (every > 0 and step > 0 and step % every == 0)

    def save(self, step: int, save_fn: Optional[SaveFn], rank_state: Optional[Mapping[str, Any]] = None, *,
             extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write checkpoint ``step`` on every rank; returns its folder once it is complete everywhere.

        Order: rank 0 clears a leftover folder of the same tag; barrier; every rank runs ``save_fn(dir, tag)``
        (DeepSpeed writes into ``dir/tag``) and writes its rank file (RNG states + ``rank_state``); barrier;
        rank 0 writes COMPLETE.json (tmp + os.replace) and prunes; barrier, so that no rank moves on (or
        exits on preemption) before the checkpoint counts. ``extra`` (rank 0's) goes into the marker.
        Every rank must call this with the same step.
        """
        tag = step_tag(step)
        path = self.dir / tag
        # The generators as they are after `step`, before anything in the save could draw from them.
        payload = {"format": FORMAT_VERSION, "step": step, "rank": self.rank, "world_size": self.world_size,
                   "rng": capture_rng_state()}
        payload.update(rank_state or {})
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._clear_for(step)
        self._barrier()

        if save_fn is not None:
            save_fn(self.dir, tag)
        path.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(payload, self.rank_file(path))
        self._barrier()

        if self.rank == 0:
            marker = dict(extra or {})  # the caller's facts (samples seen, stage ...); ours below win
            marker.update({
                "format": FORMAT_VERSION,
                "step": step,
                "tag": tag,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "unix_time": time.time(),
                "world_size": self.world_size,
                "settings_hash": None if self.settings is None else settings_hash(self.settings),
                "settings": self.settings,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            })
            _atomic_write_json(path / MARKER, marker)
            self.prune(keep_step=step)
            log.info("checkpoint %s complete (%d rank%s)", path, self.world_size, "s" if self.world_size > 1 else "")
        self._barrier()
        self.last_saved_step = step
        return path

    def _clear_for(self, step: int) -> None:
        """Rank 0, before anyone writes ``step``: make room for it and keep auto-resume unambiguous."""
        target = self.path(step)
        if target.exists() and read_marker(target) is None:
            # An interrupted save of the same step: its stale files (e.g. another world size's shards) must
            # not mix with the new ones.
            log.warning("removing the incomplete checkpoint folder %s before saving step %d again", target, step)
            _remove_checkpoint(target)
        for c in list_checkpoints(self.run_dir):
            if c.step >= step:
                # A complete checkpoint at or after the step being written: the run was resumed from an older
                # checkpoint. Left in place, auto-resume would jump back to that abandoned timeline; renamed
                # rather than deleted, since it is a finished result the user may still want.
                retired = c.path.with_name(f"{c.path.name}.superseded-{int(time.time())}")
                log.warning("checkpoint %s is not older than step %d of this run (resumed from an older one); "
                            "renaming it to %s so that auto-resume ignores it", c.path, step, retired.name)
                os.replace(c.path, retired)

    def prune(self, keep_step: Optional[int] = None) -> list[Path]:
        """Rank 0: delete complete checkpoints beyond the newest ``keep_last`` (<= 0 keeps all) and incomplete
        ones older than ``keep_step``. Never touches ``keep_step`` itself or anything newer (a save in
        progress). Returns the deleted folders."""
        if self.rank != 0:
            return []
        removed = []
        all_ckpts = list_checkpoints(self.run_dir, include_incomplete=True)
        complete = [c for c in all_ckpts if c.complete and (keep_step is None or c.step <= keep_step)]
        keep = self.cfg.keep_last
        doomed = complete[:-keep] if keep > 0 else []
        if keep_step is not None:
            # Incomplete and older than the step just completed: every rank finished that save, so nobody is
            # still writing these; they are leftovers of a crash.
            doomed += [c for c in all_ckpts if not c.complete and c.step < keep_step]
        for c in doomed:
            if c.step == keep_step:
                continue
            _remove_checkpoint(c.path)
            removed.append(c.path)
        if removed:
            log.info("pruned checkpoints: %s", ", ".join(p.name for p in removed))
        return removed

    # ------------------------------------------------------------------ resuming

    def resolve_resume(self) -> Optional[ResumePoint]:
        """The checkpoint to resume from per ``checkpoint.resume``, the same on every rank, or None.

        ``auto``: the newest complete checkpoint of the run (None if there is none); ``none``: None; else a
        checkpoint folder, which must exist and be complete. Rank 0 decides and broadcasts its choice, so
        that ranks on other nodes with a stale view of a network filesystem cannot pick another one.
        Raises ConfigError for a missing / incomplete explicit path and for changed frozen settings.
        """
        choice: Optional[str] = None
        error: Optional[tuple[bool, str]] = None
        failure: Optional[BaseException] = None
        if self.rank == 0:
            try:
                found = self._find_resume()
                choice = str(found) if found is not None else None
            except Exception as e:  # every rank must hear about it, or the others wait in the broadcast
                failure = e
                error = (isinstance(e, ConfigError), f"{type(e).__name__}: {e}")
        choice, error = self._broadcast((choice, error))
        if failure is not None:
            raise failure
        if error is not None:
            is_config, msg = error
            raise ConfigError(msg.split(": ", 1)[1]) if is_config else RuntimeError(f"rank 0 failed: {msg}")
        if choice is None:
            return None
        path = Path(choice)
        marker = read_marker(path)
        if marker is None:  # opened by name, so a network filesystem revalidates; should not happen
            raise ConfigError(f"checkpoint.resume: rank {self.rank} cannot read {path / MARKER} that rank 0 "
                              "found; is the run dir on a filesystem every node shares?")
        if self.settings is not None and marker.get("settings") is not None:
            changed = settings_diff(marker["settings"], self.settings)
            if changed:
                raise resume_refusal(changed, f" from {path}")
        point = ResumePoint(path=path, step=int(marker["step"]), marker=marker,
                            saved_world_size=int(marker.get("world_size", 1)), world_size=self.world_size)
        if self.rank == 0:
            log.info(point.message)
        self.last_saved_step = point.step  # saving the step we resume from would only rewrite it
        return point

    def _find_resume(self) -> Optional[Path]:
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            done = list_checkpoints(self.run_dir)
            return done[-1].path if done else None
        path = Path(mode).expanduser()
        if not path.exists():
            raise ConfigError(f"checkpoint.resume: {path} does not exist; pass a checkpoint folder "
                              f"(RUN_DIR/{CHECKPOINTS}/step-NNNNNNNN), 'auto' or 'none'")
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: {path} is a file; pass a checkpoint folder "
                              f"(RUN_DIR/{CHECKPOINTS}/step-NNNNNNNN), 'auto' or 'none'")
        if read_marker(path) is not None:
            return path
        # A run folder or its checkpoints folder: name the checkpoint the user most likely meant.
        for run in (path, path.parent):
            inner = list_checkpoints(run)
            if inner and path in (run, checkpoints_dir(run)):
                raise ConfigError(f"checkpoint.resume: {path} is a run folder, not a checkpoint; pass "
                                  f"checkpoint.resume={inner[-1].path} (its newest complete one)")
        others = list_checkpoints(path.parent.parent) if tag_step(path.name) is not None else []
        hint = f"; the newest complete one there is {others[-1].path}" if others else ""
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER}: its save was "
                          f"interrupted or it is not a checkpoint folder){hint}. Pass a complete checkpoint "
                          "folder or checkpoint.resume=auto")

    def load_rank_state(self, point: ResumePoint, *, restore_rng: bool = True) -> Optional[dict]:
        """This rank's saved state (RNG under ``'rng'``, plus what the trainer passed to :meth:`save`), with the
        RNG states restored unless ``restore_rng=False``. None when the world size changed: per-rank states of
        a different world do not belong to any one rank now (see :meth:`load_all_rank_states`)."""
        if point.needs_universal:
            return None
        state = load_rank_file(point.path, self.rank)
        if restore_rng:
            restore_rng_state(state["rng"])
        return state

    def load_all_rank_states(self, point: ResumePoint) -> list[dict]:
        """Every saved rank's state, saved rank order (e.g. to re-split the data stream on a new world size)."""
        return [load_rank_file(point.path, r) for r in range(point.saved_world_size)]


def rank_file(ckpt: Union[str, os.PathLike], rank: int) -> Path:
    """A checkpoint folder's per-rank state file (RNG, loader position, trainer state, EMA shard)."""
    return Path(ckpt) / f"rank-{rank:05d}.pt"


def load_rank_file(ckpt: Union[str, os.PathLike], rank: int) -> dict:
    """One rank's saved state from a complete checkpoint folder; ConfigError naming the folder if it is gone."""
    file = rank_file(ckpt, rank)
    if not file.is_file():
        raise ConfigError(f"checkpoint {ckpt} is marked complete but lacks {file.name}; it was damaged after "
                          "saving. Resume from another one (checkpoint.resume=<folder>) or delete this one")
    # Our own file in the user's run dir; it holds loader / EMA states the weights-only unpickler may refuse.
    return torch.load(file, map_location="cpu", weights_only=False)


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder (marker first, so that a crash midway leaves an incomplete, ignored folder)
    and its derived siblings (``step-N_universal``)."""
    try:
        (path / MARKER).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    for sibling in path.parent.glob(f"{path.name}_*"):
        shutil.rmtree(sibling, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- preemption


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
    after each optimizer step on every rank: when ``torch.distributed`` is initialised it all-reduces (MAX) a
    one-element tensor, so a signal that reached one rank stops all of them at the same step; otherwise it
    uses the local flag. Cost: one 4-byte all-reduce per check (tens of microseconds; on NCCL it also waits
    for the GPU to reach that point of the step); ``check_every`` spreads it over N steps. All ranks must
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
        self._decision = _all_reduce_max(local) if _dist_ready() else local
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


_FLAG: dict[torch.device, torch.Tensor] = {}


def _all_reduce_max(code: int) -> int:
    dist = torch.distributed
    backend = str(dist.get_backend())
    # NCCL reduces only CUDA tensors; a gloo (or mixed "cpu:gloo,cuda:nccl") group takes a CPU tensor, which
    # also avoids a device sync.
    if "gloo" in backend or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    t = _FLAG.get(device)
    if t is None:  # one buffer per device, reused: no allocation per step
        t = _FLAG[device] = torch.zeros(1, dtype=torch.int32, device=device)
    t.fill_(code)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
