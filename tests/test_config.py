"""The run config: closed choices refused by the schema, each section checking itself once, the model section
taking its defaults and checks from the model library, configs/base.yaml generated from the dataclasses, and
the frozen-settings hash that existing checkpoints store."""

import dataclasses
import json
import typing

import pytest
from omegaconf import OmegaConf

from pipeline import config as C
from pipeline.config import (
    BASE_CONFIG,
    CONFIG_DIR,
    Config,
    ConfigError,
    DataConfig,
    EMAConfig,
    ModelConfig,
    OptimConfig,
    ProgressiveConfig,
    TrainConfig,
    frozen_settings,
    load_config,
    settings_hash,
    to_dict,
    validate,
)
from pipeline.models import DEFAULT_DROP_PATH_RATE, LayerOptions, create_model
from pipeline.optim import SCHEDULES

# ---- the frozen-settings hash (stored in every checkpoint marker) ----------------------------------------

def test_settings_hash_of_the_default_and_a_shipped_config_is_unchanged():
    """Pinned to what the code gave before the closed choices became Literal fields: a checkpoint written
    then must still resume (its marker stores this hash and these values)."""
    default = load_config()
    assert settings_hash(frozen_settings(default)) == "656bf422bfbe4468"
    assert settings_hash(frozen_settings(Config())) == "656bf422bfbe4468"
    xl = load_config(CONFIG_DIR / "pretrain" / "xl_in21k.yaml")
    assert settings_hash(frozen_settings(xl)) == "9d8e2bc89c0abcfd"
    assert frozen_settings(default) == {
        "model.name": "efficientnetv2_s", "model.num_classes": 0, "train.total_steps": 0, "train.epochs": 0.0,
        "train.global_batch_size": 4096, "train.seed": 0, "progressive.enabled": True, "progressive.preset": "paper",
        "progressive.num_stages": 4, "progressive.min_image_size": 128, "progressive.max_image_size": 300,
        "optim.name": "rmsprop_tf", "optim.schedule": "cosine", "data.train": []}


def test_choices_stay_plain_values():
    cfg = load_config(None, ["optim.name=adamw", "train.zero_stage=3", "model.padding=same"])
    assert type(cfg.optim.name) is str and type(cfg.model.padding) is str and type(cfg.train.zero_stage) is int
    assert f"{cfg.optim.name}" == "adamw" and json.dumps(cfg.train.zero_stage) == "3"
    assert "  name: adamw\n" in C.to_yaml(cfg) and "  zero_stage: 3\n" in C.to_yaml(cfg)


# ---- closed choices: refused by the schema at load time ---------------------------------------------------

def _closed_choices():
    for section in C.SECTIONS:
        cls = type(getattr(Config(), section))
        for name, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.Literal:
                yield f"{section}.{name}", typing.get_args(hint)


CLOSED = dict(_closed_choices())


def test_the_closed_choices_are_literal_fields():
    assert set(CLOSED) == {"model.padding", "model.grad_checkpointing", "progressive.preset", "optim.name",
                           "optim.schedule", "train.precision", "train.zero_stage", "finetune.init_weights",
                           "finetune.export_weights", "finetune.export_format", "data.decoder", "data.worker_start"}
    assert CLOSED["train.zero_stage"] == (0, 1, 2, 3)
    assert C.choices(OptimConfig, "schedule") == SCHEDULES


@pytest.mark.parametrize("key", sorted(CLOSED))
def test_a_value_outside_a_choice_is_refused_naming_key_source_and_choices(key):
    bad = 7 if key == "train.zero_stage" else "bogus"
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={bad}"])
    msg = str(e.value)
    assert f"override '{key}={bad}'" in msg and f"key '{key}'" in msg
    assert all(repr(v) in msg for v in CLOSED[key]), msg


def test_a_bad_choice_in_a_run_file_names_the_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  precision: fp16\n")
    with pytest.raises(ConfigError, match=rf"{run}: key 'train.precision': .*'bf16_weights'"):
        load_config(run)


def test_a_bool_is_not_a_zero_stage():
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(None, ["train.zero_stage=true"])
    with pytest.raises(ConfigError, match="train.zero_stage: True is not one of 0 / 1 / 2 / 3"):
        TrainConfig(zero_stage=True)


def test_sections_built_in_python_refuse_a_bad_choice_too():
    with pytest.raises(ConfigError, match="optim.name: 'sgd' is not one of rmsprop_tf / adamw / lamb"):
        OptimConfig(name="sgd")
    with pytest.raises(ConfigError, match="progressive.preset: 'papr'"):
        ProgressiveConfig(preset="papr")
    with pytest.raises(ConfigError, match="finetune.export_weights"):
        C.FinetuneConfig(export_weights="best")


# ---- each section checks its own rules once; Config the rules that span sections --------------------------

@pytest.mark.parametrize("build,key", [
    (lambda: ProgressiveConfig(num_stages=0), "progressive.num_stages"),
    (lambda: ProgressiveConfig(min_image_size=400), "progressive.min_image_size"),
    (lambda: ProgressiveConfig(size_multiple=0), "progressive.size_multiple"),
    (lambda: ProgressiveConfig(stage_micro_batch=[8, 8]), "progressive.stage_micro_batch"),
    (lambda: ProgressiveConfig(min_drop_path=0.1), "progressive.min_drop_path"),
    (lambda: DataConfig(mean=[0.5]), "data.mean"),
    (lambda: DataConfig(crop_area=[0.5, 0.1]), "data.crop_area"),
    (lambda: DataConfig(train=["a"], train_weights=[1.0, 2.0]), "data.train_weights"),
    (lambda: DataConfig(max_bad_fraction=2.0), "data.max_bad_fraction"),
    (lambda: OptimConfig(betas=[0.9]), "optim.betas"),
    (lambda: OptimConfig(warmup_epochs=-1.0), "optim.warmup_steps / optim.warmup_epochs"),
    (lambda: OptimConfig(clip_grad_norm=-1.0), "optim.clip_grad_norm"),
    (lambda: TrainConfig(micro_batch_size=0), "train.global_batch_size"),
    (lambda: EMAConfig(decay=1.0), "ema.decay"),
    (lambda: Config(deepspeed={"fp16": {"enabled": True}}), "deepspeed: 'fp16' comes from train.precision"),
    (lambda: Config(deepspeed={"zero_optimization": {"stage": 3}}), "deepspeed.zero_optimization.stage=3"),
])
def test_each_rule_is_checked_when_the_section_is_built(build, key):
    with pytest.raises(ConfigError) as e:
        build()
    assert str(e.value).startswith(key), str(e.value)


def test_load_config_reports_a_section_rule():
    with pytest.raises(ConfigError, match="progressive.stage_micro_batch: has 1 entries for 4 stages"):
        load_config(None, ["progressive.stage_micro_batch=[8]"])


def test_validate_checks_a_config_changed_after_it_was_built():
    cfg = load_config()
    validate(cfg)
    cfg.data.crop_area = [0.5, 0.1]
    with pytest.raises(ConfigError, match="data.crop_area"):
        validate(cfg)
    cfg = load_config()
    cfg.deepspeed = {"train_batch_size": 8}
    with pytest.raises(ConfigError, match="'train_batch_size' comes from train.global_batch_size"):
        validate(cfg)


# ---- the model section: the model library's defaults and checks ------------------------------------------

def test_model_defaults_come_from_the_model_library():
    m = ModelConfig()
    assert (m.padding, m.bn_eps, m.bn_momentum) == (LayerOptions.padding, LayerOptions.bn_eps,
                                                    LayerOptions.bn_momentum)
    assert m.drop_path_rate == DEFAULT_DROP_PATH_RATE and m.drop_rate is None  # None: the variant's own
    model = create_model("efficientnetv2_test", **C.model_options(m))
    assert model.opts == LayerOptions()
    assert model.drop_rate == model.pretrained_cfg["drop_rate"]


@pytest.mark.parametrize("override,message", [
    ("model.name=efficientnetv2_xxl", "model.name: unknown model 'efficientnetv2_xxl'; known models: "),
    ("model.bn_eps=0", "model.bn_eps=0.0: expected a float > 0"),
    ("model.bn_momentum=0", "model.bn_momentum=0.0: expected 0 < momentum <= 1"),
    ("model.drop_rate=1.0", "model.drop_rate=1.0: expected a probability"),
    ("model.drop_path_rate=-0.1", "model.drop_path_rate=-0.1: expected a probability"),
    ("model.num_classes=-1", "model.num_classes=-1: expected an int >= 0"),
])
def test_model_section_is_checked_by_the_model_code_at_load_time(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message), str(e.value)


def test_create_model_without_a_config_still_checks_its_choices():
    with pytest.raises(ValueError, match="padding='bogus': expected one of"):
        create_model("efficientnetv2_test", padding="bogus")
    with pytest.raises(ValueError, match="padding='bogus'"):
        LayerOptions(padding="bogus")
    with pytest.raises(ValueError, match="grad_checkpointing='layer'"):
        create_model("efficientnetv2_test", grad_checkpointing="layer")


# ---- configs/base.yaml is generated from the dataclasses --------------------------------------------------

def test_base_yaml_is_the_generated_text():
    assert BASE_CONFIG.read_text() == C.base_yaml(), \
        "configs/base.yaml differs from the dataclasses: run python -m pipeline.config --write-base"
    assert C.main(["--check-base"]) == 0


def test_base_yaml_holds_every_key_with_its_default():
    loaded = OmegaConf.to_container(OmegaConf.load(BASE_CONFIG))
    assert loaded == to_dict(Config())
    assert to_dict(load_config()) == to_dict(Config())


def test_base_yaml_comments_are_the_docstrings():
    text = C.base_yaml()
    assert ("  # Dropout before the classifier; None uses the variant's default (S 0.2, M 0.3, L/XL 0.4).\n"
            "  # With progressive learning the stage table overrides it per stage.\n"
            "  drop_rate: null\n") in text
    assert "# Optimizer, learning-rate schedule, weight decay and clipping.\noptim:\n" in text
    assert "  mean: [0.5, 0.5, 0.5]\n" in text and "\ndeepspeed: {}\n" in text
    assert "python -m pipeline.config --write-base" in text.splitlines()[2]


def test_every_section_is_in_base_yaml_in_schema_order():
    keys = list(OmegaConf.to_container(OmegaConf.load(BASE_CONFIG)))
    assert keys == [f.name for f in dataclasses.fields(Config)]
    assert C.SECTIONS == ("model", "progressive", "data", "optim", "ema", "checkpoint", "eval", "train", "finetune")
