"""Stage controller: the reference's preset numbers, stage boundaries, options, run configs and the CLI."""

import dataclasses
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, ProgressiveConfig, TrainConfig, load_config
from pipeline.progressive import Stage, StageSchedule, build_schedule, main, model_presets, resolve_total_steps


def schedule(variant, preset, total=1000, **overrides):
    cfg = ProgressiveConfig(**{**model_presets(variant, preset), **overrides})
    return StageSchedule.from_config(cfg, total)


def column(sched, name):
    return [getattr(s, name) for s in sched.stages]


def test_official_l_matches_released_code():
    s = schedule("l", "official")
    assert column(s, "image_size") == [192, 256, 320, 384]
    assert column(s, "randaug") == pytest.approx([5, 10, 15, 20])
    assert column(s, "mixup") == pytest.approx([0, 0.5 / 3, 1.0 / 3, 0.5])
    assert column(s, "cutmix") == pytest.approx([0, 0.5 / 3, 1.0 / 3, 0.5])
    assert column(s, "dropout") == [0.4] * 4  # not scheduled in the released code


def test_official_s_and_m():
    s = schedule("s", "official")
    assert column(s, "image_size") == [171, 214, 257, 300]
    assert column(s, "randaug") == pytest.approx([5, 5 + 5 / 3, 5 + 10 / 3, 10])
    assert column(s, "mixup") == [0, 0, 0, 0]
    assert column(s, "dropout") == [0.2] * 4
    m = schedule("m", "official")
    assert column(m, "image_size") == [192, 256, 320, 384]
    assert column(m, "mixup") == pytest.approx([0, 0.2 / 3, 0.4 / 3, 0.2])


def test_paper_s_and_l_match_table_6():
    s = schedule("s", "paper")
    assert column(s, "image_size") == [128, 185, 242, 300]  # int() of 128 + 172 * i / 3
    assert column(s, "randaug") == pytest.approx([5, 5 + 10 / 3, 5 + 20 / 3, 15])
    assert column(s, "dropout") == pytest.approx([0.1, 0.1 + 0.2 / 3, 0.1 + 0.4 / 3, 0.3])
    assert column(s, "mixup") == [0, 0, 0, 0]
    lg = schedule("l", "paper")
    assert column(lg, "image_size") == [128, 212, 296, 380]
    assert column(lg, "randaug") == pytest.approx([5, 5 + 20 / 3, 5 + 40 / 3, 25])
    assert column(lg, "mixup") == pytest.approx([0, 0.4 / 3, 0.8 / 3, 0.4])
    assert column(lg, "cutmix") == [0, 0, 0, 0]
    assert column(lg, "dropout") == pytest.approx([0.1, 0.1 + 0.4 / 3, 0.1 + 0.8 / 3, 0.5])
    assert model_presets("xl", "paper") == model_presets("l", "paper")
    assert model_presets("efficientnetv2_xl", "official") == model_presets("l", "official")


@pytest.mark.parametrize("total", [4, 7, 10, 999, 1000, 1001, 186_329, 10**12 + 3])
def test_boundaries_are_int_of_fraction_of_total(total):
    s = schedule("s", "paper", total=total)
    assert column(s, "end_step") == [(i + 1) * total // 4 for i in range(4)]
    if total < 2**40:  # the reference's float formula agrees where floats are exact enough
        assert column(s, "end_step") == [int((i + 1) / 4 * total) for i in range(4)]
    assert column(s, "start_step") == [0] + column(s, "end_step")[:3]


def test_stage_at_boundaries():
    s = schedule("l", "official", total=1000)
    assert [s.stage_at(k).index for k in (0, 249, 250, 499, 500, 749, 750, 999)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert s.stage_at(1000).index == 3 and s.stage_at(10**9).index == 3  # past the end: the last stage
    odd = schedule("s", "paper", total=10)  # ends at 2, 5, 7, 10
    assert [odd.stage_at(k).index for k in range(11)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert s.stage_at(500) == s.stage_at(500) and s.stage_at(500).image_size == 320
    with pytest.raises(ValueError, match="step must be >= 0"):
        s.stage_at(-1)


def test_stage_at_is_a_pure_function_of_the_step():
    total = 977
    a, b = schedule("m", "paper", total=total), schedule("m", "paper", total=total)
    steps = list(range(0, total + 5))
    forward = [a.stage_at(k) for k in steps]
    backward = [b.stage_at(k) for k in reversed(steps)][::-1]
    assert forward == backward
    for st in a.stages:
        assert a.stage_at(st.start_step) == st and a.stage_at(st.end_step - 1) == st


def test_disabled_is_one_stage_at_max_values():
    cfg = ProgressiveConfig(**{**model_presets("l", "paper"), "enabled": False})
    s = StageSchedule.from_config(cfg, 500)
    assert len(s) == 1
    st = s.stages[0]
    assert (st.start_step, st.end_step, st.image_size, st.randaug, st.mixup, st.dropout) == (0, 500, 380, 25, 0.4, 0.5)
    s2 = StageSchedule.from_config(cfg, 500, default_dropout=0.4)
    assert s2.stages[0].dropout == 0.4  # the model's own dropout when progressive learning is off


def test_size_multiple_rounds_down():
    s = schedule("l", "paper", size_multiple=16)
    assert column(s, "image_size") == [128, 208, 288, 368]
    s8 = schedule("s", "official", size_multiple=8)
    assert column(s8, "image_size") == [168, 208, 256, 296]


def test_drop_path_and_micro_batch_per_stage():
    s = schedule("s", "paper", min_drop_path=0.0, max_drop_path=0.3, stage_micro_batch=[256, 128, 64, 32])
    assert column(s, "drop_path") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert column(s, "micro_batch_size") == [256, 128, 64, 32]
    o = schedule("s", "official", min_drop_path=0.0, max_drop_path=0.3)
    assert column(o, "drop_path") == [0.3] * 4  # official: regularization other than RandAugment / mix fixed
    assert column(schedule("s", "paper"), "drop_path") == [None] * 4
    assert column(schedule("s", "paper"), "micro_batch_size") == [None] * 4


def test_bad_inputs_fail_with_the_key():
    with pytest.raises(ConfigError, match="progressive.stage_micro_batch"):
        schedule("s", "paper", stage_micro_batch=[64, 32])
    with pytest.raises(ConfigError, match="smaller than progressive.num_stages"):
        schedule("s", "paper", total=3)
    with pytest.raises(ConfigError, match="total steps is 0"):
        schedule("s", "paper", total=0)
    with pytest.raises(ConfigError, match="progressive.preset"):
        StageSchedule.from_config(ProgressiveConfig(preset="papr"), 100)
    with pytest.raises(ValueError, match="no progressive preset"):
        model_presets("b0")


def test_single_stage_and_many_stages():
    one = schedule("s", "paper", num_stages=1)
    assert column(one, "image_size") == [300] and one.stages[0].end_step == 1000
    six = schedule("s", "official", num_stages=6, total=600)
    assert column(six, "end_step") == [100, 200, 300, 400, 500, 600]
    assert column(six, "image_size")[-1] == 300 and column(six, "randaug")[0] == 5


def test_format_table_lists_every_stage():
    s = schedule("l", "official", total=1000, stage_micro_batch=[64, 48, 32, 16])
    text = s.format_table(global_batch_size=4096)
    lines = text.splitlines()
    assert "image" in lines[0] and "RandAug" in lines[0] and "dropout" in lines[0] and "images" in lines[0]
    rows = lines[2:6]
    assert [r.split()[0] for r in rows] == ["0", "1", "2", "3"]
    for row, size in zip(rows, (192, 256, 320, 384)):
        assert f"{size}px" in row
    assert "0.167" in rows[1] and "15.00" in rows[2] and "1.02M" in rows[0]  # 250 steps x 4096 images
    assert "4.10M images" in lines[-1]


def test_build_schedule_alias_and_stage_is_frozen():
    s = build_schedule(ProgressiveConfig(), 100)
    assert s.stages == StageSchedule.from_config(ProgressiveConfig(), 100).stages
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.stages[0].image_size = 1  # type: ignore[misc]
    assert isinstance(s.stages[0], Stage) and s.stages[0].num_steps == 25


def test_a_plain_stage_needs_only_its_steps_and_size():
    """What the loader reads has defaults: no RandAugment, no mixing, the model's drop-path, the run's micro-batch."""
    st = Stage(index=0, start_step=0, end_step=1, image_size=64)
    assert (st.randaug, st.mixup, st.cutmix, st.dropout) == (0.0, 0.0, 0.0, 0.0)
    assert st.drop_path is None and st.micro_batch_size is None


def test_resolve_total_steps():
    assert resolve_total_steps(TrainConfig(total_steps=123), None) == 123
    assert resolve_total_steps(TrainConfig(epochs=60, global_batch_size=4096), 12_720_000) == 186_329
    with pytest.raises(ConfigError, match="train.epochs"):
        resolve_total_steps(TrainConfig(), 1000)
    with pytest.raises(ConfigError, match="training-set size is unknown"):
        resolve_total_steps(TrainConfig(epochs=1), None)


@pytest.mark.parametrize("name,variant,preset", [
    ("s_in21k", "s", "paper"), ("m_in21k", "m", "paper"), ("l_in21k", "l", "paper"), ("xl_in21k", "xl", "paper"),
    ("s_in1k", "s", "official"), ("m_in1k", "m", "official"), ("l_in1k", "l", "official"),
])
def test_run_configs_carry_the_model_presets(repo_root, name, variant, preset):
    cfg = load_config(repo_root / "configs" / "pretrain" / f"{name}.yaml")
    assert cfg.model.name == f"efficientnetv2_{variant}"
    got = {k: getattr(cfg.progressive, k) for k in model_presets(variant, preset)}
    assert got == model_presets(variant, preset)
    text = (repo_root / "configs" / "pretrain" / f"{name}.yaml").read_text()
    assert f"follows the {preset.upper()} preset" in text


def test_cli_prints_the_table_for_xl_in21k(repo_root, subprocess_env):
    out = subprocess.run([sys.executable, "-m", "pipeline.progressive", "configs/pretrain/xl_in21k.yaml"],
                         cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "efficientnetv2_xl" in text and "preset 'paper'" in text
    assert "12,720,000 samples" in text  # 60 epochs of the 21k training set (shards not on this machine)
    for size in ("128px", "212px", "296px", "380px"):
        assert size in text
    assert "25.00" in text and "0.400" in text and "0.500" in text


def test_cli_in_process_overrides_and_errors(capsys, repo_root):
    cfg = str(repo_root / "configs" / "pretrain" / "s_in1k.yaml")
    assert main([cfg, "train.total_steps=400", "progressive.size_multiple=16"]) == 0
    text = capsys.readouterr().out
    assert "0-100" in text and "160px" in text and "208px" in text and "288px" in text
    assert main([cfg, "train.epochs=1", "--train-samples", "8192"]) == 2  # 2 steps < 4 stages
    assert "smaller than progressive.num_stages" in capsys.readouterr().err
    assert main([cfg, "train.epochs=0"]) == 2
    assert "train.total_steps and train.epochs are both 0" in capsys.readouterr().err


def test_cli_takes_the_sample_count_from_info_json(tmp_path, capsys, repo_root):
    import json

    from pipeline.data.shards import FORMAT, SUPPORTED_VERSIONS

    info = {"format": FORMAT, "version": SUPPORTED_VERSIONS[0], "num_classes": 10, "classes": [],
            "splits": {"train": {"samples": 3000, "shards": [{"name": "train-000000.tar", "samples": 1000},
                                                             {"name": "train-000001.tar", "samples": 2000}]}}}
    (tmp_path / "info.json").write_text(json.dumps(info))
    cfg = str(repo_root / "configs" / "pretrain" / "s_in21k.yaml")
    assert main([cfg, f"data.train=[{tmp_path}]", "train.epochs=10", "train.global_batch_size=100"]) == 0
    out = capsys.readouterr().out
    assert "3,000 samples (info.json)" in out and "= 300" in out and "0-75" in out
    (tmp_path / "info.json").write_text("{not json")
    assert main([cfg, f"data.train=[{tmp_path}]"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
