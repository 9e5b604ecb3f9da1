"""Checkpoint manager: completion marker, keep-last-k, resume modes, settings refusal, RNG, preemption flag."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (
    MARKER,
    CheckpointManager,
    ResumePoint,
    capture_rng_state,
    checkpoints_dir,
    latest,
    list_checkpoints,
    load_rank_file,
    read_marker,
    restore_rng_state,
    step_tag,
)
from pipeline.config import CheckpointConfig, Config, ConfigError, check_resume_compatible, frozen_settings
from pipeline.distributed import free_port
from pipeline.preemption import PreemptionHandler


def _ckpt_cfg(**kw) -> CheckpointConfig:
    return dataclasses.replace(CheckpointConfig(), **kw)


def _fake_save(directory: Path, tag: str) -> None:
    """Stands in for DeepSpeed save_checkpoint: writes into directory/tag."""
    (directory / tag).mkdir(parents=True, exist_ok=True)
    (directory / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


class _State:
    """A registered checkpoint part holding one value; records what a world-size change hands it."""

    def __init__(self, value=None):
        self.value, self.resharded = value, None

    def state_dict(self):
        return self.value

    def load_state_dict(self, state):
        self.value = state

    def load_resharded(self, states):
        self.resharded = states


def _manager(run_dir, rank=0, world_size=1, settings=None, loader=None, barrier=lambda: None,
             **cfg) -> CheckpointManager:
    """A manager with one registered part, "loader" (``mgr.parts["loader"].obj.value``)."""
    mgr = CheckpointManager(_ckpt_cfg(**cfg), run_dir, rank=rank, world_size=world_size, settings=settings,
                            barrier=barrier)
    mgr.register("loader", _State(loader))
    return mgr


def _restored(mgr: CheckpointManager, point) -> _State:
    mgr.restore(point)
    return mgr.parts["loader"].obj


def _save_all_ranks(run_dir, step, world_size, settings=None, **cfg) -> Path:
    """Save one checkpoint as `world_size` ranks would: one thread per rank, a real barrier between them."""
    if world_size == 1:
        return _manager(run_dir, settings=settings, loader={"rank": 0}, **cfg).save(step, _fake_save)
    barrier = threading.Barrier(world_size, timeout=30)
    errors = []

    def rank_main(rank):
        try:
            _manager(run_dir, rank, world_size, settings, loader={"rank": rank}, barrier=barrier.wait,
                     **cfg).save(step, _fake_save)
        except BaseException as e:  # surfaced in the test thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return checkpoints_dir(run_dir) / step_tag(step)


def _steps(run_dir) -> list[int]:
    return [c.step for c in list_checkpoints(run_dir)]


def test_tags_sort_by_step():
    tags = [step_tag(s) for s in (5, 500, 40, 100000)]
    assert sorted(tags) == [step_tag(s) for s in (5, 40, 500, 100000)]
    assert step_tag(500) == "step-00000500"


def test_marker_is_written_last_and_holds_the_run_facts(tmp_path):
    events = []
    mgr = _manager(tmp_path, settings={"model.name": "x"}, loader={"pos": 7},
                   barrier=lambda: events.append("barrier"))

    def save_fn(directory, tag):
        assert not (directory / tag / MARKER).exists()
        events.append("save_fn")
        _fake_save(directory, tag)

    path = mgr.save(500, save_fn, extra={"samples_seen": 1234, "step": 999})
    assert path == tmp_path / "checkpoints" / "step-00000500"
    assert events == ["barrier", "save_fn", "barrier", "barrier"]
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 500 and marker["world_size"] == 1 and marker["samples_seen"] == 1234
    assert marker["settings"] == {"model.name": "x"} and len(marker["settings_hash"]) == 16
    assert "time" in marker
    assert (path / "rank-00000.pt").is_file() and (path / "mp_rank_00_model_states.pt").is_file()
    assert not list(path.glob(".*tmp")), "temporary files must be renamed into place"


def test_incomplete_checkpoint_is_ignored(tmp_path):
    _save_all_ranks(tmp_path, 100, 1)
    crashed = tmp_path / "checkpoints" / step_tag(200)
    crashed.mkdir()
    (crashed / "rank-00000.pt").write_bytes(b"half")
    assert latest(tmp_path) == 100
    assert [c.step for c in list_checkpoints(tmp_path, include_incomplete=True)] == [100, 200]
    point = _manager(tmp_path).resolve_resume()
    assert point.step == 100
    # A corrupt marker counts as incomplete, not as a crash of the resume.
    (crashed / MARKER).write_text("{not json")
    assert read_marker(crashed) is None and latest(tmp_path) == 100
    assert latest(tmp_path / "nothing-here") is None


def test_keep_last_k_prunes_old_and_stale_incomplete(tmp_path):
    stale = tmp_path / "checkpoints" / step_tag(5)
    stale.mkdir(parents=True)
    future = tmp_path / "checkpoints" / step_tag(1000)  # ignored, not deleted: it is newer than anything saved
    future.mkdir()
    for step in (10, 20, 30, 40):
        _save_all_ranks(tmp_path, step, 2, keep_last=2)
        (tmp_path / "checkpoints" / f"{step_tag(step)}_universal").mkdir()
    assert _steps(tmp_path) == [30, 40]
    assert not stale.exists() and future.exists()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # derived universal copies go with their checkpoint
    assert names == [step_tag(30), f"{step_tag(30)}_universal", step_tag(40), f"{step_tag(40)}_universal",
                     step_tag(1000)]


def test_keep_last_zero_keeps_everything(tmp_path):
    for step in (1, 2, 3, 4):
        _save_all_ranks(tmp_path, step, 1, keep_last=0)
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_saving_the_same_step_again_replaces_a_leftover(tmp_path):
    crashed = tmp_path / "checkpoints" / step_tag(10)
    crashed.mkdir(parents=True)
    (crashed / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"from a 4-rank run")
    _save_all_ranks(tmp_path, 10, 1)
    assert not (crashed / "zero_pp_rank_3_mp_rank_00_optim_states.pt").exists()
    assert _steps(tmp_path) == [10]


def test_resume_from_an_older_checkpoint_retires_the_newer_timeline(tmp_path):
    for step in (10, 20, 30):
        _save_all_ranks(tmp_path, step, 1, keep_last=1 if step == 30 else 3)
    assert _steps(tmp_path) == [30]
    _save_all_ranks(tmp_path, 10, 1, keep_last=1)
    for step in (15, 20):  # keep_last=1 must never prune the one just written, even with a newer one around
        _save_all_ranks(tmp_path, step, 1, keep_last=1)
        assert _steps(tmp_path) == [step]
    retired = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".superseded-" in p.name]
    assert len(retired) == 1 and retired[0].startswith(step_tag(30))
    assert latest(tmp_path) == 20


def test_resume_modes(tmp_path):
    assert _manager(tmp_path, resume="auto").resolve_resume() is None
    _save_all_ranks(tmp_path, 10, 1)
    _save_all_ranks(tmp_path, 20, 1)
    assert _manager(tmp_path, resume="auto").resolve_resume().step == 20
    assert _manager(tmp_path, resume="none").resolve_resume() is None
    explicit = tmp_path / "checkpoints" / step_tag(10)
    point = _manager(tmp_path / "other_run", resume=str(explicit)).resolve_resume()
    assert point.step == 10 and point.directory == tmp_path / "checkpoints" and point.tag == step_tag(10)
    assert not point.world_size_changed


def test_resume_does_not_resave_the_step_it_resumed_from(tmp_path):
    _save_all_ranks(tmp_path, 10, 1, every_steps=10)
    mgr = _manager(tmp_path, every_steps=10)
    mgr.resolve_resume()
    assert not mgr.should_save(10) and not mgr.should_save(10, final=True)
    assert mgr.should_save(20) and mgr.should_save(13, stage_boundary=True) and not mgr.should_save(13)
    assert not _manager(tmp_path, every_steps=0).should_save(10)


@pytest.mark.parametrize("what", ["missing", "incomplete", "file", "run_dir"])
def test_explicit_resume_errors_name_the_key_and_the_fix(tmp_path, what):
    good = _save_all_ranks(tmp_path, 10, 1)
    target = {
        "missing": tmp_path / "checkpoints" / step_tag(99),
        "incomplete": tmp_path / "checkpoints" / step_tag(20),
        "file": good / "rank-00000.pt",
        "run_dir": tmp_path,
    }[what]
    if what == "incomplete":
        target.mkdir()
    with pytest.raises(ConfigError) as e:
        _manager(tmp_path, resume=str(target)).resolve_resume()
    msg = str(e.value)
    assert msg.startswith("checkpoint.resume: ") and str(target) in msg
    if what == "incomplete":
        assert "not a complete checkpoint" in msg and str(good) in msg
    if what == "run_dir":
        assert f"checkpoint.resume={good}" in msg


def test_changed_frozen_setting_is_refused_naming_the_key(tmp_path):
    cfg = Config()
    _save_all_ranks(tmp_path, 10, 1, settings=frozen_settings(cfg))
    same = _manager(tmp_path, settings=frozen_settings(cfg)).resolve_resume()
    assert same.step == 10
    check_resume_compatible(same.marker["settings"], cfg)  # the stored settings are what config.py compares

    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="efficientnetv2_l"))
    with pytest.raises(ConfigError, match=r"model\.name: checkpoint 'efficientnetv2_s' -> now 'efficientnetv2_l'"):
        _manager(tmp_path, settings=frozen_settings(changed)).resolve_resume()
    with pytest.raises(ConfigError, match=r"model\.name"):
        check_resume_compatible(same.marker["settings"], changed)
    # A key that may change (learning rate) does not block the resume.
    other_lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_per_256=0.5))
    assert _manager(tmp_path, settings=frozen_settings(other_lr)).resolve_resume().step == 10


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), np.random.randn(3).tolist(), torch.rand(4).tolist()


def test_rng_round_trip_in_process_and_through_the_rank_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draw()
    restore_rng_state(state)
    assert _draw() == expected

    restore_rng_state(state)
    path = _manager(tmp_path, loader={"epoch": 3}).save(1, None)
    after_save = _draw()
    _draw()  # move every generator on
    mgr = _manager(tmp_path)
    point = mgr.resolve_resume()
    assert _restored(mgr, point).value == {"epoch": 3}
    saved = load_rank_file(path, 0)
    assert saved["rank"] == 0 and saved["step"] == 1 and saved["parts"] == {"loader": {"epoch": 3}}
    assert _draw() == after_save
    assert path.name == step_tag(1)


def test_world_size_change_asks_for_a_universal_checkpoint(tmp_path):
    _save_all_ranks(tmp_path, 10, 2)
    mgr = _manager(tmp_path, world_size=1)
    point = mgr.resolve_resume()
    assert point.world_size_changed and point.saved_world_size == 2
    assert "a 2-rank checkpoint on 1 rank" in point.message
    assert point.universal_path == tmp_path / "checkpoints" / f"{step_tag(10)}_universal"
    part = _restored(mgr, point)
    assert part.value is None  # no rank's own state belongs to this rank now ...
    assert [s["rank"] for s in part.resharded] == [0, 1]  # ... the part gets every saved rank's
    # Same world size: each rank its own.
    assert not _manager(tmp_path, rank=0, world_size=2).resolve_resume().world_size_changed


def test_complete_checkpoint_missing_a_rank_file_fails_clearly(tmp_path):
    path = _save_all_ranks(tmp_path, 10, 2)
    (path / "rank-00001.pt").unlink()
    # Found before anything is loaded (rank 0 decides for everyone); the only checkpoint: nothing to fall back on.
    with pytest.raises(ConfigError, match=r"every complete checkpoint .* is damaged .*rank-00001\.pt is missing"):
        _manager(tmp_path, rank=0, world_size=2).resolve_resume()
    # A file that goes between the decision and the load is still named by the load.
    point = ResumePoint(path=path, step=10, marker=read_marker(path), saved_world_size=2, world_size=2)
    assert _restored(_manager(tmp_path, rank=0, world_size=2), point).value == {"rank": 0}
    with pytest.raises(ConfigError, match="lacks rank-00001.pt"):
        _restored(_manager(tmp_path, rank=1, world_size=2), point)


def test_preemption_signal_sets_a_flag_only():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(["SIGUSR1", "TERM"], check_every=3) as h:
        assert not h.triggered
        assert [h.should_stop() for _ in range(3)] == [False, False, False]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.triggered and h.received == signal.SIGUSR1
        # Checked on every third call only (all ranks call equally often, so they check at the same steps).
        assert [h.should_stop() for _ in range(3)] == [False, False, True]
        assert h.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records
        assert h.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_preemption_config_and_bad_signal_names():
    h = PreemptionHandler.from_config(_ckpt_cfg(preempt_signals=["SIGUSR2"], preempt_check_every=5), rank=3)
    try:
        assert h.signals == [signal.SIGUSR2] and h.check_every == 5 and h.rank == 3
    finally:
        h.close()
    with pytest.raises(ConfigError, match="checkpoint.preempt_signals: 'SIGNOPE' is not a signal name"):
        PreemptionHandler(["SIGNOPE"])
    with pytest.raises(ConfigError, match="SIGKILL cannot be caught"):
        PreemptionHandler(["SIGKILL"])
    with pytest.raises(ConfigError, match="checkpoint.preempt_check_every"):
        PreemptionHandler(check_every=0)


def _fake_scontrol(tmp_path: Path, rc: int) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\necho 'boom' >&2\nexit {rc}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def _preempted(sig: signal.Signals, **kw) -> PreemptionHandler:
    h = PreemptionHandler([signal.SIGUSR1, signal.SIGTERM], **kw)
    os.kill(os.getpid(), sig)
    assert h.should_stop()
    return h


@pytest.mark.parametrize("rc", [0, 1])
def test_requeue_runs_scontrol_on_rank0_under_slurm(tmp_path, monkeypatch, rc, caplog):
    monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path, rc)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with _preempted(signal.SIGUSR1, rank=0) as h:
        assert h.requeue() is False  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with _preempted(signal.SIGUSR1, rank=1) as h:
        assert h.requeue() is False  # not rank 0
    with _preempted(signal.SIGUSR1, rank=0, requeue=False) as h:
        assert h.requeue() is False  # disabled
    with _preempted(signal.SIGTERM, rank=0) as h:
        assert not h.wants_requeue and h.requeue() is False  # scancel / preemption: stay stopped
    with PreemptionHandler([], rank=0) as h:
        assert h.requeue() is False  # no signal at all
    assert not (tmp_path / "scontrol.log").exists()
    with _preempted(signal.SIGUSR1, rank=0) as h:
        assert h.wants_requeue and h.requeue() is (rc == 0)
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    if rc:
        assert "could not requeue SLURM job 4242" in caplog.text and "boom" in caplog.text


def _two_rank_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        handler = PreemptionHandler(["SIGUSR1"], rank=rank)
        mgr = CheckpointManager(_ckpt_cfg(keep_last=2), run_dir, rank=rank, world_size=world)
        mgr.register("loader", _State({"rank": rank}))
        stopped_at = None
        for step in range(1, 20):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
            if handler.should_stop():
                stopped_at = step
                mgr.save(step, _fake_save)
                break
        point = CheckpointManager(_ckpt_cfg(), run_dir, rank=rank, world_size=world).resolve_resume()
        try:  # rank 0 decides; its refusal must reach rank 1 too instead of leaving it in the broadcast
            CheckpointManager(_ckpt_cfg(resume=f"{run_dir}/nope"), run_dir, rank=rank, world_size=world) \
                .resolve_resume()
            refusal = None
        except ConfigError as e:
            refusal = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"stopped_at": stopped_at, "triggered": handler.triggered, "resume_step": point.step,
             "wants_requeue": handler.wants_requeue, "refusal": refusal}))
        handler.close()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: seconds when idle, more on a loaded machine
def test_two_ranks_agree_to_stop_when_one_got_the_signal(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tmp_path / "run"), str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["triggered"] for r in results] == [False, True]
    assert [r["stopped_at"] for r in results] == [3, 3]
    assert [r["resume_step"] for r in results] == [3, 3]
    assert [r["wants_requeue"] for r in results] == [True, True]  # rank 0 requeues for rank 1's SIGUSR1
    assert results[0]["refusal"] == results[1]["refusal"] and "nope does not exist" in results[1]["refusal"]
    path = tmp_path / "run" / "checkpoints" / step_tag(3)
    assert read_marker(path)["world_size"] == 2
    assert (path / "rank-00000.pt").is_file() and (path / "rank-00001.pt").is_file()


@pytest.mark.gpu
def test_cuda_rng_round_trip_and_nccl_agreement(monkeypatch):
    torch.cuda.manual_seed(5)
    torch.rand(1, device="cuda")  # initialise CUDA: only then is there a generator state to keep
    state = capture_rng_state()
    assert "cuda" in state
    expected = torch.rand(3, device="cuda").tolist()
    restore_rng_state(state)
    assert torch.rand(3, device="cuda").tolist() == expected

    # should_stop on an NCCL group reduces a CUDA tensor (NCCL refuses CPU tensors).
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        with PreemptionHandler(["SIGUSR1"]) as h:
            assert not h.should_stop()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert h.should_stop() and h.wants_requeue
    finally:
        torch.distributed.destroy_process_group()
