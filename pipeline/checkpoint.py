"""Step checkpoints that count only when complete, keep-last-k, auto-resume, and the state parts they hold.

Layout of a run::

    RUN_DIR/checkpoints/step-00000500/      one folder per checkpoint (zero-padded: names sort by step)
        <files of the backend's save>       (DeepSpeed save_checkpoint / accelerate save_state into this folder)
        rank-00000.pt, rank-00001.pt ...    per rank: RNG states and the registered parts (loader position, EMA ...)
        COMPLETE.json                       written LAST by rank 0, after every rank has finished

A folder without ``COMPLETE.json`` is an interrupted save: it is never resumed from and is cleaned up by a
later save. ``COMPLETE.json`` records the size of every file of the folder; before resuming, rank 0 checks them
(:func:`checkpoint_problem`), so a rank file or DeepSpeed shard deleted or truncated after the save is found
before anything is loaded: auto-resume then warns, naming the file, and takes the newest intact checkpoint.
Sizes catch what storage and people actually do to finished files (lost or cut-off files, a copy that stopped
early); a flipped bit inside a file is left to the readers' own checks (torch's zip CRCs). A save that fails
because the disk is full raises :class:`CheckpointError`, one line naming the folder, and leaves the previous
checkpoint as it was (pruning happens only after a save is complete).

This module knows nothing of the backend: its files are written and read by callables the trainer passes in.
Everything else a resume needs is a registered part with ``state_dict`` / ``load_state_dict``::

    ckpt = CheckpointManager(cfg.checkpoint, run_dir, rank=rank, world_size=world, settings=frozen_settings(cfg))
    ckpt.register("trainer", counters, scope="main")
    ckpt.register("loader", loader)
    point = ckpt.resolve_resume()                       # None: start from scratch
    if point is not None:
        ckpt.restore(point, backend.load)               # backend files, parts, then this rank's RNG states
    ...
    if stop or ckpt.should_save(step, stage_boundary=..., final=...):
        ckpt.save(step, backend.save)
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Union

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import CheckpointConfig, ConfigError, resume_refusal, settings_diff, settings_hash

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
FORMAT_VERSION = 2
"""Rank files: 2 keeps every registered part under ``parts``; 1 (still read) had them at the top level."""
_TAG_RE = re.compile(r"^step-(\d+)$")
_FULL_BELOW = 1 << 20
"""Bytes free under which a failed write is reported as a full disk (torch.save's C++ writer drops the errno)."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be written or used (disk full, damaged files); the message names the folder and what to
    do. A ConfigError, so that the entry points print it as one line and exit 2."""

SaveFn = Callable[[Path, str], None]
"""``save_fn(directory, tag)`` writes the model / optimizer state into ``directory / tag`` on every rank."""
LoadFn = Callable[["ResumePoint"], None]
"""``load_fn(point)`` loads the model / optimizer state of a resume point on every rank (the backend's load)."""


class Stateful(Protocol):
    """What the checkpoint manager saves and restores: the trainer counters, the loader, the EMA ..."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


Scope = Literal["rank", "main"]


@dataclass(frozen=True)
class Part:
    """A registered piece of state. ``scope`` 'rank': every rank saves and restores its own (a loader
    position, its BN statistics); on a resume with another world size the part's ``load_resharded(states)``
    gets every saved rank's state in rank order, and a part without that method keeps what it has (the model
    file's values). 'main': rank 0's state is saved and every rank restores it (the trainer counters, an
    unsharded EMA). ``state_dict()`` is called on every rank either way: it may be a collective."""

    name: str
    obj: Stateful
    scope: Scope = "rank"


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
        log.warning("ignoring checkpoint %s: %s is unreadable (%s)", path, Path(path) / MARKER, e)
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
    def world_size_changed(self) -> bool:
        """The checkpoint was written by another number of ranks: per-rank states do not map one to one (the
        backend decides what that means for its model files: ZeRO 1-3 re-shard through a universal checkpoint)."""
        return self.saved_world_size != self.world_size

    @property
    def message(self) -> str:
        s, n = self.saved_world_size, self.world_size
        base = f"resuming from {self.path} (step {self.step})"
        if not self.world_size_changed:
            return base
        return (f"{base}: a {s}-rank checkpoint on {n} rank{'s' if n != 1 else ''} (per-rank RNG and loader "
                "states are re-derived from the step and the samples seen)")


class CheckpointManager:
    """Writes, finds, prunes and resumes step checkpoints of one run (one instance per rank).

    Args:
        cfg: the ``checkpoint`` config section (every_steps, keep_last, resume).
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        rank, world_size: this process's place in the job.
        settings: the settings that must not change on resume (``pipeline.config.frozen_settings(cfg)``);
            stored in every marker and compared on resume.

    What a checkpoint holds besides the backend's files is registered (:meth:`register`): each part's
    ``state_dict()`` goes into the rank files under its name, and :meth:`restore` gives it back. Collectives
    (barriers, rank 0's resume decision) go over :func:`pipeline.distributed.control_group`.
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Union[str, os.PathLike], *, rank: int, world_size: int,
                 settings: Optional[Mapping[str, Any]] = None, barrier: Optional[Callable[[], None]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world size {world_size}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dir = checkpoints_dir(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.settings = dict(settings) if settings is not None else None
        self.parts: dict[str, Part] = {}
        self.last_saved_step: Optional[int] = None
        self._barrier_fn = barrier
        self._ranks: Optional[list[dict]] = None

    def register(self, name: str, obj: Stateful, *, scope: Scope = "rank") -> None:
        """Save ``obj`` with every checkpoint and restore it on resume (see :class:`Part`); order is kept."""
        if name in self.parts:
            raise ValueError(f"checkpoint part '{name}' is registered twice")
        self.parts[name] = Part(name, obj, scope)

    def _barrier(self) -> None:
        if self._barrier_fn is not None:
            self._barrier_fn()
        else:
            distributed.barrier(distributed.control_group())

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

    def save(self, step: int, save_fn: Optional[SaveFn], *, extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write checkpoint ``step`` on every rank; returns its folder once it is complete everywhere.

        Order: every registered part's state (on every rank: a part may gather); rank 0 clears a leftover folder
        of the same tag; barrier; every rank runs ``save_fn(dir, tag)`` (DeepSpeed writes into ``dir/tag``) and
        writes its rank file (RNG states + the parts); barrier; rank 0 writes COMPLETE.json (tmp +
        os.replace) and prunes; barrier, so that no rank moves on (or exits on preemption) before the
        checkpoint counts. ``extra`` (rank 0's) goes into the marker. Every rank must call this with the
        same step. A write that fails on a full disk (on this rank, or on a peer whose exit breaks a barrier here)
        raises CheckpointError; the folder stays incomplete and nothing older is pruned.
        """
        tag = step_tag(step)
        path = self.dir / tag
        # The generators as they are after `step`, before anything in the save could draw from them.
        rng = capture_rng_state()
        parts = {}
        for part in self.parts.values():
            state = part.obj.state_dict()
            if part.scope == "rank" or self.rank == 0:
                parts[part.name] = state
        payload = {"format": FORMAT_VERSION, "step": step, "rank": self.rank, "world_size": self.world_size,
                   "rng": rng, "parts": parts}
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._clear_for(step)
        self._barrier()

        try:
            self._write(step, payload, save_fn, extra)
        except (OSError, RuntimeError) as e:  # a full disk here, or a peer that stopped on one (a barrier fails)
            self._raise_if_disk_full(path, e)
            raise
        self.last_saved_step = step
        return path

    def ranks_info(self) -> list[dict]:
        """Where every rank runs (host, local rank, rendezvous), gathered once over the control group: the marker
        records it, so a checkpoint says which hosts wrote it."""
        if self._ranks is None:
            mine: dict[str, Any] = {"rank": self.rank, "host": socket.gethostname()}
            try:
                env = distributed.detect_env()
                mine.update(local_rank=env.local_rank, local_world_size=env.local_world_size,
                            master_addr=env.master_addr)
            except distributed.DistributedError:  # launcher variables this process cannot read: the host is enough
                pass
            group = distributed.control_group() if self._barrier_fn is None else None
            if group is not None and self.world_size > 1:
                gathered: list = [None] * self.world_size
                torch.distributed.all_gather_object(gathered, mine, group=group)
                self._ranks = gathered
            else:
                self._ranks = [mine]
        return self._ranks

    def _write(self, step: int, payload: dict, save_fn: Optional[SaveFn], extra: Optional[Mapping[str, Any]]) -> None:
        """The part of :meth:`save` that writes: the backend's files and this rank's file, then the marker."""
        tag = step_tag(step)
        path = self.dir / tag
        ranks = self.ranks_info()  # every rank, before anything can fail on one of them only
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
                "parts": list(self.parts),
                "settings_hash": None if self.settings is None else settings_hash(self.settings),
                "settings": self.settings,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "ranks": ranks,
                "files": file_sizes(path),
            })
            _atomic_write_json(path / MARKER, marker)
            self.prune(keep_step=step)
            log.info("checkpoint %s complete (%d rank%s)", path, self.world_size, "s" if self.world_size > 1 else "")
        self._barrier()

    def _raise_if_disk_full(self, path: Path, e: BaseException) -> None:
        """A write of checkpoint ``path`` failed: a full disk (or quota) becomes one CheckpointError line naming
        the folder and the checkpoint that is still intact; anything else is left to propagate as it is."""
        code = getattr(e, "errno", None)
        try:
            free: Optional[int] = shutil.disk_usage(self.dir).free
        except OSError:
            free = None
        if code not in (errno.ENOSPC, errno.EDQUOT) and (free is None or free >= _FULL_BELOW):
            return
        why = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        step = tag_step(path.name)
        older = [c for c in list_checkpoints(self.run_dir) if step is None or c.step < step]
        kept = (f"the newest complete checkpoint, {older[-1].path}, is intact" if older
                else "there is no earlier complete checkpoint")
        raise CheckpointError(f"checkpoint {path}: {why} while saving it (rank {self.rank}, "
                              f"{'?' if free is None else free} bytes free); {kept}. Free space (this incomplete "
                              "folder can go) and rerun the same command to resume") from None

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
        found = distributed.on_rank0(self._find_resume)
        choice = str(found) if found is not None else None
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
        if self.dir.exists() and not self.dir.is_dir():  # else the first save would fail, an hour in
            raise CheckpointError(f"{self.dir} is a file, where this run keeps its checkpoints; move it away or pass "
                                  "another train.run_dir")
        mode = self.cfg.resume
        if mode == "none":
            return None
        if mode == "auto":
            return self._newest_intact()
        path = Path(mode).expanduser()
        if not path.exists():
            raise ConfigError(f"checkpoint.resume: {path} does not exist; pass a checkpoint folder "
                              f"(RUN_DIR/{CHECKPOINTS}/step-NNNNNNNN), 'auto' or 'none'")
        if not path.is_dir():
            raise ConfigError(f"checkpoint.resume: {path} is a file; pass a checkpoint folder "
                              f"(RUN_DIR/{CHECKPOINTS}/step-NNNNNNNN), 'auto' or 'none'")
        marker = read_marker(path)
        if marker is not None:
            problem = checkpoint_problem(path, marker)
            if problem is not None:
                older = [c.path for c in _intact(list_checkpoints(path.parent.parent)) if c.path != path]
                hint = f"; the newest intact one there is {older[-1]}" if older else ""
                raise CheckpointError(f"checkpoint.resume: {path} is damaged: {problem}{hint}. Pass an intact "
                                      "checkpoint folder or checkpoint.resume=auto")
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

    def _newest_intact(self) -> Optional[Path]:
        """Auto-resume's choice: the newest complete checkpoint whose files are as its marker recorded them;
        every damaged newer one is named in a warning. CheckpointError when every complete one is damaged
        (starting over silently would throw the run away)."""
        done = list_checkpoints(self.run_dir)
        damaged = []
        for c in reversed(done):
            problem = checkpoint_problem(c.path, read_marker(c.path) or {})
            if problem is None:
                if damaged:
                    log.warning("resuming from %s instead (the newest intact checkpoint)", c.path)
                return c.path
            log.warning("checkpoint %s is damaged, not resuming from it: %s", c.path, problem)
            damaged.append(problem)
        if damaged:
            raise CheckpointError(f"checkpoint.resume=auto: every complete checkpoint in {self.dir} is damaged (the "
                                  f"newest: {damaged[0]}); restore the files, or move the checkpoints away and start "
                                  "over (checkpoint.resume=none)")
        return None

    def restore(self, point: ResumePoint, load_fn: Optional[LoadFn] = None) -> None:
        """Load a resume point on every rank: the backend's files (``load_fn``), then every registered part,
        then (same world size) this rank's RNG states, last, so that nothing in the loading draws from them.

        Rank-scoped parts get this rank's saved state; after a world-size change, every saved rank's state
        through ``load_resharded`` (parts without it keep what they have). Main-scoped parts get rank 0's.
        A part missing from the checkpoint is refused with the file and the part named."""
        if load_fn is not None:
            load_fn(point)
        same = not point.world_size_changed
        own = load_rank_file(point.path, self.rank) if same else None
        mine = parts_of(own) if own is not None else None
        main = None
        if any(p.scope == "main" for p in self.parts.values()):
            main = mine if (same and self.rank == 0) else parts_of(load_rank_file(point.path, 0))
        every = None
        for part in self.parts.values():
            if part.scope == "main":
                part.obj.load_state_dict(_part(main, part.name, point.path, 0))
            elif same:
                part.obj.load_state_dict(_part(mine, part.name, point.path, self.rank))
            elif hasattr(part.obj, "load_resharded"):
                if every is None:  # read once, only when some part needs them
                    every = [parts_of(load_rank_file(point.path, r)) for r in range(point.saved_world_size)]
                part.obj.load_resharded([_part(states, part.name, point.path, r) for r, states in enumerate(every)])
        if own is not None:
            restore_rng_state(own["rng"])


def parts_of(payload: dict) -> dict:
    """The registered parts of a rank file (format 2: under ``parts``; format 1: at the top level)."""
    return payload["parts"] if int(payload.get("format", 1)) >= 2 else payload


def _part(states: Mapping[str, Any], name: str, ckpt: Path, rank: int) -> Any:
    if name not in states:
        raise ConfigError(f"checkpoint {ckpt}: {rank_file(ckpt, rank).name} holds no '{name}' state (it was "
                          f"saved without it, e.g. with ema.enabled=false); resume with the settings it was saved "
                          "with, or start a new run (checkpoint.resume=none)")
    return states[name]


def file_sizes(path: Path) -> dict[str, int]:
    """Every file of a checkpoint folder (relative path -> bytes), except the marker and temporary files."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MARKER and not f.name.startswith("."):
            out[f.relative_to(path).as_posix()] = f.stat().st_size
    return out


def checkpoint_problem(path: Union[str, os.PathLike], marker: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with the files of a complete checkpoint, or None: a rank file of its world size missing,
    or a file recorded in the marker missing or of another size. Stats only, nothing is read."""
    path = Path(path)
    world = int(marker.get("world_size", 1))
    expected: dict[str, Optional[int]] = {rank_file(path, r).name: None for r in range(world)}
    recorded = marker.get("files")
    if isinstance(recorded, dict):  # markers of older versions record no files: their rank files are checked
        expected.update(recorded)
    for name, size in expected.items():
        file = path / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            return f"{file} is missing"
        except OSError as e:
            return f"{file} cannot be read ({e.strerror})"
        if size is not None and actual != size:
            return f"{file} has {actual} bytes where {MARKER} recorded {size} (truncated or overwritten)"
    return None


def _intact(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    return [c for c in checkpoints if checkpoint_problem(c.path, read_marker(c.path) or {}) is None]


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
