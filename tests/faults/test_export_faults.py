"""An export killed half-way: ``python -m pipeline.export`` killed with -9 between writing its new weights file and
its model.json, over an earlier export in the same folder. The folder is never taken for a complete export (its
old model.json is gone before the new weights arrive), and rerunning the export completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import rank_runs
import torch

import pretrain_launch as launch
from pipeline.export import ExportError, is_export, load_export


def _export(run_dir: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "pipeline.export", str(run_dir), "--out", str(out), *args],
                                env=env or launch.env(), cwd=launch.REPO, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _done(proc: subprocess.Popen, timeout: float = 180) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"export did not end within {timeout} s") from None
    assert code == 0, f"export exited {code}"


def test_kill9_during_an_export_over_an_earlier_one(tmp_path_factory, tmp_path):
    run = rank_runs.straight(tmp_path_factory, rank_runs.shards(tmp_path_factory))
    out = tmp_path / "export"
    _done(_export(run, out))  # an earlier, complete export: the raw weights
    assert is_export(out)
    raw, _ = load_export(out)

    # The EMA export into the same folder, held between its new weights file and its model.json, killed there.
    pause = tmp_path / "pause"
    pause.mkdir()
    env = dict(launch.env(), EFFNETV2_TEST_PAUSE="export", EFFNETV2_TEST_PAUSE_DIR=str(pause))
    proc = _export(run, out, "--ema", env=env)
    deadline = time.monotonic() + 180
    while not (pause / "export.rank0").exists():
        assert proc.poll() is None, f"the export ended ({proc.returncode}) before reaching its pause point"
        assert time.monotonic() < deadline, "the export did not reach its pause point within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)

    # Half-written: the new weights are there, model.json is not, so nothing takes it for an export.
    assert (out / "model.safetensors").is_file() and not (out / "model.json").exists()
    assert not is_export(out)
    with pytest.raises(ExportError, match="not an export folder"):
        load_export(out)

    # Rerun: complete, and the EMA weights exactly (a fresh EMA export elsewhere is the reference).
    _done(_export(run, out, "--ema"))
    ref = tmp_path / "reference"
    _done(_export(run, ref, "--ema"))
    state, meta = load_export(out)
    expected, _ = load_export(ref)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    # the check can tell the two apart: the EMA weights are not the raw ones
    assert any(not torch.equal(state[k], raw[k]) for k in state if state[k].is_floating_point())
