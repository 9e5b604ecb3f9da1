"""The demo's ablation (pipeline.demo_ablation): the arms as config overrides, the statistics, the reuse of
finished runs and the table, on fake runs (the real commands run in `make demo-ablation`)."""

import json
import math
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.demo import PRETRAIN_CONFIG
from pipeline.demo_ablation import (
    ARMS,
    REGULARIZATION,
    Commands,
    arm_overrides,
    format_mean_sd,
    mean_sd,
    print_table,
    run_ablation,
    run_one,
)
from pipeline.progressive import StageSchedule

SCHEDULED = ("randaug", "mixup", "dropout")  # what configs/demo/pretrain.yaml schedules


def _schedule(overrides=(), config=PRETRAIN_CONFIG):
    cfg = load_config(config, list(overrides))
    return StageSchedule.from_config(cfg.progressive, 300, default_dropout=cfg.model.drop_rate)


def _reg(stage):
    return {r: getattr(stage, r) for r in REGULARIZATION}


def test_demo_config_arms():
    cfg = load_config(PRETRAIN_CONFIG)
    arms = arm_overrides(cfg)
    assert list(arms) == [key for key, _ in ARMS]
    d = _schedule()
    first, last = d.stages[0], d.stages[-1]
    # the config really schedules these (else the ablation would compare equal arms)
    assert all(getattr(first, r) < getattr(last, r) for r in SCHEDULED)
    assert first.image_size < last.image_size

    assert arms["d-rising-reg"] == []
    assert arms["a-fixed"] == ["progressive.enabled=false"]
    a = _schedule(arms["a-fixed"])
    assert len(a) == 1 and a.stages[0].image_size == last.image_size and _reg(a.stages[0]) == _reg(last)

    b, c = _schedule(arms["b-final-reg"]), _schedule(arms["c-first-reg"])
    for arm in (b, c):  # progressive sizes as in (d)
        assert [s.image_size for s in arm] == [s.image_size for s in d]
    assert all(_reg(s) == _reg(last) for s in b)
    assert all(_reg(s) == _reg(first) for s in c)
    cfg_b = load_config(PRETRAIN_CONFIG, arms["b-final-reg"]).progressive
    cfg_c = load_config(PRETRAIN_CONFIG, arms["c-first-reg"]).progressive
    for r in SCHEDULED:
        assert getattr(cfg_b, f"min_{r}") == getattr(cfg_b, f"max_{r}") == getattr(cfg.progressive, f"max_{r}")
        assert getattr(cfg_c, f"min_{r}") == getattr(cfg_c, f"max_{r}") == getattr(cfg.progressive, f"min_{r}")
    # only what differs is overridden: cutmix (0 -> 0) and drop-path (not scheduled) are left alone
    assert not any("cutmix" in o or "drop_path" in o for o in arms["b-final-reg"] + arms["c-first-reg"])


def test_arms_cover_drop_path_cutmix_and_model_dropout():
    extra = ["progressive.min_cutmix=0.0", "progressive.max_cutmix=0.4", "progressive.min_drop_path=0.0",
             "progressive.max_drop_path=0.1", "model.drop_rate=0.3"]
    cfg = load_config(PRETRAIN_CONFIG, extra)
    arms = arm_overrides(cfg)
    d = _schedule(extra)
    first, last = d.stages[0], d.stages[-1]
    assert first.cutmix == 0.0 and last.cutmix == 0.4 and first.drop_path == 0.0 and last.drop_path == 0.1
    b, c = _schedule(extra + arms["b-final-reg"]), _schedule(extra + arms["c-first-reg"])
    assert all(_reg(s) == _reg(last) for s in b) and all(_reg(s) == _reg(first) for s in c)
    # without progressive learning the trainer would use model.drop_rate (0.3), not the final 0.2: (a) sets it
    assert "model.drop_rate=0.2" in arms["a-fixed"]
    a_cfg = load_config(PRETRAIN_CONFIG, extra + arms["a-fixed"])
    (a,) = StageSchedule.from_config(a_cfg.progressive, 300, default_dropout=a_cfg.model.drop_rate).stages
    assert _reg(a) == _reg(last)


def test_arms_follow_the_official_preset():
    # official: dropout is not scheduled (every stage at the maximum), so (c) keeps it at the maximum too
    extra = ["progressive.preset=official"]
    cfg = load_config(PRETRAIN_CONFIG, extra)
    d = _schedule(extra)
    c = _schedule(extra + arm_overrides(cfg)["c-first-reg"])
    assert all(_reg(s) == _reg(d.stages[0]) for s in c)
    assert c.stages[0].dropout == cfg.progressive.max_dropout


def test_arms_need_progressive_learning():
    with pytest.raises(ConfigError, match="progressive.enabled"):
        arm_overrides(load_config(PRETRAIN_CONFIG, ["progressive.enabled=false"]))


def test_mean_sd_formatting():
    m, sd, n = mean_sd([17.0, 18.0, 19.0])
    assert (m, sd, n) == (18.0, 1.0, 3)  # sample sd (n - 1)
    assert format_mean_sd([17.0, 18.0, 19.0], 1, "%") == "18.0 ± 1.0%"
    assert format_mean_sd([201.4, 198.9], 0) == "200 ± 2"
    assert format_mean_sd([16.4], 1, "%") == "16.4%"
    assert format_mean_sd([None, 16.4], 1, "%") == "16.4%"
    assert format_mean_sd([], 1, "%") == "-" and format_mean_sd([None]) == "-"
    assert math.isnan(mean_sd([1.0])[1])


# ------------------------------------------------------------------------------------------------ fake runs


def _fake_summary(top1=17.0, steps=1000):
    return {"step": steps, "total_steps": steps, "preempted": False,
            "stages": [{"image_size": 48, "randaug": 1.0, "mixup": 0.0, "cutmix": 0.0, "dropout": 0.05,
                        "drop_path": None, "steps": steps // 2, "seconds": 10.0},
                       {"image_size": 96, "randaug": 5.0, "mixup": 0.1, "cutmix": 0.0, "dropout": 0.2,
                        "drop_path": None, "steps": steps - steps // 2, "seconds": 20.0}],
            "eval": {"image_size": 96, "raw": {"samples": 1000, "top1": top1 - 0.5, "top5": 50.0},
                     "ema": {"samples": 1000, "top1": top1, "top5": 55.0}}}


def _fake_metrics(top1=58.0):
    return {"results": {"raw": {"samples": 240, "top1": top1 - 1, "top5": 100.0},
                        "ema": {"samples": 240, "top1": top1, "top5": 100.0}}}


class FakeCommands:
    """Writes what the real commands would, and counts the calls."""

    def __init__(self, top1=17.0, transfer=58.0):
        self.calls = []
        self.top1, self.transfer = top1, transfer
        self.commands = Commands(pretrain=self.pretrain, export=self.export, finetune=self.finetune)

    def pretrain(self, run_dir: Path, overrides):
        self.calls.append(("pretrain", run_dir.parent.name, tuple(overrides)))
        run_dir.mkdir(parents=True)
        seed = int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])
        (run_dir / "summary.json").write_text(json.dumps(_fake_summary(self.top1 + seed)))
        return 100.0 + seed

    def export(self, run_dir: Path, dest: Path):
        self.calls.append(("export", run_dir.parent.name))
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"x")

    def finetune(self, export: Path, ft_dir: Path, overrides):
        self.calls.append(("finetune", ft_dir.parent.name, tuple(overrides)))
        ft_dir.mkdir(parents=True)
        (ft_dir / "metrics.json").write_text(json.dumps(_fake_metrics(self.transfer)))


def test_run_one_runs_then_reuses(tmp_path):
    fake = FakeCommands()
    run_dir = tmp_path / "b-final-reg-seed1"
    rec = run_one(run_dir, ["progressive.min_randaug=5.0"], 1, fake.commands)
    assert [c[0] for c in fake.calls] == ["pretrain", "export", "finetune"]
    assert fake.calls[0][2] == ("progressive.min_randaug=5.0", "train.seed=1")
    assert fake.calls[2][2] == ("train.seed=1",)  # the fine-tuning runs under the same seed
    assert rec["wall_s"] == 101.0 and rec["train_s"] == 30.0 and rec["ema_top1"] == 18.0
    assert rec["ema_top5"] == 55.0 and rec["transfer_top1"] == 58.0 and rec["steps"] == 1000

    fake.calls.clear()
    assert run_one(run_dir, ["progressive.min_randaug=5.0"], 1, fake.commands) == rec
    assert fake.calls == []  # everything finished: nothing runs again, the recorded wall time is kept

    # an interrupted fine-tuning runs again on its own
    (run_dir / "finetune" / "metrics.json").unlink()
    run_one(run_dir, ["progressive.min_randaug=5.0"], 1, fake.commands)
    assert [c[0] for c in fake.calls] == ["finetune"]

    # an unfinished pretraining (no summary.json: a checkpoint only) starts again from step 0, and what follows it
    fake.calls.clear()
    (run_dir / "pretrain" / "summary.json").unlink()
    (run_dir / "pretrain" / "checkpoints").mkdir()
    run_one(run_dir, ["progressive.min_randaug=5.0"], 1, fake.commands)
    assert [c[0] for c in fake.calls] == ["pretrain", "export", "finetune"]
    assert not (run_dir / "pretrain" / "checkpoints").exists()

    # other settings (here: another step budget) never reuse a run
    fake.calls.clear()
    run_one(run_dir, ["progressive.min_randaug=5.0", "train.total_steps=30"], 1, fake.commands)
    assert [c[0] for c in fake.calls] == ["pretrain", "export", "finetune"]


def test_run_one_without_finetune(tmp_path):
    fake = FakeCommands()
    rec = run_one(tmp_path / "a-fixed-seed0", [], 0, fake.commands, finetune=False)
    assert [c[0] for c in fake.calls] == ["pretrain"] and "transfer_top1" not in rec


def test_ablation_table_and_results(tmp_path, capsys):
    cfg = load_config(PRETRAIN_CONFIG)
    fake = FakeCommands()
    results = run_ablation(tmp_path, cfg, 2, fake.commands, command="python -m pipeline.demo --ablation --seeds 2")
    pretrained = [c[1] for c in fake.calls if c[0] == "pretrain"]
    assert pretrained == ["a-fixed-seed0", "b-final-reg-seed0", "c-first-reg-seed0", "d-rising-reg-seed0",
                          "b-final-reg-seed1", "c-first-reg-seed1", "d-rising-reg-seed1", "a-fixed-seed1"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["seeds"] == [0, 1] and saved["steps"] == 1000 and saved["machine"]["cpus"]
    arm = saved["arms"]["c-first-reg"]
    assert arm["overrides"] == arm_overrides(cfg)["c-first-reg"]
    assert [r["seed"] for r in arm["runs"]] == [0, 1]
    assert arm["summary"]["ema_top1"]["mean"] == 17.5 and arm["summary"]["ema_top1"]["n"] == 2
    assert arm["summary"]["wall_s"]["sd"] == pytest.approx(math.sqrt(0.5))
    out = capsys.readouterr().out
    for _, title in ARMS:
        assert title in out
    row = next(line for line in out.splitlines() if line.strip().startswith("(d)") and "%" in line)
    assert "100 ± 1" in row and "17.5 ± 0.7%" in row and "55.0 ± 0.0%" in row and "58.0 ± 0.0%" in row
    assert "size 48/96px, RandAug 1/5" in out
    assert "CPUs, torch" in out and "; python -m pipeline.demo --ablation --seeds 2" in out

    # a rerun reuses everything and prints the same table
    fake.calls.clear()
    run_ablation(tmp_path, cfg, 2, fake.commands)
    assert fake.calls == []


def test_print_table_from_results(capsys):
    runs = [{"seed": s, "wall_s": 90.0 + s, "train_s": 80.0, "ema_top1": 16.0 + s, "ema_top5": 55.0,
             "stages": [{"image_size": 96, "randaug": 5.0, "mixup": 0.1, "cutmix": 0.0, "dropout": 0.2}]}
            for s in range(3)]
    results = {"steps": 1000, "ranks": 2, "seeds": [0, 1, 2],
               "arms": {"a-fixed": {"title": "(a) fixed", "overrides": ["progressive.enabled=false"], "runs": runs}}}
    print_table(results)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("(a) fixed") and "%" in line)
    # wall, train, EMA top-1, top-5, transfer (not run: '-')
    assert row.split()[2:] == ["91", "±", "1", "80", "±", "0", "17.0", "±", "1.0%", "55.0", "±", "0.0%", "-"]
    assert "progressive.enabled=false" in out and "size 96px, RandAug 5, mixup 0.1" in out
