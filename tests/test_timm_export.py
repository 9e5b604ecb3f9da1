"""Exports that timm reads (``--format timm``: timm's hub layout, ``timm.create_model("local-dir:DIR",
pretrained=True)``), the loader for both kinds of folder (``pipeline.export.load_model``), and model creation from
a timm name (``create_model_from_timm``; the warning of ``load_timm_state_dict``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_for_hf

from pipeline import finetune_lib as fl
from pipeline.config import ModelConfig
from pipeline.export import (
    ExportError,
    load_model,
    model_from_export,
    save_exports,
    save_timm_export,
    timm_config,
    timm_eval_crop,
    timm_export_dir,
)
from pipeline.models import (
    create_model,
    create_model_from_timm,
    load_timm_state_dict,
    nearest_timm_variant,
    timm_model_args,
    timm_variant_of,
)
from pretrain_launch import env as launch_env
from pretrain_launch import write_demo_shards
from test_models import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
SIZE = 64
NUM_CLASSES = 10
CLASSES = [{"index": i, "wnid": f"n{1000 + i:08d}", "name": f"class {i}"} for i in range(NUM_CLASSES)]


def _meta(eval_size: int = SIZE, threshold: int = 320, classes=CLASSES) -> dict:
    return {"classes": classes, "image_size": {"train": eval_size, "eval": eval_size}, "mean": [0.5] * 3,
            "std": [0.5] * 3, "eval_crop_threshold": threshold, "source": {"run_dir": "test", "weights": "raw"}}


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- the timm folder: timm builds our model from it ------------------------------------------------------

# (our model and options, the timm model config.json names, the arguments it adds)
CASES = [
    ("efficientnetv2_s", {"bn_eps": 1e-5}, "efficientnetv2_s", {}),
    ("efficientnetv2_s", {"padding": "same"}, "tf_efficientnetv2_s", {}),
    ("efficientnetv2_s", {}, "efficientnetv2_s", {"bn_eps": 1e-3}),  # our defaults: timm's S with our eps
    ("efficientnetv2_b0", {}, "tf_efficientnetv2_b0", {"pad_type": ""}),  # timm has B0 only as a tf_ model
]


@pytest.mark.parametrize("name,options,timm_name,extra", CASES,
                         ids=["s-eps1e-5", "tf_s", "s-defaults", "b0-symmetric"])
def test_timm_builds_our_model_from_the_folder(tmp_path, name, options, timm_name, extra):
    torch.manual_seed(0)
    ours = create_model(name, num_classes=NUM_CLASSES, **options).eval()
    randomize_bn(ours)
    out = save_timm_export(ours, _meta(), tmp_path / "timm")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == timm_name and cfg["num_classes"] == NUM_CLASSES and cfg["num_features"] == 1280
    assert cfg["model_args"] == {"num_classes": NUM_CLASSES, "in_chans": 3, **extra}
    assert cfg["label_names"] == [c["wnid"] for c in CLASSES]
    assert cfg["label_descriptions"] == {c["wnid"]: c["name"] for c in CLASSES}

    theirs = timm.create_model("local-dir:" + str(out), pretrained=True)
    x = _batch()
    _assert_same_logits(_logits(ours, x), _logits(theirs, x))
    pc = theirs.pretrained_cfg  # what timm read from our config.json
    assert tuple(pc["input_size"]) == (3, SIZE, SIZE) and pc["interpolation"] == "bilinear"
    assert tuple(pc["mean"]) == (0.5, 0.5, 0.5) and tuple(pc["std"]) == (0.5, 0.5, 0.5)
    assert pc["crop_mode"] == "center" and math.isclose(pc["crop_pct"], SIZE / (SIZE + 32))
    assert list(pc["label_names"]) == cfg["label_names"] and pc["num_classes"] == NUM_CLASSES

    back, meta = load_model(out)  # and the other direction: our model from the timm folder
    assert (back.opts.padding, back.opts.bn_eps) == (ours.opts.padding, ours.opts.bn_eps)
    assert torch.equal(_logits(back, x), _logits(ours, x))
    assert meta["format"] == "timm" and meta["classes"] == CLASSES and meta["eval_crop_threshold"] == 320
    assert meta["architecture"]["name"] == name and meta["timm"]["architecture"] == timm_name


def test_eval_crop_rule_as_timm_applies_it():
    """Below data.eval_crop_threshold: a centre square of S / (S + 32) of the short side (timm: resize the short
    side to S + 32, crop S); at or above it the whole image squashed to S x S."""
    for s in range(8, 600):
        pct, mode = timm_eval_crop(s, 320)
        if s < 320:
            assert mode == "center" and math.floor(s / pct) == s + 32, s
        else:
            assert (pct, mode) == (1.0, "squash")
    assert timm_eval_crop(224, 320) == (0.875, "center")
    with torch.device("meta"):
        model = create_model("efficientnetv2_s", num_classes=NUM_CLASSES, bn_eps=1e-5)
    for size, resize, crop in ((288, 320, 288), (384, (384, 384), 384)):
        meta = dict(_meta(size), architecture={"name": "efficientnetv2_s", "num_classes": NUM_CLASSES,
                                               "options": {"bn_eps": 1e-5, "padding": "symmetric"}})
        pcfg = timm_config(meta, num_features=model.num_features)["pretrained_cfg"]
        steps = create_transform(**resolve_data_config(pretrained_cfg=pcfg)).transforms
        assert steps[0].size == resize and list(steps[1].size) == [crop, crop], steps
        assert steps[0].interpolation.value == "bilinear"


def test_timm_writer_round_trip_and_foreign_folders(tmp_path):
    """push_to_hf_hub cannot run offline; it writes with save_for_hf, which keeps what our config.json says
    (our eps, the crop), and load_model reads such a folder written by timm itself."""
    torch.manual_seed(0)
    ours = create_model("efficientnetv2_b0", num_classes=NUM_CLASSES).eval()  # -> tf_ b0 with pad_type ''
    randomize_bn(ours)
    ours_dir = save_timm_export(ours, _meta(), tmp_path / "ours")
    theirs = timm.create_model("local-dir:" + str(ours_dir), pretrained=True).eval()
    save_for_hf(theirs, str(tmp_path / "hub"), safe_serialization=True)
    hub_cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub_cfg["architecture"] == "tf_efficientnetv2_b0" and hub_cfg["model_args"]["pad_type"] == ""
    assert hub_cfg["pretrained_cfg"]["crop_mode"] == "center"
    again = timm.create_model("local-dir:" + str(tmp_path / "hub"), pretrained=True)
    back, meta = load_model(tmp_path / "hub")  # a folder timm wrote: no effnetv2_export block
    x = _batch()
    ref = _logits(ours, x)
    _assert_same_logits(ref, _logits(again, x))
    assert torch.equal(_logits(back, x), ref)
    assert meta["format"] == "timm" and meta["image_size"] == {"train": SIZE, "eval": SIZE}
    assert meta["architecture"] == {"name": "efficientnetv2_b0", "num_classes": NUM_CLASSES,
                                    "options": {"bn_eps": 1e-3, "bn_momentum": 0.1, "padding": "symmetric"}}


def test_both_formats_and_state_dict_input(tmp_path):
    """save_exports('both') from a state dict (what the CLI and the fine-tuner pass): ours in the folder, timm's
    beside it; load_model reads each to the same model."""
    torch.manual_seed(1)
    src = create_model("efficientnetv2_b0", num_classes=3, padding="same").eval()
    randomize_bn(src)
    classes = [{"index": i, "wnid": None, "name": n} for i, n in enumerate(("cat", "dog", "fish"))]
    arch = {"name": "efficientnetv2_b0", "num_classes": 3,
            "options": {"bn_eps": 1e-3, "bn_momentum": 0.1, "padding": "same"}}
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    outs = save_exports(state, dict(_meta(classes=classes), architecture=arch), tmp_path / "export", "both")
    assert outs == {"ours": tmp_path / "export", "timm": tmp_path / "export_timm"}
    assert timm_export_dir(tmp_path / "export") == tmp_path / "export_timm"
    cfg = json.loads((tmp_path / "export_timm" / "config.json").read_text())
    assert cfg["label_names"] == ["cat", "dog", "fish"] and "label_descriptions" not in cfg
    x = _batch()
    ref = _logits(src, x)
    for folder in outs.values():
        model, meta = load_model(folder)
        assert torch.equal(_logits(model, x), ref) and meta["classes"] == classes
    _assert_same_logits(ref, _logits(timm.create_model("local-dir:" + str(outs["timm"]), pretrained=True), x))


def test_refusals(tmp_path):
    with torch.device("meta"):
        tiny = create_model("efficientnetv2_test", num_classes=4)
    with pytest.raises(ExportError, match="efficientnetv2_test has no timm counterpart"):
        save_timm_export(tiny, _meta(), tmp_path / "t")
    with pytest.raises(ExportError, match="neither an export folder"):
        load_model(tmp_path)
    with pytest.raises(ExportError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(fl.FinetuneError, match="finetune.export_format=timm: timm has no variant"):
        fl.check_export_format(ModelConfig(name="efficientnetv2_test"), "timm")
    fl.check_export_format(ModelConfig(name="efficientnetv2_test"), "ours")


def test_timm_names_of_our_models():
    assert timm_variant_of("efficientnetv2_m", "symmetric", 1e-5) == "efficientnetv2_m"
    assert timm_variant_of("efficientnetv2_m", "same", 1e-3) == "tf_efficientnetv2_m"
    assert timm_variant_of("efficientnetv2_m", "symmetric", 1e-3) is None
    assert timm_variant_of("efficientnetv2_b2", "symmetric", 1e-5) is None
    assert nearest_timm_variant("efficientnetv2_b2", "symmetric") == "tf_efficientnetv2_b2"
    assert nearest_timm_variant("efficientnetv2_test", "same") is None
    assert timm_model_args("efficientnetv2_xl", "same", 1e-5, 0.01) == (
        "tf_efficientnetv2_xl", {"bn_eps": 1e-5, "bn_momentum": 0.01})


# ---- create_model_from_timm and the warning ----------------------------------------------------------------

@pytest.mark.parametrize("timm_name", ["efficientnetv2_s", "tf_efficientnetv2_s"])
def test_create_model_from_timm_matches_timm(timm_name):
    torch.manual_seed(0)
    theirs = timm.create_model(timm_name, num_classes=NUM_CLASSES).eval()
    randomize_bn(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right options: no warning
        ours = create_model_from_timm(timm_name, theirs.state_dict())
    assert ours.num_classes == NUM_CLASSES  # from the state dict's classifier
    x = _batch()
    _assert_same_logits(_logits(theirs, x), _logits(ours, x))


def test_loading_into_a_model_no_timm_variant_matches_warns():
    """Our default eps 1e-3 with timm's efficientnetv2_s weights (eps 1e-5): other logits, and a warning that
    names both sets of options and the way out."""
    torch.manual_seed(0)
    theirs = timm.create_model("efficientnetv2_s", num_classes=NUM_CLASSES).eval()
    randomize_bn(theirs)
    ours = create_model("efficientnetv2_s", num_classes=NUM_CLASSES)
    with pytest.warns(UserWarning, match=r"efficientnetv2_s with padding='symmetric', bn_eps=0\.001, which matches "
                                         r"no timm variant: timm's efficientnetv2_s uses padding='symmetric', "
                                         r"bn_eps=1e-05.*create_model_from_timm\('efficientnetv2_s'"):
        load_timm_state_dict(ours, theirs.state_dict())
    x = _batch()
    assert (_logits(ours, x) - _logits(theirs, x)).abs().max() > 1e-3


def test_finetune_timm_init_builds_the_timm_variant(tmp_path):
    """The fine-tuner's timm-file init: model.name's timm variant with its eps (config: ours, 1e-3); the
    backbone computes what timm's does."""
    torch.manual_seed(0)
    theirs = timm.create_model("efficientnetv2_s", num_classes=NUM_CLASSES).eval()
    randomize_bn(theirs)
    path = tmp_path / "timm.safetensors"
    save_file(theirs.state_dict(), str(path))
    init = fl.load_init(fl.classify_init(str(path)))
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fl.build_model(init, ModelConfig(name="efficientnetv2_s", channels_last=False), CLASSES[:3],
                               head_seed=True, log=lines.append)
    assert model.opts.bn_eps == 1e-5 and model.classifier.out_features == 3
    assert "model.bn_eps: using efficientnetv2_s's 1e-05 (config: 0.001)" in lines
    assert any("as efficientnetv2_s (padding='symmetric', bn_eps=1e-05)" in m for m in lines), lines
    x = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), theirs.forward_features(x), rtol=1e-5,
                                   atol=1e-5)


# ---- a real pretraining run: raw and EMA exports through the command --------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Generated shards: 4 classes, 32 train / 8 val images of 48 px."""
    return write_demo_shards(tmp_path_factory.mktemp("timm_shards") / "shards", classes=4, per_class=8,
                             val_per_class=2, image_size=48, shard_size=16)


@pytest.fixture(scope="module")
def s_run(tmp_path_factory, shards) -> Path:
    """A 3-step DeepSpeed (ZeRO-2, CPU) pretraining run of efficientnetv2_s (our default options) at 32 px, with
    EMA."""
    run = tmp_path_factory.mktemp("timm_export") / "run"
    cmd = [PY, "-m", "pipeline.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml", f"data.train=[{shards}]",
           f"train.run_dir={run}", "train.total_steps=3", "progressive.num_stages=1", "ema.enabled=true",
           "model.name=efficientnetv2_s", "progressive.min_image_size=32", "progressive.max_image_size=32",
           "data.eval_image_size=32"]
    res = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run


@pytest.mark.slow
def test_export_command_raw_and_ema_logits_equal_timms(s_run, tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = {}
    for weights in ("raw", "ema"):
        out = tmp_path / weights
        cmd = [PY, "-m", "pipeline.export", str(s_run), "--format", "both", "--out", str(out)]
        res = subprocess.run(cmd + (["--ema"] if weights == "ema" else []), cwd=REPO, env=launch_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert f"to {out} and {out}_timm" in res.stdout
        ours, meta = model_from_export(out)
        cfg = json.loads((tmp_path / f"{weights}_timm" / "config.json").read_text())
        assert cfg["architecture"] == "efficientnetv2_s" and cfg["model_args"]["bn_eps"] == 1e-3
        assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["num_classes"] == 4
        assert cfg["effnetv2_export"]["source"]["weights"] == weights == meta["source"]["weights"]
        theirs = timm.create_model("local-dir:" + str(tmp_path / f"{weights}_timm"), pretrained=True)
        got[weights] = _logits(ours, x)
        _assert_same_logits(got[weights], _logits(theirs, x))
        back, _ = load_model(tmp_path / f"{weights}_timm")
        assert torch.equal(_logits(back, x), got[weights])
    assert not torch.allclose(got["raw"], got["ema"])  # two different sets of weights were exported


@pytest.mark.slow
def test_finetune_from_a_timm_file_exports_both_formats(shards, tmp_path):
    """A 2-step fine-tuning run from a tf_efficientnetv2_b0 file with model.name=efficientnetv2_b0 (config padding
    'symmetric'): the model is built as timm's variant ('same' padding), and finetune.export_format=both writes
    RUN/export and RUN/export_timm, which timm loads with the same logits as ours."""
    torch.manual_seed(0)
    save_file(timm.create_model("tf_efficientnetv2_b0").state_dict(), str(tmp_path / "b0.safetensors"))
    run = tmp_path / "run"
    cmd = [PY, "-m", "pipeline.finetune", "--config", "configs/finetune/demo.yaml",
           f"init={tmp_path / 'b0.safetensors'}", f"data.train=[{shards}]", f"train.run_dir={run}",
           "model.name=efficientnetv2_b0", "finetune.export_format=both", "progressive.min_image_size=32",
           "progressive.max_image_size=32", "data.eval_image_size=32", "data.cutout=0", "train.total_steps=2",
           "checkpoint.every_steps=0"]
    res = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "model.padding: using tf_efficientnetv2_b0's 'same' (config: 'symmetric')" in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["export"] == str(run / "export") and metrics["export_timm"] == str(run / "export_timm")
    ours, meta = model_from_export(run / "export")
    assert ours.opts.padding == "same" and meta["eval_crop_threshold"] == 0
    cfg = json.loads((run / "export_timm" / "config.json").read_text())
    assert cfg["architecture"] == "tf_efficientnetv2_b0" and cfg["model_args"] == {"num_classes": 4, "in_chans": 3}
    assert cfg["pretrained_cfg"]["crop_mode"] == "squash"  # data.eval_crop_threshold 0: the whole image
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = timm.create_model("local-dir:" + str(run / "export_timm"), pretrained=True)
    _assert_same_logits(_logits(ours, x), _logits(theirs, x))
