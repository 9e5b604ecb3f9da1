"""EfficientNetV2 family: exact sizes, timm parity, runtime regularisation, checkpointing, errors, CLI."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import (
    DropPath,
    count_gmacs,
    count_params,
    create_model,
    list_models,
    load_timm_state_dict,
    timm_key_map,
    timm_model_options,
    to_timm_state_dict,
)
from pipeline.models.__main__ import main as models_cli

timm = pytest.importorskip("timm")

TINY = "efficientnetv2_test"


def tiny(**kw):
    torch.manual_seed(0)
    return create_model(TINY, num_classes=10, **kw)


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BN statistics and affine parameters, so parity tests exercise eps and the BN mapping."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


# ---- sizes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [
    ("efficientnetv2_s", 21_458_488),
    ("efficientnetv2_m", 54_139_356),
    ("efficientnetv2_l", 118_515_272),
    ("efficientnetv2_xl", 208_119_808),
])
def test_param_counts_exact(name, params):
    # The meta device runs the real constructor without allocating 800 MB for XL.
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert count_params(model) == params


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "s", "m"])
def test_param_counts_match_timm(variant):
    with torch.device("meta"):
        ours = create_model(f"efficientnetv2_{variant}")
        theirs = timm.create_model(f"tf_efficientnetv2_{variant}", pretrained=False)
    assert count_params(ours) == count_params(theirs)
    # Same structure, not only the same total: every timm tensor has a counterpart of the same shape.
    mapping = timm_key_map(ours)
    theirs_sd = theirs.state_dict()
    assert sorted(mapping.values()) == sorted(theirs_sd)
    for k, v in ours.state_dict().items():
        assert v.shape == theirs_sd[mapping[k]].shape, k


def test_registry_lists_all_variants():
    assert set(list_models()) == {f"efficientnetv2_{v}" for v in ("s", "m", "l", "xl", "b0", "b1", "b2", "b3", "test")}


def test_tiny_variant_has_both_block_types_and_residuals():
    from pipeline.models import FusedMBConv, MBConv

    model = tiny()
    blocks = list(model.blocks())
    assert all(len(stage) == 1 for stage in model.stages)
    assert any(isinstance(b, FusedMBConv) and b.has_residual for b in blocks)
    assert any(isinstance(b, FusedMBConv) and b.project is not None for b in blocks)
    assert any(isinstance(b, MBConv) and b.has_residual and b.se is not None for b in blocks)


def test_feature_and_head_shapes():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 48)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.forward_head(feats).shape == (2, 10)
    assert model.pretrained_cfg["architecture"] == TINY and model.pretrained_cfg["num_classes"] == 10
    assert model.default_cfg is model.pretrained_cfg


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    bound = 1 / 7 ** 0.5
    assert model.classifier.weight.abs().max() <= bound and model.classifier.bias.abs().max() == 0
    model.reset_classifier(0)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_init_follows_reference():
    model = create_model("efficientnetv2_b0")
    conv = model.stages[5][0].project.conv  # 1x1, 1152 -> 192: fan_out = 192
    assert conv.weight.std().item() == pytest.approx((2 / 192) ** 0.5, rel=0.02)
    dw = model.stages[5][0].dw.conv  # depthwise 3x3: fan_out = 9
    assert dw.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.02)
    assert model.classifier.weight.abs().max().item() <= 1 / 1000 ** 0.5
    assert model.stages[5][0].se.reduce.bias.abs().max() == 0


def test_options_reach_every_layer():
    model = create_model(TINY, bn_eps=1e-5, bn_momentum=0.01, padding="same")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 and m.momentum == 0.01 for m in bns)
    # TF SAME padding: output side = ceil(input / stride), odd inputs included.
    assert model.eval().forward_features(torch.randn(1, 3, 33, 33)).shape[-1] == 2
    assert create_model("efficientnetv2_s").pretrained_cfg["test_input_size"] == (3, 384, 384)


# ---- forward / backward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_forward_backward_finite_grads(precision):
    model = tiny(drop_path_rate=0.2).train()
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    if precision == "bf16":
        assert logits.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # The gradients point downhill: one SGD step lowers the loss on this batch (regularisation off, so
    # both losses see the same network).
    model.set_regularization(dropout=0.0, drop_path=0.0)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        before = F.cross_entropy(model(x).float(), y)
    before.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            after = F.cross_entropy(model(x).float(), y)
    assert after < before


# ---- timm parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timm_name,size", [("efficientnetv2_s", 64), ("tf_efficientnetv2_b0", 64),
                                            ("tf_efficientnetv2_b0", 57)])
def test_timm_parity_eval_logits(timm_name, size):
    torch.manual_seed(0)
    theirs = timm.create_model(timm_name, pretrained=False).eval()
    randomize_bn(theirs)
    name, options = timm_model_options(timm_name)
    ours = create_model(name, **options).eval()
    result = load_timm_state_dict(ours, theirs.state_dict())
    assert result.loaded == len(theirs.state_dict()) and result.kept == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref, out = theirs(x), ours(x)
    assert ref.abs().max() > 0.1  # not a degenerate comparison
    assert (out - ref).abs().max().item() < 1e-4


def test_same_padding_matters_for_tf_weights():
    """The parity above is not an accident of padding: symmetric padding with tf_ weights gives other logits."""
    torch.manual_seed(0)
    theirs = timm.create_model("tf_efficientnetv2_b0", pretrained=False).eval()
    ours = create_model("efficientnetv2_b0", padding="symmetric").eval()
    load_timm_state_dict(ours, theirs.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() > 1e-3


def test_timm_parity_train_mode_gradients():
    torch.manual_seed(0)
    theirs = timm.create_model("efficientnetv2_s", pretrained=False, drop_rate=0.0, drop_path_rate=0.0).train()
    ours = create_model("efficientnetv2_s", drop_rate=0.0, drop_path_rate=0.0, bn_eps=1e-5).train()
    load_timm_state_dict(ours, theirs.state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    F.cross_entropy(theirs(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    mapping = timm_key_map(ours)
    theirs_params = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[mapping[k]].grad, rtol=1e-4, atol=1e-6)
    theirs_buffers = dict(theirs.named_buffers())
    for k, b in ours.named_buffers():  # BN running statistics updated the same way
        torch.testing.assert_close(b, theirs_buffers[mapping[k]], rtol=1e-5, atol=1e-6)


def test_export_to_timm_round_trip():
    torch.manual_seed(0)
    ours = create_model("efficientnetv2_b0", padding="same").eval()
    randomize_bn(ours)
    theirs = timm.create_model("tf_efficientnetv2_b0", pretrained=False).eval()
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-4


def test_timm_import_accepts_wrapper_prefixes_and_ignored_classifier():
    src = tiny().eval()
    sd = {f"module._orig_mod.{k}": v for k, v in to_timm_state_dict(src).items()}
    dst = create_model(TINY, num_classes=10)
    load_timm_state_dict(dst, sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst.eval()(x))

    other = create_model(TINY, num_classes=5)
    with pytest.raises(ValueError, match=r"classifier\.weight \(10, 64\) vs ours \(5, 64\).*ignore_classifier"):
        load_timm_state_dict(other, sd)
    result = load_timm_state_dict(other, sd, ignore_classifier=True)
    assert set(result.kept) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(other.stem.conv.weight, src.stem.conv.weight)


def test_timm_import_names_missing_and_unexpected_keys():
    sd = to_timm_state_dict(tiny())
    broken = dict(sd)
    del broken["blocks.3.0.se.conv_reduce.weight"]
    broken["blocks.9.0.conv_pw.weight"] = torch.zeros(1)
    dst = tiny()
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError) as err:
        load_timm_state_dict(dst, broken)
    msg = str(err.value)
    assert "1 missing key(s): blocks.3.0.se.conv_reduce.weight" in msg
    assert "1 unexpected key(s): blocks.9.0.conv_pw.weight" in msg
    # Nothing was copied on failure.
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k

    with torch.device("meta"):
        b1 = timm.create_model("tf_efficientnetv2_b1", pretrained=False)
    with pytest.raises(ValueError, match="does not fit efficientnetv2_b0.*unexpected key"):
        load_timm_state_dict(create_model("efficientnetv2_b0"), {k: torch.zeros(v.shape) for k, v in
                                                                  b1.state_dict().items()})
    with pytest.raises(ValueError, match=r"checkpoint\['state_dict'\]"):
        load_timm_state_dict(dst, {"state_dict": sd, "epoch": 3})


def test_timm_model_options():
    assert timm_model_options("tf_efficientnetv2_xl.in21k_ft_in1k") == (
        "efficientnetv2_xl", {"padding": "same", "bn_eps": 1e-3})
    assert timm_model_options("efficientnetv2_s") == ("efficientnetv2_s", {"padding": "symmetric", "bn_eps": 1e-5})
    with pytest.raises(ValueError, match="no counterpart"):
        timm_model_options("efficientnetv2_rw_s")


# ---- runtime regularisation -------------------------------------------------------------------------------

def test_drop_path_unit():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    branch, shortcut = torch.ones(4000, 2, 1, 1), torch.zeros(4000, 2, 1, 1)
    out = dp(branch, shortcut)
    per_sample = out[:, 0, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # whole samples dropped, survivors scaled by 1/keep
    assert torch.equal(out[:, 0], out[:, 1])
    assert per_sample.mean().item() == pytest.approx(1.0, abs=0.06)  # unbiased in expectation
    assert torch.equal(dp.eval()(branch, shortcut), branch + shortcut)


def test_set_regularization_changes_live_model():
    model = tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    x = torch.randn(8, 3, 32, 32)
    # Train-mode BN is deterministic: without dropout / drop path two forwards agree exactly.
    assert torch.equal(model(x), model(x))

    model.set_regularization(dropout=0.5)
    assert model.head_drop.p == 0.5 and model.drop_rate == 0.5
    assert not torch.equal(model(x), model(x))

    model.set_regularization(dropout=0.0, drop_path=0.6)
    blocks = list(model.blocks())
    assert [b.drop_path.p for b in blocks] == pytest.approx([0.6 * i / len(blocks) for i in range(len(blocks))])
    assert not torch.equal(model(x), model(x))  # stochastic depth alone changes train outputs

    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_regularization(dropout=0.7, drop_path=0.9)
        assert torch.equal(model(x), ref)  # eval mode is unaffected by either rate

    with pytest.raises(ValueError, match="dropout"):
        model.set_regularization(dropout=1.0)
    with pytest.raises(ValueError, match="drop_path"):
        model.set_regularization(drop_path=-0.1)


# ---- checkpointing, memory format, compile ----------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_grad_checkpointing_same_gradients_and_bn_stats(granularity):
    ref = tiny(drop_path_rate=0.5).train()
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True, granularity)
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 10, (4,))
    for model in (ref, ckpt):
        torch.manual_seed(123)  # same dropout / drop-path draws: checkpoint() replays the RNG on recompute
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The recompute does not update BN running statistics a second time.
    for (name, b), c in zip(ref.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, msg=name)


def test_grad_checkpointing_option_and_errors():
    assert create_model(TINY, grad_checkpointing="stage").grad_checkpointing == "stage"
    assert create_model(TINY, grad_checkpointing=True).grad_checkpointing == "block"
    assert create_model(TINY, grad_checkpointing="none").grad_checkpointing is None
    with pytest.raises(ValueError, match="granularity"):
        tiny().set_grad_checkpointing(True, "layer")


def test_channels_last_keeps_parameters_contiguous():
    """channels_last is a layout of the activations: the parameters keep the default layout, so DeepSpeed's
    start-up broadcast (every parameter as ``p.data.view(torch.uint8)``) works; a channels_last 3x3 weight
    fails that view ("self.stride(-1) must be 1 to view Float as Byte")."""
    model = create_model(TINY, channels_last=True)
    assert model.channels_last
    for name, p in model.named_parameters():
        assert p.is_contiguous(), name
        p.data.view(torch.uint8)  # what deepspeed.initialize does to each parameter
    with pytest.raises(RuntimeError, match="stride"):
        model.stem.conv.weight.detach().contiguous(memory_format=torch.channels_last).view(torch.uint8)


def test_channels_last_same_outputs_and_gradients():
    ref, cl = tiny(), tiny(channels_last=True)
    for (name, a), b in zip(ref.state_dict().items(), cl.state_dict().values()):
        assert torch.equal(a, b), name  # same initial weights: the flag changes no parameter
    x = torch.randn(4, 3, 48, 48)
    for mode in (False, True):
        outs = []
        for model in (cl, ref):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)  # same dropout / drop-path draws in train mode
            out = model.train(mode)(x)
            out.square().mean().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        for (name, p), q in zip(ref.named_parameters(), cl.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)
            assert q.grad.is_contiguous(), name  # the gradient follows the parameter's layout


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_activations_stay_nhwc(channels_last):
    """With contiguous weights, a channels_last input is enough for the conv kernels (cuDNN on GPUs; oneDNN and
    the native im2col path that takes the 1x1 convs here) to run NHWC: every conv / BN / SiLU / block output in
    the network is channels_last, and none is without the flag; the parameters' gradients keep the parameters'
    (contiguous) layout."""
    model = tiny(channels_last=channels_last).train()
    layouts: dict[str, bool] = {}

    def record(name):
        def hook(module, args, out):
            # (B, C, 1, 1) or (B, 1, H, W) is both layouts at once: only the unambiguous ones count
            if out.dim() == 4 and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
                layouts[name] = out.is_contiguous(memory_format=torch.channels_last)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.SiLU)) or m in set(model.blocks()):
            m.register_forward_hook(record(name))
    x = torch.randn(2, 3, 64, 64, requires_grad=True)  # the loader's NCHW batch
    feats = model.forward_features(x)
    feats.mean().backward()
    assert len(layouts) > 40 and feats.shape[-1] == 2
    assert all(v == channels_last for v in layouts.values()), {k: v for k, v in layouts.items() if v != channels_last}
    assert feats.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert all(p.grad.is_contiguous() for p in model.parameters() if p.grad is not None)


def _compare_training_step(model, compiled_model, compiled):
    # 64 px, batch 8: at 1x1 final resolution with 2 samples, train-mode BN is too ill-conditioned to compare.
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8)
    loss_e = F.cross_entropy(model(x), y)
    loss_c = F.cross_entropy(compiled(x), y)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    # Some BN biases have gradient 0 in exact arithmetic (a train-mode BN follows after a 1x1 conv), so compare
    # against the overall gradient scale rather than each tensor's own.
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)
    for (name, b), c in zip(model.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    compiled_model = copy.deepcopy(model)
    _compare_training_step(model, compiled_model, torch.compile(compiled_model))


@pytest.mark.slow
def test_torch_compile_with_grad_checkpointing():
    """The compiled path of checkpoint() (no custom context_fn under Dynamo): same gradients, and BN running
    statistics updated once. aot_eager traces exactly like inductor but skips C++ code generation."""
    model = tiny(drop_rate=0.0, drop_path_rate=0.0).train()
    compiled_model = copy.deepcopy(model)
    compiled_model.set_grad_checkpointing(True, "block")
    _compare_training_step(model, compiled_model, torch.compile(compiled_model, backend="aot_eager"))


# ---- bad input --------------------------------------------------------------------------------------------

def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as err:
        create_model("efficientnetv2_xxl")
    assert "efficientnetv2_xxl" in str(err.value)
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize("kwargs,option", [
    (dict(padding="valid"), "padding"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(num_classes=-1), "num_classes"),
    (dict(num_classes=10.0), "num_classes"),
    (dict(bn_eps=0.0), "bn_eps"),
    (dict(bn_momentum=0.0), "bn_momentum"),
    (dict(bn_momentum=0.99), None),  # Keras-convention 0.99 is a legal (if odd) PyTorch momentum
    (dict(grad_checkpointing="layer"), "grad_checkpointing"),
    (dict(channels_last="yes"), "channels_last"),
    (dict(in_chans=0), "in_chans"),
    (dict(bn_epsilon=1e-3), "bn_epsilon"),
])
def test_bad_options_name_the_option(kwargs, option):
    if option is None:
        create_model(TINY, **kwargs)
        return
    with pytest.raises(ValueError, match=option):
        create_model(TINY, **kwargs)


# ---- summary CLI ------------------------------------------------------------------------------------------

def test_summary_cli_s_at_384(capsys):
    assert models_cli(["summary", "efficientnetv2_s", "--image-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "21,458,488" in out
    gmacs = float(next(line for line in out.splitlines() if line.startswith("GMACs")).split()[1])
    assert abs(gmacs - 8.44) / 8.44 < 0.015  # timm's published figure
    assert gmacs == pytest.approx(8.366, abs=0.001)  # FlopCounterMode on timm's model (reference section 2)


def test_summary_cli_num_classes_list_and_errors(capsys):
    assert models_cli(["summary", "efficientnetv2_s", "--num-classes", "21843"]) == 0
    out = capsys.readouterr().out
    assert "48,158,371" in out  # 48.158M with the 21k head (reference section 2)
    assert "image size     384" in out  # default: the eval size
    assert models_cli(["list"]) == 0
    assert "efficientnetv2_xl" in capsys.readouterr().out
    assert models_cli(["summary", "efficientnetv2_q"]) == 2
    assert "known models" in capsys.readouterr().err


def test_count_gmacs_real_equals_meta():
    real = tiny()
    with torch.device("meta"):
        meta = create_model(TINY, num_classes=10)
    assert count_gmacs(real, 64) == pytest.approx(count_gmacs(meta, 64), rel=1e-9) and count_gmacs(real, 64) > 0
    assert real.training  # restored after counting
