"""Optimizers against timm's, weight-decay groups, learning-rate schedules (pipeline/optim.py)."""

import math

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, OptimConfig
from pipeline.optim import (
    Lamb,
    RMSpropTF,
    build_optimizer,
    lr_at,
    lr_schedule,
    param_groups,
    peak_lr,
    set_lr,
    warmup_steps_from,
)

timm_optim = pytest.importorskip("timm.optim")


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvBN(nn.Module):
    """Conv without bias + BN, a biased conv, a linear head, and a tensor listed in no_weight_decay()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 3)
        self.pos = nn.Parameter(torch.zeros(1, 6, 1, 1))
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)

    def no_weight_decay(self):
        return {"pos"}

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))) + self.pos
        x = self.conv2(x).mean((2, 3))
        return self.head(x)


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_no_decay_on_bn_bias_and_listed():
    model = ConvBN()
    groups = param_groups(model, weight_decay=1e-5)
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay["params"]) == ["conv.weight", "conv2.weight", "head.weight"]
    assert _names(model, no_decay["params"]) == ["bn.bias", "bn.weight", "conv2.bias", "head.bias", "pos"]
    # frozen parameters are not optimised at all
    assert "frozen" not in _names(model, decay["params"] + no_decay["params"])


def test_param_groups_drops_empty_group():
    groups = param_groups(nn.BatchNorm2d(4), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def _train(make_opt, steps=6, lrs=(0.05, 0.02, 0.08, 0.05, 0.01, 0.03)):
    """A few steps on ConvBN with a changing lr (lr_in_momentum matters then); returns the final weights."""
    torch.manual_seed(0)
    model = ConvBN()
    opt = make_opt(param_groups(model, weight_decay=0.01))
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        set_lr(opt, lrs[i])
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("momentum,lr_in_momentum", [(0.9, True), (0.9, False), (0.0, True)])
def test_rmsprop_tf_matches_timm(momentum, lr_in_momentum):
    ours = _train(lambda g: RMSpropTF(g, lr=0.05, alpha=0.9, eps=1e-3, momentum=momentum,
                                      lr_in_momentum=lr_in_momentum))
    ref = _train(lambda g: timm_optim.RMSpropTF(g, lr=0.05, alpha=0.9, eps=1e-3, momentum=momentum,
                                                lr_in_momentum=lr_in_momentum))
    start = {n: p.detach() for n, p in ConvBN().named_parameters()}
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # the comparison is not vacuous: the weights moved
    assert any((ours[n] - start[n]).abs().max() > 1e-3 for n in ours)


def test_rmsprop_tf_first_step_closed_form():
    """TF semantics on one step: ms starts at 1, eps inside the sqrt, lr inside the momentum."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    g = torch.tensor([0.03, -0.1, 0.2])
    opt = RMSpropTF([p], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.01)
    p.grad = g.clone()
    opt.step()
    g_wd = g + 0.01 * torch.tensor([1.0, -2.0, 0.5])
    ms = 0.9 * 1.0 + 0.1 * g_wd ** 2
    expected = torch.tensor([1.0, -2.0, 0.5]) - 0.1 * g_wd / torch.sqrt(ms + 1e-3)
    torch.testing.assert_close(p.detach(), expected)
    # torch's RMSprop (ms from 0, eps outside the sqrt) steps about lr * sqrt(10) whatever the gradient:
    # for gradients of ordinary size that is many times TF's step
    q = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    q.grad = g.clone()
    torch.optim.RMSprop([q], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9).step()
    torch_step = (q.detach() - torch.tensor([1.0, -2.0, 0.5])).abs()
    tf_step = (expected - torch.tensor([1.0, -2.0, 0.5])).abs()
    assert torch.all(torch_step > 10 * tf_step)


def test_lamb_matches_timm():
    ours = _train(lambda g: Lamb(g, lr=0.05, betas=(0.9, 0.999), eps=1e-6))
    ref = _train(lambda g: timm_optim.Lamb(g, lr=0.05, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None))
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lamb_trust_ratio_scales_update():
    """With weight decay the step of a tensor is lr * ||w|| / ||update|| * update: its norm is lr * ||w||."""
    w0 = torch.full((4, 4), 3.0)
    p = nn.Parameter(w0.clone())
    opt = Lamb([{"params": [p], "weight_decay": 0.1}], lr=0.01)
    p.grad = torch.randn(4, 4)
    opt.step()
    step_norm = float((p.detach() - w0).norm())
    assert step_norm == pytest.approx(0.01 * float(w0.norm()), rel=1e-5)


def _cfg(**kw):
    return OptimConfig(**kw)


def test_build_optimizer_scales_lr_with_global_batch():
    model = ConvBN()
    opt = build_optimizer(_cfg(), model, global_batch_size=4096)
    assert isinstance(opt, RMSpropTF)
    assert peak_lr(_cfg(), 4096) == pytest.approx(0.256)
    assert all(g["lr"] == pytest.approx(0.256) for g in opt.param_groups)
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.param_groups[0]["alpha"] == 0.9
    adamw = build_optimizer(_cfg(name="adamw", lr_per_256=0.001, weight_decay=0.05), model, 512)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.002)
    assert adamw.param_groups[0]["eps"] == 1e-8  # adam_eps, not RMSProp's 1e-3
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    assert isinstance(build_optimizer(_cfg(name="lamb"), model, 256), Lamb)


def test_build_optimizer_errors():
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(_cfg(name="sgd"), ConvBN(), 256)
    with pytest.raises(ConfigError, match="global_batch_size"):
        build_optimizer(_cfg(), ConvBN(), 0)
    with pytest.raises(ConfigError, match="optim.betas"):
        build_optimizer(_cfg(name="adamw", betas=[0.9]), ConvBN(), 256)


# ------------------------------------------------------------------------------------------------ schedules

BASE = 0.256


def test_warmup_is_linear_from_near_zero_to_peak():
    kw = dict(base_lr=BASE, total_steps=1000, warmup_steps=100, schedule="cosine")
    assert lr_at(0, **kw) == pytest.approx(BASE / 100)
    assert lr_at(49, **kw) == pytest.approx(BASE * 0.5)
    assert lr_at(99, **kw) == pytest.approx(BASE)
    values = [lr_at(s, **kw) for s in range(100)]
    assert all(b > a for a, b in zip(values, values[1:]))


def test_cosine_after_warmup():
    kw = dict(base_lr=BASE, total_steps=1100, warmup_steps=100, schedule="cosine")
    assert lr_at(100, **kw) == pytest.approx(BASE)
    assert lr_at(600, **kw) == pytest.approx(BASE / 2)
    assert lr_at(1100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5000, **kw) == pytest.approx(0.0, abs=1e-12)  # held at the floor beyond the end
    floor = dict(kw, min_lr_ratio=0.1)
    assert lr_at(1100, **floor) == pytest.approx(0.1 * BASE)
    assert lr_at(600, **floor) == pytest.approx(0.1 * BASE + 0.9 * BASE / 2)
    q = 100 + 250
    assert lr_at(q, **kw) == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi / 4)))


def test_exp_staircase_official_recipe():
    """0.97 every 2.4 epochs on the global step (the TF code), warmup replacing the first steps."""
    spe = 1000  # steps per epoch
    kw = dict(base_lr=BASE, total_steps=350 * spe, warmup_steps=5 * spe, schedule="exp_staircase",
              steps_per_epoch=spe, decay_rate=0.97, decay_epochs=2.4)
    assert lr_at(4999, **kw) == pytest.approx(BASE)
    # step 5000 is epoch 5: floor(5 / 2.4) = 2 decays already
    assert lr_at(5000, **kw) == pytest.approx(BASE * 0.97 ** 2)
    assert lr_at(7199, **kw) == pytest.approx(BASE * 0.97 ** 2)
    assert lr_at(7200, **kw) == pytest.approx(BASE * 0.97 ** 3)
    assert lr_at(349_999, **kw) == pytest.approx(BASE * 0.97 ** 145)
    assert lr_at(349_999, **dict(kw, min_lr_ratio=0.05)) == pytest.approx(0.05 * BASE)
    # staircase: constant between the boundaries
    assert len({lr_at(s, **kw) for s in range(7200, 9600)}) == 1


def test_constant_after_warmup():
    kw = dict(base_lr=0.001, total_steps=0, warmup_steps=10, schedule="constant")
    assert lr_at(0, **kw) == pytest.approx(0.0001)
    assert lr_at(10, **kw) == lr_at(10_000, **kw) == 0.001


def test_schedule_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_at(0, base_lr=1, total_steps=10, schedule="linear")
    with pytest.raises(ConfigError, match="train.total_steps"):
        lr_at(5, base_lr=1, total_steps=0, schedule="cosine")
    with pytest.raises(ConfigError, match="decay_epochs"):
        lr_at(5, base_lr=1, total_steps=10, schedule="exp_staircase", steps_per_epoch=0)
    with pytest.raises(ValueError):
        lr_at(-1, base_lr=1, total_steps=10)


def test_warmup_steps_from_config():
    assert warmup_steps_from(_cfg(warmup_steps=500, warmup_epochs=5), 1000) == 500
    assert warmup_steps_from(_cfg(warmup_epochs=5), 312.5) == 1562
    assert warmup_steps_from(_cfg(), 1000) == 0
    with pytest.raises(ConfigError, match="warmup_epochs"):
        warmup_steps_from(_cfg(warmup_epochs=1), 0)


def test_lr_schedule_binds_the_config():
    cfg = _cfg(lr_per_256=0.016, warmup_epochs=1, schedule="exp_staircase", decay_epochs=2.4)
    fn = lr_schedule(cfg, global_batch_size=4096, total_steps=100_000, steps_per_epoch=1000)
    assert fn(999) == pytest.approx(0.256)
    assert fn(2400) == pytest.approx(0.256 * 0.97)
    assert fn(2400) == lr_at(2400, base_lr=0.256, total_steps=100_000, warmup_steps=1000,
                             schedule="exp_staircase", steps_per_epoch=1000, decay_rate=0.97, decay_epochs=2.4)
    with pytest.raises(ConfigError):  # a bad setting fails when the schedule is built
        lr_schedule(_cfg(schedule="cosine"), global_batch_size=256, total_steps=0, steps_per_epoch=10)
