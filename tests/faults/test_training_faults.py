"""Training faults, provoked for real on 2-rank CPU DeepSpeed runs of ``python -m pipeline.pretrain``
(tests/faults/rank_runs.py: each rank started as srun starts a task, its output in its own file).

- A non-finite loss and gradient: the images of some steps are multiplied by inf on rank 1 only (the trainer's
  ``EFFNETV2_TEST_NONFINITE`` hook; the forward, the loss, DeepSpeed's reduction and optimizer are the real
  ones), under ZeRO-2 and ZeRO-0. Each such step is skipped on both ranks (no update, the BN statistics the bad
  forward changed put back), counted and logged; the third in a row (``train.max_nonfinite_steps=3``) stops the
  run with one line naming the step, the stage and the checkpoint from before them, which stays the newest and
  holds finite EMA weights and BN statistics.
- One run dir taken through three faults and a final resume (``chain``), compared with the uninterrupted run:
  rank 1 killed with -9 mid-step (rank 0 exits at once with one line naming the failed collective); both ranks
  killed with -9 during an evaluation; rank 1 stopped with SIGSTOP during a stage change (rank 0 exits once
  ``train.collective_timeout_s`` has passed, with one line, after its watchdog printed its stacks inside the
  collective; rank 1 is then killed); rank 1 held in Python at an evaluation (its watchdog prints its stacks,
  there, before rank 0 gives up on it). Each next start resumes from
  the newest complete checkpoint and the last one finishes the run: every logged loss and the final weights
  equal the uninterrupted run's.
"""

from __future__ import annotations

import math
import signal
import socket
import time

import pytest
import rank_runs as rr
import torch

import pretrain_launch as launch
from pipeline.checkpoint import latest, rank_file, step_tag

STOP_TIMEOUT_S = 10  # train.collective_timeout_s of the SIGSTOP run


# --------------------------------------------------------------------------------------------- non-finite steps


# ZeRO-2: DeepSpeed's optimizer finds the non-finite norm and skips the step; ZeRO-0: the backend (pipeline.engine)
# does, or the plain optimizer would write NaN into every weight
@pytest.mark.parametrize("zero", [0, 2])
def test_nonfinite_steps_are_skipped_counted_and_the_third_in_a_row_stops_the_run(zero, tmp_path_factory, tmp_path):
    data = rr.shards(tmp_path_factory)
    run_dir = tmp_path / "run"
    ranks = rr.start(tmp_path, run_dir, data, "train.max_nonfinite_steps=3", f"train.zero_stage={zero}",
                     env={"EFFNETV2_TEST_NONFINITE": "1:2,5,6,7"})
    ranks.expect_exit([2, 2])
    out = ranks.out(0)
    # step 2 alone: skipped, counted, the run goes on
    assert "step 2 (stage 1/3): the gradient is not finite" in out and "(1 in a row, 1 in all;" in out
    assert "step 6 (stage 2/3): the gradient is not finite" in out and "(2 in a row, 3 in all;" in out
    line = rr.error_line(ranks)
    for needle in ("step 7 (stage 2/3)", "3 steps in a row (steps 5-7, train.max_nonfinite_steps=3)",
                   f"{run_dir / 'checkpoints' / step_tag(4)}, holds the weights from before them"):
        assert needle in line, line
    logged = {r["step"]: r for r in rr.log_records(run_dir)}
    assert sorted(logged) == list(range(1, 8))
    assert [logged[s]["nonfinite_steps"] for s in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
    assert math.isnan(logged[2]["loss"]) and all(math.isfinite(logged[s]["loss"]) for s in (1, 3, 4))
    assert not math.isfinite(logged[2]["grad_norm"]) and math.isfinite(logged[3]["grad_norm"])
    # No save inside the run of bad steps (step 6) nor at the stop; the periodic save at step 2 came right after a
    # skipped step and waited too. The checkpoint kept is whole and finite.
    assert rr.marker_steps(run_dir) == [4]
    ckpt = run_dir / "checkpoints" / step_tag(4)
    for rank in (0, 1):  # rank 1's own BN statistics (its bad forwards changed them) and the EMA (of the weights)
        parts = torch.load(rank_file(ckpt, rank), map_location="cpu", weights_only=False)["parts"]
        tensors = list(parts["bn"]) + list(parts["ema_buffers"])
        if rank == 0:
            tensors += [*parts["ema"]["params"].values(), *parts["ema"]["buffers"].values()]
        assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# --------------------------------------------------------------------------------------------- a chain of faults


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> rr.Chain:
    return rr.chain(tmp_path_factory, "training_chain")


def test_rank_killed_mid_step_the_other_exits_at_once_with_one_line(chain, tmp_path):
    ranks = rr.start(tmp_path, chain.run_dir, chain.shards)
    ranks.wait_until(lambda: launch.logged_steps(chain.run_dir) >= 1, "step 1")
    killed = time.monotonic()
    ranks.kill9([1])
    [code] = ranks.wait(120, ranks=[0])
    took = time.monotonic() - killed
    assert code == 2, ranks.report()
    line = rr.error_line(ranks)
    assert "rank 0: a collective operation failed after step" in line, line
    assert f"lost rank 1 on host {socket.gethostname()}: it died or stopped answering" in line, line
    assert took < 30, f"rank 0 took {took:.0f} s to notice:\n{ranks.report()}"


def test_run_killed_during_evaluation_resumes_from_the_last_checkpoint(chain, tmp_path):
    before = latest(chain.run_dir)
    ranks = rr.start(tmp_path, chain.run_dir, chain.shards, pause=["eval"])
    rr.resumes(ranks, before)
    ranks.wait_paused("eval")
    ranks.kill9()
    assert latest(chain.run_dir) is not None  # the next test resumes from it


def test_rank_stopped_during_a_stage_change_the_other_exits_after_the_collective_timeout(chain, tmp_path):
    before = latest(chain.run_dir)
    ranks = rr.start(tmp_path, chain.run_dir, chain.shards, f"train.collective_timeout_s={STOP_TIMEOUT_S}",
                     pause=["stage"])
    rr.resumes(ranks, before)
    ranks.wait_paused("stage")
    ranks.signal(signal.SIGSTOP, ranks=[1])
    stopped = time.monotonic()
    ranks.release("stage")
    try:
        [code] = ranks.wait(STOP_TIMEOUT_S + 60, ranks=[0])
        took = time.monotonic() - stopped
    finally:
        ranks.kill9([1])  # a stopped process takes SIGKILL too
    assert code == 2, ranks.report()
    line = rr.error_line(ranks)
    assert "rank 0: a collective operation failed after step" in line, line
    assert f"lost rank 1 on host {socket.gethostname()}: it died or stopped answering " \
        f"(train.collective_timeout_s={STOP_TIMEOUT_S} s" in line, line
    assert STOP_TIMEOUT_S - 1 < took < STOP_TIMEOUT_S + 20, f"rank 0 exited after {took:.0f} s:\n{ranks.report()}"
    # before that, 3/4 of the timeout into the wait, rank 0's watchdog printed where it was: in the collective
    err = ranks.err(0)
    report = err[err.index("watchdog: rank 0 "):]
    assert "has made no progress for " in report and "The stacks of its threads follow." in report, report[:500]
    assert "pipeline/trainer.py" in report and "torch/distributed/" in report, report[:3000]


def test_rank_stalled_in_an_evaluation_prints_where_it_is_before_the_other_gives_up(chain, tmp_path):
    """Rank 1 is held in Python at the start of an evaluation (stalled, not stopped: its threads still run, as
    with a loader or a file system that does not answer); rank 0 waits in the evaluation's first collective."""
    before = latest(chain.run_dir)
    ranks = rr.start(tmp_path, chain.run_dir, chain.shards, f"train.collective_timeout_s={STOP_TIMEOUT_S}",
                     pause=["eval"], pause_ranks=[1])
    rr.resumes(ranks, before)
    ranks.wait_paused("eval", ranks=[1])
    try:
        [code] = ranks.wait(STOP_TIMEOUT_S + 60, ranks=[0])
        # 3/4 of the timeout after its last progress, before rank 0 gave up: rank 1 printed where it is
        deadline = time.monotonic() + 10
        while "The stacks of its threads follow." not in ranks.err(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = ranks.err(1)
    finally:
        ranks.kill9([1])
    assert code == 2, ranks.report()
    assert "lost rank 1 on host" in rr.error_line(ranks), ranks.report()
    assert "watchdog: rank 1 (host " in err, ranks.report()
    report = err[err.index("watchdog: rank 1 "):]
    assert "has made no progress for " in report and "The stacks of its threads follow." in report, report[:500]
    assert "pipeline/testhooks.py" in report and " in evaluate" in report, report[:3000]  # where it stalled


def test_after_the_faults_the_run_finishes_like_an_uninterrupted_one(chain, tmp_path):
    before = latest(chain.run_dir)
    ranks = rr.start(tmp_path, chain.run_dir, chain.shards)
    rr.resumes(ranks, before)
    ranks.expect_exit([0, 0])
    rr.like_straight(chain.straight, chain.run_dir)
