"""Pretraining end to end on CPU: DeepSpeed ZeRO 0-3 at 1 and 2 ranks, exact resume after kill -9, resume on
another rank count, TensorBoard stage values, EMA under ZeRO-2 vs ZeRO-3, export round trip. (Preemption and
the resume matrix with loader workers: test_resume_matrix.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain_launch as launch
from pipeline.checkpoint import latest, read_marker
from pipeline.config import ConfigError, load_config
from pipeline.distributed import free_port
from pipeline.export import model_from_export

REPO = launch.REPO
CONFIG = launch.CONFIG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return launch.write_demo_shards(tmp_path_factory.mktemp("pretrain_shards") / "demo")


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train=[{shards}]", f"train.run_dir={run_dir}", *extra]


LEARN = ("train.total_steps=24", "progressive.max_mixup=0", "progressive.min_randaug=0",
         "progressive.max_randaug=2", "optim.lr_per_256=0.02", "checkpoint.every_steps=0")


def _loss_falls(run_dir: Path) -> None:
    losses = [r["loss"] for r in launch.train_log(run_dir)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall in {run_dir}: {losses}"


def test_zero_stages_two_ranks_loss_falls_ema_export_tensorboard(shards, tmp_path):
    runs = [{"overrides": _overrides(shards, tmp_path / f"z{z}", f"train.zero_stage={z}", *LEARN),
             "probe": str(tmp_path / f"probe{z}.pt")} for z in (0, 1, 2, 3)]
    launch.run(tmp_path, 2, runs)
    for z in (0, 1, 2, 3):
        run = tmp_path / f"z{z}"
        _loss_falls(run)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["step"] == 24 and summary["world_size"] == 2 and summary["zero_stage"] == z
        assert summary["eval"]["raw"]["samples"] == 40  # every validation image once across the 2 ranks

    # EMA under ZeRO-2 and ZeRO-3 on the same data: the same EMA weights (up to reduction order)
    from pipeline.export import export_checkpoint

    for z in (2, 3):
        export_checkpoint(tmp_path / f"z{z}", ema=True, out_dir=tmp_path / f"ema{z}")
    m2, _ = model_from_export(tmp_path / "ema2")
    m3, _ = model_from_export(tmp_path / "ema3")
    s2, s3 = m2.state_dict(), m3.state_dict()
    assert s2.keys() == s3.keys()
    for k in s2:
        if s2[k].is_floating_point():
            torch.testing.assert_close(s2[k], s3[k], rtol=1e-4, atol=1e-5, msg=k)

    # export round trip: the exported raw / EMA weights give the trained model's outputs
    export_checkpoint(tmp_path / "z2", ema=False, out_dir=tmp_path / "raw2")
    probe = torch.load(tmp_path / "probe2.pt")
    for kind, folder in (("raw", "raw2"), ("ema", "ema2")):
        model, meta = model_from_export(tmp_path / folder)
        model.eval()
        with torch.no_grad():
            out = model(probe["input"])
        torch.testing.assert_close(out, probe[kind], rtol=1e-4, atol=1e-4, msg=kind)
        assert meta["architecture"]["num_classes"] == 10 and len(meta["classes"]) == 10
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in model.state_dict())

    # the stage changes are in the TensorBoard event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "z2" / "tb"))
    acc.Reload()
    sizes = sorted({int(e.value) for e in acc.Scalars("stage/image_size")})
    assert sizes == [32, 48, 64]
    randaug = [e.value for e in acc.Scalars("stage/randaug")]
    assert randaug[0] < randaug[-1]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_s", "data/samples_seen",
                "data/bad_samples", "data/loader_wait_s", "stage/dropout", "stage/mixup", "eval/ema_top1"):
        assert tag in acc.Tags()["scalars"], tag
    assert len(acc.Tags()["images"]) == 3  # one grid of augmented images per stage


def test_zero_stages_one_rank(shards, tmp_path):
    runs = [{"overrides": _overrides(shards, tmp_path / f"z{z}", f"train.zero_stage={z}", *LEARN)}
            for z in (0, 1, 2, 3)]
    launch.run(tmp_path, 1, runs)
    for z in (0, 1, 2, 3):
        _loss_falls(tmp_path / f"z{z}")


# 16 steps, killed once the step-4 checkpoint is complete: the steps after it leave the kill a wide margin
EXACT_STEPS = 16
EXACT = (f"train.total_steps={EXACT_STEPS}", "checkpoint.every_steps=4", "train.zero_stage=2", "train.precision=fp32")


def test_exact_resume_after_kill_and_resume_on_other_rank_count(shards, tmp_path):
    straight = tmp_path / "straight"
    launch.run(tmp_path, 2, [{"overrides": _overrides(shards, straight, *EXACT)}])

    broken = tmp_path / "broken"
    proc = launch.start(tmp_path, 2, _overrides(shards, broken, *EXACT))
    ckpt4 = broken / "checkpoints" / "step-00000004"
    try:
        launch.wait_for(lambda: read_marker(ckpt4) is not None, proc, 300, "the step-4 checkpoint")
    finally:
        launch.kill9(proc)
    assert latest(broken) is not None and latest(broken) < EXACT_STEPS

    other = tmp_path / "other_world"
    shutil.copytree(broken, other)

    launch.run(tmp_path, 2, [{"overrides": _overrides(shards, broken, *EXACT)}])
    a, b = launch.losses_by_step(straight), launch.losses_by_step(broken)
    assert sorted(a) == list(range(1, EXACT_STEPS + 1)) and sorted(b) == list(range(1, EXACT_STEPS + 1))
    assert a == b, f"per-step losses differ after the resume:\n{a}\n{b}"
    sa, sb = launch.final_state(straight), launch.final_state(broken)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"final weights differ after an exact resume: {k}"

    # the same interrupted run continued on 1 rank: universal checkpoint conversion, then to the end
    resumed_from = latest(other)
    proc = launch.run(tmp_path, 1, [{"overrides": _overrides(shards, other, *EXACT)}])
    summary = json.loads((other / "summary.json").read_text())
    assert summary["step"] == EXACT_STEPS and summary["world_size"] == 1
    assert f"resuming a 2-rank checkpoint on 1 rank: converting to a universal checkpoint in " \
           f"{other / 'checkpoints' / f'step-{resumed_from:08d}_universal'}" in proc.stdout + proc.stderr
    steps = [r["step"] for r in launch.train_log(other)]
    assert steps[-(EXACT_STEPS - resumed_from):] == list(range(resumed_from + 1, EXACT_STEPS + 1))


def test_changed_frozen_setting_is_refused(shards, tmp_path):
    run = tmp_path / "frozen"
    over = _overrides(shards, run, "train.total_steps=4", "checkpoint.every_steps=2")
    launch.run(tmp_path, 1, [{"overrides": over}])
    proc = subprocess.run([sys.executable, "-m", "pipeline.pretrain", "--config", CONFIG,
                           *_overrides(shards, run, "train.total_steps=6", "checkpoint.every_steps=2")],
                          env=launch.env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train.total_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_tiny_config_loads():
    cfg = load_config(CONFIG, ["data.train=[x]"])
    assert cfg.model.name == "efficientnetv2_test" and cfg.progressive.num_stages == 3
    with pytest.raises(ConfigError, match="train.zero_stag"):
        load_config(CONFIG, ["train.zero_stag=2"])


def test_zero0_checkpoint_resumes_on_other_rank_count_without_conversion(shards, tmp_path):
    run = tmp_path / "z0"
    over = _overrides(shards, run, "train.total_steps=4", "checkpoint.every_steps=2", "train.zero_stage=0")
    launch.run(tmp_path, 2, [{"overrides": over}])
    # as if the run had been stopped after its step-2 checkpoint
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    (run / "summary.json").unlink()
    proc = launch.run(tmp_path, 1, [{"overrides": over}])
    assert "a 2-rank ZeRO-0 checkpoint on 1 rank(s)" in proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["world_size"] == 1
    assert not list((run / "checkpoints").glob("*_universal"))


@pytest.mark.gpu
def test_trains_on_gpu_with_bf16_autocast_and_channels_last(shards, tmp_path):
    """precision 'auto' on CUDA: DeepSpeed's torch_autocast (bf16 compute, fp32 weights and BatchNorm)."""
    run = tmp_path / "gpu"
    launch.run(tmp_path, 1, [{"overrides": _overrides(shards, run, "train.precision=auto", "model.channels_last=true",
                                                "train.zero_stage=2", *LEARN), "probe": str(tmp_path / "p.pt")}])
    _loss_falls(run)
    probe = torch.load(tmp_path / "p.pt")
    assert torch.isfinite(probe["raw"]).all() and torch.isfinite(probe["ema"]).all()
    assert json.loads((run / "summary.json").read_text())["step"] == 24


def test_control_plane_collectives_use_the_gloo_control_group(shards, tmp_path):
    """2 ranks: the preemption flag, the log reductions (loss, bad samples), the evaluation counts and the
    checkpoint barriers / resume decision go over the trainer's own gloo group with CPU tensors (on GPUs: no
    CUDA tensor and .item() per step for them); the step's data plane is DeepSpeed's."""
    out = tmp_path / "calls.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "control_group_worker.py"), launch.CONFIG, str(out),
           *_overrides(shards, tmp_path / "run", "train.total_steps=4", "train.log_every=1",
                       "checkpoint.every_steps=2", "progressive.num_stages=1", "train.zero_stage=2")]
    res = subprocess.run(cmd, env=launch.env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    seen = json.loads(out.read_text())
    assert seen["control_is_group"] and seen["control_backend"] == "gloo" and seen["steps"] == 4
    by_caller: dict[str, list[dict]] = {}
    for call in seen["calls"]:
        by_caller.setdefault(call["caller"], []).append(call)
    for caller in ("preemption.py:should_stop", "trainer.py:_log_step", "metrics.py:evaluate_topk",
                   "checkpoint.py:_barrier"):
        calls = by_caller.get(caller)
        assert calls, f"no collective from {caller}: {sorted(by_caller)}"
        assert all(c["control"] for c in calls), f"{caller} used another group: {calls[:3]}"
        assert all(c["device"] in (None, "cpu") for c in calls), calls[:3]
    assert len(by_caller["preemption.py:should_stop"]) == 4  # one flag per step
    assert len(by_caller["trainer.py:_log_step"]) == 4  # log_every=1
