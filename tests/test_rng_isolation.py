"""The data machinery never moves the trainer's random streams (dropout, stochastic depth).

A resumed run restarts its loader at the resume step, where the uninterrupted run did not; if starting reader
processes (or an eval pass, or a stage change) drew from the global generators, every dropout mask after a
mid-stage resume would differ from the uninterrupted run's. These tests compare the global RNG states (python,
numpy, torch) around loader restarts and eval passes, with and without worker processes, and one real training
step with and without a loader restart and an evaluation in between.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_launch as launch
from pipeline.data.loader import build_eval_loader
from test_loader import cfg_for, loader, stage, write_shards

REPO = Path(__file__).resolve().parent.parent


def _rng_states() -> tuple:
    np_state = np.random.get_state()
    return random.getstate(), (np_state[0], np_state[1].tobytes(), *np_state[2:]), torch.get_rng_state()


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rng_shards")
    write_shards(root, [12, 12, 12, 12])
    write_shards(root, [8, 8], split="val")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_restarts_leave_global_rngs_alone(small_shards, workers):
    cfg = cfg_for([small_shards], workers=workers)
    ld = loader(cfg, mbs=4)
    try:
        torch.manual_seed(1234)
        before = _rng_states()
        for _ in range(3):
            next(ld)
        ld.set_stage(stage(size=24, mbs=4, randaug=2.0))  # a stage change restarts the readers
        for _ in range(3):
            next(ld)
        state = ld.state_dict()
        ld.load_state_dict(state)  # a resume restarts them too
        for _ in range(12):  # past the end of the epoch: a new epoch starts new readers
            next(ld)
        assert ld.epoch >= 1
        assert _same(before, _rng_states()), "the training loader moved the global random generators"
    finally:
        ld.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_pass_leaves_global_rngs_alone(small_shards, workers):
    cfg = cfg_for([small_shards], workers=workers, val=str(small_shards))
    ev = build_eval_loader(cfg, image_size=24, micro_batch_size=4)
    torch.manual_seed(99)
    before = _rng_states()
    assert sum(int(b["valid"].sum()) for b in ev) == 16
    assert _same(before, _rng_states()), "an eval pass moved the global random generators"


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    return launch.write_demo_shards(tmp_path_factory.mktemp("rng_demo") / "demo", classes=4, per_class=16,
                                    val_per_class=2, image_size=48, shard_size=8)


@pytest.mark.slow
def test_trainer_step_is_the_same_after_a_loader_restart_and_an_eval(demo_shards, tmp_path, monkeypatch):
    """One DeepSpeed rank in this process, loader workers on: step 2 after a loader restart and an evaluation
    between the steps gives the loss, weights and generator state of step 2 without them."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from pipeline.config import load_config
    from pipeline.pretrain import Pretrain
    from pipeline.trainer import Trainer

    def build(name: str) -> Trainer:
        cfg = load_config(REPO / "configs/pretrain/tiny_cpu.yaml",
                          [f"data.train=[{demo_shards}]", f"train.run_dir={tmp_path / name}", "data.workers=2",
                           "train.global_batch_size=8", "train.micro_batch_size=8", "train.total_steps=8",
                           "progressive.max_dropout=0.5", "progressive.min_dropout=0.5", "eval.micro_batch_size=4",
                           "train.zero_stage=2"])
        return Trainer(cfg, Pretrain())

    results = []
    for restart in (False, True):
        tr = build(f"restart{int(restart)}")
        try:
            st = tr.schedule.stage_at(0)
            tr._enter_stage(st)
            tr.backend.train()
            first = tr.train_step(st, 1e-3)
            if restart:
                tr.loader.set_stage(st)  # what a resume does: the readers start again at the same position
                tr.evaluate()  # and what a periodic evaluation does between two steps
            second = tr.train_step(st, 1e-3)
            params = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
            results.append((float(first), float(second), torch.get_rng_state(), params))
        finally:
            tr.loader.close()
            tr.logger.close()
            # train() would restore the signal handlers at its end; left installed, this pytest process and
            # every process it forks later (a multiprocessing pool's workers) would take SIGTERM as a
            # preemption request and never end on Pool.terminate()
            tr.preempt.close()
    (a1, a2, a_rng, a_params), (b1, b2, b_rng, b_params) = results
    assert a1 == b1
    assert a2 == b2, f"step 2's loss changed after a loader restart and an eval: {a2} vs {b2}"
    assert torch.equal(a_rng, b_rng), "the torch generator differs after a loader restart and an eval"
    for k in a_params:
        assert torch.equal(a_params[k], b_params[k]), k


@pytest.mark.slow
def test_library_calls_between_steps_leave_the_streams_alone(tmp_path, monkeypatch):
    """What the loop calls between two steps besides the loader: DeepSpeed's save and load, the EMA update and
    its swap for evaluation, an eval-mode forward, the BN averaging; and accelerate's start-up and prepare.
    None may draw from the global generators (a resumed run calls them at other steps)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator

    from pipeline.bn import averaged_bn_stats
    from pipeline.config import load_config
    from pipeline.ema import ModelEMA
    from pipeline.engine import Engine
    from pipeline.models import create_model

    cfg = load_config(REPO / "configs/pretrain/tiny_cpu.yaml", ["data.train=[unused]"])
    torch.manual_seed(0)
    engine = Engine.build(create_model("efficientnetv2_test", num_classes=10, drop_rate=0.3), cfg.train, cfg.optim,
                          micro_batch_size=16)
    ema = ModelEMA(engine.module, 0.99, gathered_parameters=engine.gathered_parameters)
    x = torch.randn(2, 3, 32, 32)

    def eval_forward():
        engine.eval()
        with torch.no_grad(), averaged_bn_stats(engine.module), ema.swapped():
            engine(x)
        engine.train()

    plain = create_model("efficientnetv2_test", num_classes=10)  # (initialising weights draws, of course)

    def accelerate_start():
        Accelerator(cpu=True).prepare(plain, torch.optim.SGD(plain.parameters(), lr=0.1))

    calls = {"engine.save": lambda: engine.save(tmp_path / "ckpt", "t", {"step": 1}),
             "engine.load": lambda: engine.load(tmp_path / "ckpt", "t"),
             "ema.update": lambda: ema.update(1), "eval forward with EMA swapped": eval_forward,
             "accelerate Accelerator + prepare": accelerate_start}
    for name, call in calls.items():
        before = _rng_states()
        call()
        assert _same(before, _rng_states()), f"{name} moved the global random generators"
    engine.train()
    before = _rng_states()
    engine(x)  # a training forward does draw (dropout): the check above can see a draw
    assert not _same(before, _rng_states())
