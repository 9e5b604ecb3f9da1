"""Preemption at awkward moments, for real: SIGUSR1 (SLURM's ``--signal=USR1@180``) and SIGTERM sent to both
ranks of a 2-rank CPU DeepSpeed run of ``python -m pipeline.pretrain`` while the trainer's test hooks hold them
at an exact point (tests/faults/rank_runs.py).

One run dir goes through every case in turn, each launch resuming from the newest complete checkpoint; after
each, every loss logged so far equals the uninterrupted run's, bit for bit, and so does every rank's state in
the checkpoints both runs have (steps 4 and 6: EMA, BN statistics, loader position, RNG states):

1. during a periodic save (step 2: the backend's files written, no rank files or COMPLETE.json yet): SIGUSR1
   twice in quick succession, then SIGTERM; the save completes, the run stops after the next step (3) with its
   checkpoint, as a requeue (SIGUSR1 came first), and exits 0; on the way out (the loop left, the summary not
   yet written) SIGUSR1 and SIGTERM again: the process still exits 0;
2. during start-up, while the checkpoint is being loaded (resume from 3): the run takes one step, saves 4, exits 0;
3. during an evaluation (step 6): the evaluation ends, the checkpoint of that step is saved, exit 0;
4. during a stage change (stage 2 -> 3 at step 9, before the loader switches): one step of the new stage, its
   checkpoint (9), exit 0.

And, on a copy of the uninterrupted run cut back to its step-6 checkpoint, a resume on 1 rank (a world-size
change: DeepSpeed's universal conversion runs first, in a child process) preempted while the conversion runs, with
the signal sent to every process of the job step as SLURM does (the converter too): the conversion completes, the
run takes one step, saves it and exits 0; the rerun continues, and no sample is trained on twice.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import rank_runs as rr

from pipeline.checkpoint import MARKER, latest, list_checkpoints, step_tag
from pipeline.engine import is_universal_checkpoint


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> rr.Chain:
    return rr.chain(tmp_path_factory, "preemption_chain")


def preempted_at(ranks: rr.Ranks, step: int, chain: rr.Chain) -> None:
    """Both ranks exited 0 after saving checkpoint ``step`` for the preemption; the run so far is the
    uninterrupted one."""
    ranks.expect_exit([0, 0])
    assert f"preemption signal: checkpoint at step {step} saved" in ranks.out(0), ranks.report()
    assert latest(ranks.run_dir) == step and (ranks.run_dir / "summary_preempted.json").is_file()
    rr.like_straight(chain.straight, chain.run_dir, step)


@pytest.fixture(scope="module")
def during_save(chain, tmp_path_factory) -> rr.Ranks:
    """Case 1: SIGUSR1 twice and then SIGTERM during the step-2 save; SIGUSR1 and SIGTERM again once the loop is
    left (the checkpoint saved, the process on its way out)."""
    ranks = rr.start(tmp_path_factory.mktemp("during_save"), chain.run_dir, chain.shards, pause=["save", "exit"])
    rr.resumes(ranks, None)
    ranks.wait_paused("save")
    assert not (chain.run_dir / "checkpoints" / step_tag(2) / MARKER).exists()
    ranks.signal(signal.SIGUSR1)
    ranks.signal(signal.SIGUSR1)
    ranks.signal(signal.SIGTERM)
    ranks.release("save")
    ranks.wait_paused("exit")
    ranks.signal(signal.SIGUSR1)
    ranks.signal(signal.SIGTERM)
    ranks.release("exit")
    preempted_at(ranks, 3, chain)
    return ranks


def test_preempted_during_a_save_the_save_completes_and_the_next_step_is_saved(during_save, chain):
    assert rr.marker_steps(chain.run_dir) == [2, 3]


def test_sigusr1_twice_in_quick_succession_stops_once_and_exits_0(during_save):
    out = during_save.out(0)
    assert out.count("received SIGUSR1; stopping at the next step boundary") == 1, during_save.report()
    assert out.count("preemption signal: checkpoint at step") == 1


def test_sigterm_after_sigusr1_keeps_the_requeue_and_exits_0(during_save):
    # the first signal says why the job stops: a requeue (not under SLURM here: the line says how to resume)
    out = during_save.out(0)
    assert "exit 0 (not under SLURM or checkpoint.requeue=false: resubmit to resume)" in out, during_save.report()
    assert "without requeueing" not in out


def preempt_at(chain: rr.Chain, tmp: Path, point: str, resumed_from: int, saved: int) -> rr.Ranks:
    """A launch resuming from ``resumed_from``, SIGUSR1 to both ranks while they are held at ``point``: the
    run saves ``saved`` and exits 0."""
    ranks = rr.start(tmp, chain.run_dir, chain.shards, pause=[point])
    ranks.wait_paused(point)
    rr.resumes(ranks, resumed_from)
    ranks.signal(signal.SIGUSR1)
    ranks.release(point)
    preempted_at(ranks, saved, chain)
    return ranks


def test_preempted_during_start_up_while_loading(chain, tmp_path):
    preempt_at(chain, tmp_path, "startup", 3, 4)


def test_preempted_during_evaluation(chain, tmp_path):
    ranks = preempt_at(chain, tmp_path, "eval", 4, 6)
    assert "eval step 6" in ranks.out(0)


def test_preempted_during_a_stage_change(chain, tmp_path):
    ranks = preempt_at(chain, tmp_path, "stage", 6, 9)
    assert "stage 3/3: steps 8-11" in ranks.out(0)


def _child_running(parent: int, needle: str) -> bool:
    """A child process of ``parent`` whose command line contains ``needle`` is running."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in "ZX" and needle.encode() in cmdline:
            return True
    return False


def test_preempted_during_universal_conversion_on_another_world_size(chain, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(chain.straight, run_dir)
    for c in list_checkpoints(run_dir):
        if c.step > 6:
            shutil.rmtree(c.path)
    universal = run_dir / "checkpoints" / f"{step_tag(6)}_universal"
    ranks = rr.start(tmp_path, run_dir, chain.shards, world=1)
    converter = "deepspeed.checkpoint.ds_to_universal"
    ranks.wait_until(lambda: _child_running(ranks.procs[0].pid, converter), "the universal conversion")
    assert not is_universal_checkpoint(universal)
    os.killpg(ranks.procs[0].pid, signal.SIGUSR1)  # the rank's session: the rank and its converter
    ranks.expect_exit([0])
    out = ranks.out(0)
    assert "resuming a 2-rank checkpoint on 1 rank: converting to a universal checkpoint" in out, ranks.report()
    assert "preemption signal: checkpoint at step 7 saved" in out, ranks.report()
    assert is_universal_checkpoint(universal) and not universal.with_name(universal.name + ".tmp").exists()
    assert rr.marker_steps(run_dir) == [2, 4, 6, 7]
    again = rr.start(tmp_path, run_dir, chain.shards, world=1)
    again.expect_exit([0])
    assert latest(run_dir) == rr.STEPS and "converting" not in again.out(0), again.report()
    # no sample twice: the uninterrupted run's steps 1-6 (2 ranks), then step 7 and steps 8-12 on 1 rank
    before = rr.keys_by_step(rr.straight_launch(chain.straight))
    steps = {**{s: before[s] for s in range(1, 7)}, 7: rr.keys_by_step(ranks)[7], **rr.keys_by_step(again)}
    assert sorted(steps) == list(range(1, rr.STEPS + 1))
    keys = [k for s in sorted(steps) for k in steps[s]]
    assert all(len(steps[s]) == 16 for s in steps) and len(set(keys)) == len(keys) == 16 * rr.STEPS
