"""DeepSpeed engine (pipeline/engine.py) and BN across ranks (pipeline/bn.py): the generated config, error
messages, checkpoint helpers; ZeRO 0-3 on 1 and 2 CPU ranks through tests/ds_worker.py (training, save /
load, universal checkpoints, micro-batch changes, BN averaging)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import ds_launch
from pipeline import bn as bn_mod
from pipeline.bn import average_bn_stats, bn_stat_tensors, convert_sync_bn
from pipeline.config import ConfigError, OptimConfig, TrainConfig
from pipeline.engine import (
    DEFAULT_REDUCE_BUCKET,
    accumulation_steps,
    build_ds_config,
    consolidate_fp32_state_dict,
    convert_to_universal,
    is_universal_checkpoint,
    saved_world_size,
    saved_zero_stage,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def ds_config(train=None, optim=None, passthrough=None, **kw):
    kw.setdefault("micro_batch_size", 32)
    kw.setdefault("world_size", 8)
    kw.setdefault("device_type", "cpu")
    return build_ds_config(train or TrainConfig(), optim or OptimConfig(), passthrough, **kw)


# ------------------------------------------------------------------------------------------------ config


def test_batch_sizes_and_accumulation():
    cfg = ds_config(TrainConfig(global_batch_size=4096, micro_batch_size=32), world_size=8)
    assert cfg["train_batch_size"] == 4096
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["gradient_accumulation_steps"] == 16
    # the micro-batch of the current stage, not train.micro_batch_size
    assert ds_config(TrainConfig(global_batch_size=4096), micro_batch_size=128)["gradient_accumulation_steps"] == 4


def test_indivisible_batch_names_keys_and_suggests_values():
    with pytest.raises(ConfigError) as e:
        accumulation_steps(4096, 48, 8)
    msg = str(e.value)
    assert "train.global_batch_size=4096" in msg and "train.micro_batch_size=48" in msg
    assert "[32, 64]" in msg  # divisors of the 512 samples per rank around 48
    assert "3840" in msg and "4224" in msg  # global batches that divide by 48 x 8
    with pytest.raises(ConfigError, match="progressive.stage_micro_batch=24"):
        accumulation_steps(4096, 24, 8, micro_key="progressive.stage_micro_batch")
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        accumulation_steps(4096, 32, 3)
    assert accumulation_steps(4096, 64, 8) == 8


def test_clipping_stage_and_quiet_logging():
    cfg = ds_config(TrainConfig(zero_stage=3), OptimConfig(clip_grad_norm=1.5))
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": DEFAULT_REDUCE_BUCKET}
    assert cfg["steps_per_print"] >= 10 ** 12 and cfg["wall_clock_breakdown"] is False
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "checkpoint" not in cfg
    assert ds_config(load_universal=True)["checkpoint"] == {"load_universal": True}
    assert ds_config(TrainConfig(zero_stage=0))["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("precision,device,expect", [
    ("auto", "cpu", "fp32"), ("auto", "cuda", "autocast"), ("fp32", "cuda", "fp32"), ("bf16", "cpu", "autocast"),
    ("bf16_weights", "cuda", "bf16"),
])
def test_precision(precision, device, expect):
    cfg = ds_config(TrainConfig(precision=precision), device_type=device)
    if expect == "fp32":
        assert "torch_autocast" not in cfg and "bf16" not in cfg
    elif expect == "autocast":
        assert cfg["torch_autocast"]["enabled"] is True and cfg["torch_autocast"]["dtype"] == "bfloat16"
        assert cfg["torch_autocast"]["lower_precision_safe_modules"] == []
        assert "bf16" not in cfg
    else:
        assert cfg["bf16"] == {"enabled": True} and "torch_autocast" not in cfg
        assert cfg["data_types"] == {"buffer_dtype": "bf16"}  # BN statistics follow the weights


def test_config_keys_are_the_ones_deepspeed_reads():
    """Our dict parsed by DeepSpeed's own config class (the key names of deepspeed 0.19.8 and later)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = ds_config(TrainConfig(precision="auto", zero_stage=2, global_batch_size=64), device_type="cuda",
                    micro_batch_size=4, world_size=1, load_universal=True)
    parsed = DeepSpeedConfig(cfg)  # no process group: DeepSpeed assumes one rank
    assert parsed.torch_autocast_enabled is True
    assert parsed.torch_autocast_dtype == torch.bfloat16
    assert parsed.torch_autocast_lower_precision_safe_modules == []
    assert parsed.train_batch_size == 64 and parsed.gradient_accumulation_steps == 16
    assert parsed.zero_optimization_stage == 2
    assert parsed.zero_config.reduce_bucket_size == DEFAULT_REDUCE_BUCKET
    assert parsed.load_universal_checkpoint is True
    bf16 = DeepSpeedConfig(ds_config(TrainConfig(precision="bf16_weights", global_batch_size=64),
                                     micro_batch_size=4, world_size=1))
    assert bf16.bfloat16_config.enabled is True and bf16.torch_autocast_enabled is False


def test_passthrough_is_deep_merged():
    extra = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 10 ** 6},
             "torch_autocast": {"lower_precision_safe_modules": ["torch.nn.modules.conv.Conv2d"]},
             "communication_data_type": "fp32"}
    cfg = ds_config(TrainConfig(zero_stage=2, precision="bf16"), passthrough=extra)
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                        "reduce_bucket_size": 10 ** 6}
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                     "lower_precision_safe_modules": ["torch.nn.modules.conv.Conv2d"]}
    assert cfg["communication_data_type"] == "fp32"
    assert extra["zero_optimization"] == {"offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 10 ** 6}


def test_passthrough_may_not_override_our_keys():
    with pytest.raises(ConfigError, match="train_batch_size.*train.global_batch_size"):
        ds_config(passthrough={"train_batch_size": 8})
    with pytest.raises(ConfigError, match="gradient_clipping.*optim.clip_grad_norm"):
        ds_config(passthrough={"gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match="train.zero_stage"):
        ds_config(TrainConfig(zero_stage=2), passthrough={"zero_optimization": {"stage": 3}})


def test_lamb_with_zero_is_refused():
    with pytest.raises(ConfigError, match="optim.name=lamb"):
        ds_config(TrainConfig(zero_stage=1), OptimConfig(name="lamb"))
    assert ds_config(TrainConfig(zero_stage=0), OptimConfig(name="lamb"))["zero_optimization"]["stage"] == 0


# ----------------------------------------------------------------------------------- checkpoint helpers


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_saved_stage_and_world_size_from_file_names(tmp_path):
    _touch(tmp_path / "z0", "mp_rank_00_model_states.pt")
    _touch(tmp_path / "z2", "mp_rank_00_model_states.pt", *[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                                                            for r in range(4)])
    _touch(tmp_path / "z3", *[f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(2)
                              for k in ("model", "optim")])
    assert (saved_zero_stage(tmp_path, "z0"), saved_world_size(tmp_path, "z0")) == (0, None)
    assert (saved_zero_stage(tmp_path, "z2"), saved_world_size(tmp_path, "z2")) == (2, 4)
    assert (saved_zero_stage(tmp_path, "z3"), saved_world_size(tmp_path, "z3")) == (3, 2)
    assert not is_universal_checkpoint(tmp_path / "z2")
    (tmp_path / "u" / "zero").mkdir(parents=True)
    assert is_universal_checkpoint(tmp_path / "u")


def test_convert_errors(tmp_path):
    """Rank 0's error, with its own type (every rank raises the same; see distributed.on_rank0)."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_to_universal(tmp_path, "step-1", tmp_path / "out")
    _touch(tmp_path / "step-0", "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="stage-0 checkpoint"):
        convert_to_universal(tmp_path, "step-0", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        consolidate_fp32_state_dict(tmp_path, "step-9")


def test_cli_reports_errors_in_one_line(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "pipeline.engine", "to-universal", str(tmp_path), "step-5"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ BN


def bn_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, affine=False))


def test_bn_stats_listed_and_averaging_is_a_noop_without_group():
    model = bn_model()
    assert len(bn_stat_tensors(model)) == 4
    assert average_bn_stats(model) == 0


def test_convert_sync_bn_keeps_statistics(monkeypatch):
    model = bn_model()
    model.train()
    model(torch.randn(4, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_bn(model, device_type="cpu")  # no process group: allowed
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 2
    for k, v in converted.state_dict().items():
        assert torch.equal(v, before[k]), k
    # several CPU ranks: refused before the first forward could fail
    monkeypatch.setattr(bn_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(bn_mod.dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ConfigError, match="train.sync_bn"):
        convert_sync_bn(bn_model(), device_type="cpu")


# -------------------------------------------------------------------------------- DeepSpeed, 1 and 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains(ds_runs, world, stage):
    res = ds_launch.results(ds_runs[world])
    assert res["world_size"] == world
    losses = res[f"z{stage}_losses"]
    assert len(losses) == 8 and all(v == v for v in losses)  # no NaN
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2, losses
    norms = res[f"z{stage}_grad_norms"]
    assert all(n is not None and n > 0 for n in norms), norms


@pytest.mark.slow
def test_stages_and_world_sizes_compute_the_same_thing(ds_runs):
    """Same global batches, same micro-batch composition: ZeRO stages and rank counts agree closely."""
    ref = ds_launch.results(ds_runs[1])["z0_losses"]
    for world in (1, 2):
        res = ds_launch.results(ds_runs[world])
        for stage in range(4):
            assert res[f"z{stage}_losses"] == pytest.approx(ref, rel=1e-4), (world, stage)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_save_load_round_trip(ds_runs, world, stage):
    """A fresh engine with other initial weights loads the checkpoint and continues bit for bit."""
    res = ds_launch.results(ds_runs[world])
    assert res[f"z{stage}_client_state"] == {"step": 8, "note": "hello"}
    assert res[f"z{stage}_client_has_uc_info"]
    assert res[f"z{stage}_resumed"] == res[f"z{stage}_continue"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_set_lr_reaches_the_optimizer(ds_runs, world, stage):
    res = ds_launch.results(ds_runs[world])
    assert res[f"z{stage}_lr_zero_keeps_weights"]
    assert res[f"z{stage}_lr_reported"] == 0.0
    assert res[f"z{stage}_saved_world_size"] == (None if stage == 0 else world)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_consolidated_state_dict_is_the_model(ds_runs, stage):
    """consolidate_fp32_state_dict gives the module's exact weights and its (rank-averaged) BN buffers."""
    out = ds_runs[2]
    full = torch.load(out / f"consolidated_z{stage}.pt", weights_only=False)
    params = torch.load(out / f"params_z{stage}.pt", weights_only=False)
    for k, v in params.items():
        assert torch.equal(full[k], v), k
    assert {"1.running_mean", "1.running_var", "4.running_mean"} <= set(full)


@pytest.mark.slow
def test_universal_checkpoint_two_ranks_to_one(ds_runs):
    res = ds_launch.results(ds_runs[1])
    assert res["universal_saved_world"] == 2
    assert res["universal_client_step"] == 8
    assert res["universal_weights_maxdiff"] == 0.0
    # the optimizer state came along: the next steps match the 2-rank run's continuation
    two = ds_launch.results(ds_runs[2])
    assert res["universal_continue"] == pytest.approx(two["z2_continue"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [2, 3])
def test_micro_batch_change_keeps_the_global_batch(ds_runs, world, stage):
    res = ds_launch.results(ds_runs[world])
    per_rank = 16 // world
    assert res[f"micro_z{stage}_one_big_gas"] == [1, 1]
    assert res[f"micro_z{stage}_small_gas"] == [per_rank // 2] * 2
    assert res[f"micro_z{stage}_changed_gas"] == [1, per_rank // 4]
    assert res[f"micro_z{stage}_moved"] > 1e-3  # two real steps were taken
    assert res[f"micro_z{stage}_small_maxdiff"] < 1e-6
    assert res[f"micro_z{stage}_changed_maxdiff"] < 1e-6


@pytest.mark.slow
def test_bn_statistics_averaged_across_ranks(ds_runs):
    res = ds_launch.results(ds_runs[2])
    assert res["bn_differ_before"], "the ranks' BN statistics should differ before averaging"
    assert res["bn_tensors_averaged"] == 4
    assert res["bn_close_to_mean"] and res["bn_equal_after"]


@pytest.mark.slow
def test_bf16_autocast_trains_with_fp32_weights(ds_runs):
    """DeepSpeed accepts the torch_autocast section (bf16 autocast works on CPU too); weights stay fp32."""
    res = ds_launch.results(ds_runs[1])
    assert res["bf16_param_dtype"] == "torch.float32"
    fp32 = res["z2_losses"][:3]
    assert res["bf16_losses"] != fp32  # bf16 arithmetic really ran
    assert res["bf16_losses"] == pytest.approx(fp32, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_weights_train_and_export_fp32_master(ds_runs, stage):
    res = ds_launch.results(ds_runs[1])
    assert res[f"bf16w_z{stage}_dtypes"] == ["torch.bfloat16", "torch.int64"]  # BN statistics too
    losses = res[f"bf16w_z{stage}_losses"]
    assert all(v == v for v in losses) and losses == pytest.approx(res["z2_losses"][:3], rel=0.1)
    assert res[f"bf16w_z{stage}_consolidated_fp32_master"]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_channels_last_parameters_are_made_contiguous(ds_runs, world, stage):
    """deepspeed.initialize broadcasts each parameter as a byte view, which a channels_last conv weight
    refuses; the engine hands DeepSpeed contiguous parameters, logs it once (rank 0), and nothing changes in
    what is computed."""
    res = ds_launch.results(ds_runs[world])
    key = f"cl_z{stage}"
    assert res[f"{key}_channels_last_before"] == 2  # both 3x3 conv weights of the worker's model
    assert len(res[f"{key}_messages"]) == 1 and "made 2 parameter(s) contiguous" in res[f"{key}_messages"][0]
    if world == 2:
        assert ds_launch.results(ds_runs[2], rank=1)[f"{key}_messages"] == []
    assert res[f"{key}_contiguous_after"]
    assert res[f"{key}_losses"] == pytest.approx(res[f"z{stage}_losses"][:2], rel=1e-5)
    if stage == 0:  # DeepSpeed keeps the module's own tensors
        assert res[f"{key}_storages"] == res[f"{key}_params"]
    elif stage in (1, 2):  # views of one flat buffer per param group: a parameter layout cannot survive
        assert res[f"{key}_storages"] == res[f"{key}_param_groups"] < res[f"{key}_params"]
