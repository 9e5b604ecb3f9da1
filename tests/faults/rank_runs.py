"""Real 2-rank runs of ``python -m pipeline.pretrain`` for the training and preemption fault tests.

Each rank is started directly, as srun starts the tasks of a job step (RANK / WORLD_SIZE / MASTER_* in its
environment), not under torchrun: torchrun's agent would kill the other ranks itself when one dies, and the
tests are about what the trainer does. Each rank's output goes to its own file. The trainer's test hooks
(``pipeline.trainer.TestHooks``) hold every rank at an exact point (an evaluation, a stage change, a save ...)
until the test has signalled or killed what it wants; every wait ends on a condition or a timeout.

The runs: tiny_cpu, 12 steps of 16 images (3 stages of 4 steps: 32 / 48 / 64 px), a checkpoint every 2 steps and
at the stage boundaries (4, 8), an evaluation every 3 steps (one batch). :func:`straight` is the uninterrupted
run every interrupted one is compared with (shared by both test files through the session's temp folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

import pretrain_launch as launch
from pipeline.checkpoint import latest, list_checkpoints, rank_file, read_marker, step_tag
from pipeline.distributed import free_port

STEPS = 12
EVERY = 2
SETTINGS = [f"train.total_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0",
            "eval.every_steps=3", "eval.max_batches=1", "data.workers=0", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.image_grid=false"]
WORLD = 2


@dataclass
class Ranks:
    """The rank processes of one launch."""

    procs: list[subprocess.Popen]
    logs: list[Path]
    pause_dir: Path
    run_dir: Path

    @property
    def world(self) -> int:
        return len(self.logs)

    @property
    def all(self) -> range:
        return range(self.world)

    def out(self, rank: int = 0) -> str:
        """The rank's stdout, then its stderr."""
        return self.logs[rank].read_text(errors="replace") + self.err(rank)

    def err(self, rank: int = 0) -> str:
        return self.logs[rank].with_suffix(".err").read_text(errors="replace")

    def report(self) -> str:
        return "\n".join(f"--- rank {r}\n{self.out(r)[-4000:]}" for r in range(len(self.procs)))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def signal(self, sig: signal.Signals, ranks: Optional[Iterable[int]] = None) -> None:
        for r in self.all if ranks is None else ranks:
            os.kill(self.procs[r].pid, sig)

    def kill9(self, ranks: Optional[Iterable[int]] = None) -> None:
        """kill -9 of ranks (their whole session: loader workers too), waiting until they are gone."""
        for r in self.all if ranks is None else ranks:
            p = self.procs[r]
            for kill in (os.killpg, os.kill):
                try:
                    kill(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            p.wait(60)

    def _check_alive(self, what: str) -> None:
        ended = [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
        if ended:
            self.kill9()
            raise AssertionError(f"rank(s) ended {ended} before {what}:\n{self.report()}")

    def wait_until(self, pred, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            self._check_alive(what)
            if time.monotonic() > deadline:
                self.kill9()
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.report()}")
            time.sleep(0.02)

    def wait_paused(self, point: str, timeout: float = 180, ranks: Optional[Iterable[int]] = None) -> None:
        """Every rank (or those of ``ranks``) is held at ``point`` (see pipeline.testhooks.TestHooks)."""
        which = list(self.all if ranks is None else ranks)
        self.wait_until(lambda: all((self.pause_dir / f"{point}.rank{r}").exists() for r in which),
                        f"rank(s) {which} at the '{point}' test hook", timeout)

    def release(self, point: str) -> None:
        (self.pause_dir / f"{point}.go").touch()

    def wait(self, timeout: float = 180, ranks: Optional[Iterable[int]] = None) -> list[Optional[int]]:
        """Exit statuses of ``ranks`` (default all; every process is killed on a timeout)."""
        deadline = time.monotonic() + timeout
        codes = []
        for r in self.all if ranks is None else ranks:
            try:
                codes.append(self.procs[r].wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill9()
                raise AssertionError(f"rank {r} did not end within {timeout} s:\n{self.report()}") from None
        return codes

    def expect_exit(self, codes: list[int], timeout: float = 180) -> None:
        got = self.wait(timeout)
        assert got == codes, f"exit statuses {got}, expected {codes}:\n{self.report()}"


def start(tmp: Path, run_dir: Path, shards: Path, *extra: str, pause: Iterable[str] = (),
          pause_ranks: Iterable[int] = (), env: Optional[dict] = None, world: int = WORLD) -> Ranks:
    """The ``world`` ranks of a run of ``run_dir`` (resuming from its newest complete checkpoint, as users rerun
    a job); each records the sample keys it trains on in its launch folder (:func:`keys_by_step`). ``pause``:
    the test hooks every rank (or only ``pause_ranks``) stops at."""
    logs_dir = tmp / f"ranks-{time.monotonic_ns()}"
    logs_dir.mkdir(parents=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        rank_env = launch.env()
        rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1",
                        EFFNETV2_TEST_PAUSE=",".join(pause), EFFNETV2_TEST_PAUSE_DIR=str(logs_dir),
                        EFFNETV2_TEST_PAUSE_RANKS=",".join(map(str, pause_ranks)),
                        EFFNETV2_TEST_KEYS=str(logs_dir), **(env or {}))
        log = logs_dir / f"rank{rank}.log"
        cmd = [sys.executable, "-m", "pipeline.pretrain", "--config", launch.CONFIG, f"data.train=[{shards}]",
               f"train.run_dir={run_dir}", *SETTINGS, *extra]
        with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
            procs.append(subprocess.Popen(cmd, env=rank_env, cwd=launch.REPO, stdout=out, stderr=err,
                                          start_new_session=True))
        logs.append(log)
    return Ranks(procs, logs, logs_dir, run_dir)


def resumes(ranks: Ranks, step: Optional[int]) -> None:
    """The launch resumed from checkpoint ``step`` (None: started from scratch)."""
    if step is None:
        assert "resuming from" not in ranks.out(0), ranks.report()
    else:
        ranks.wait_until(lambda: f"step-{step:08d} (step {step})" in ranks.out(0), f"resuming from step {step}")


def error_line(ranks: Ranks, rank: int = 0) -> str:
    """The one ``error:`` line of a rank (on its stderr), which printed no traceback."""
    text = ranks.out(rank)
    lines = [line for line in ranks.err(rank).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in text, ranks.report()
    return lines[0]


@dataclass
class Chain:
    """One run dir that a test file takes through its faults in turn, its shards and the uninterrupted run."""

    run_dir: Path
    shards: Path
    straight: Path


def chain(tmp_path_factory, name: str) -> Chain:
    data = shards(tmp_path_factory)
    return Chain(tmp_path_factory.mktemp(name) / "run", data, straight(tmp_path_factory, data))


def shards(tmp_path_factory) -> Path:
    """The demo shards of both test files, written once per session."""
    out = tmp_path_factory.getbasetemp() / "training-fault-shards" / "demo"
    if not (out / "info.json").is_file():
        launch.write_demo_shards(out)
    return out


def straight(tmp_path_factory, data: Path) -> Path:
    """The uninterrupted run (once per session): every step's logged loss, complete checkpoints 2, 4, ... 12."""
    root = tmp_path_factory.getbasetemp() / "training-fault-straight"
    run_dir = root / "run"
    if latest(run_dir) != STEPS:
        ranks = start(root, run_dir, data)
        ranks.expect_exit([0, 0])
        assert [c.step for c in list_checkpoints(run_dir)] == list(range(EVERY, STEPS + 1, EVERY)), ranks.report()
    return run_dir


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def like_straight(reference: Path, run_dir: Path, upto: int = STEPS) -> None:
    """The interrupted and resumed run logged every step up to ``upto`` with the uninterrupted run's loss, bit for
    bit; and where both have a checkpoint of step ``upto``, every rank's state in it is the same (EMA weights and
    BN statistics, the rank's own BN statistics, loader position, RNG states, counters)."""
    a, b = launch.losses_by_step(reference), launch.losses_by_step(run_dir)
    assert set(range(1, upto + 1)) <= set(b), sorted(b)
    differ = [(s, a[s], b[s]) for s in range(1, upto + 1) if a[s] != b[s]]
    assert not differ, f"logged losses differ (step, uninterrupted, resumed): {differ[:4]}"
    ours, theirs = run_dir / "checkpoints" / step_tag(upto), reference / "checkpoints" / step_tag(upto)
    if read_marker(theirs) is None:
        return
    assert read_marker(ours) is not None, f"no complete checkpoint {ours}"
    for rank in range(WORLD):
        x, y = (torch.load(rank_file(c, rank), map_location="cpu", weights_only=False) for c in (ours, theirs))
        assert _same(x["parts"], y["parts"]) and _same(x["rng"], y["rng"]), f"{rank_file(ours, rank)} differs"


def keys_by_step(ranks: Ranks) -> dict[int, list[str]]:
    """The sample keys every rank of a launch trained on, by step (all ranks' micro-batches together)."""
    out: dict[int, list[str]] = {}
    for r in ranks.all:
        path = ranks.pause_dir / f"keys.rank{r}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            record = json.loads(line)
            out.setdefault(record["step"], []).extend(record["keys"])
    return out


def straight_launch(run_dir: Path) -> Ranks:
    """The finished launch of the uninterrupted run (:func:`straight`), for its logs and keys."""
    folders = sorted(run_dir.parent.glob("ranks-*"))
    assert len(folders) == 1, folders
    logs = [folders[0] / f"rank{r}.log" for r in range(WORLD)]
    return Ranks([], logs, folders[0], run_dir)


def marker_steps(run_dir: Path) -> list[int]:
    return [c.step for c in list_checkpoints(run_dir)]


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
