"""Weight EMA (pipeline/ema.py): the TF warm-up formula, BN statistics, swapping, state round trips; and under
DeepSpeed ZeRO 0-3 on 1 and 2 CPU ranks (multi-process results from tests/ds_worker.py)."""


import pytest
import torch
from torch import nn

import ds_launch
import ds_worker
from pipeline.ema import ModelEMA, ema_decay

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 2))


def perturb(model, seed):
    """Stand-in for an optimizer step plus a training forward: new weights and new BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    model(torch.randn(5, 3, 6, 6, generator=g))


def test_decay_tf_warmup():
    assert ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay(10, 0.9999) == pytest.approx(11 / 20)
    assert ema_decay(10**6, 0.9999) == 0.9999
    assert ema_decay(0, 0.9999, tf_warmup=False) == 0.9999


def test_update_follows_the_formula_params_and_bn_buffers():
    model = small_model()
    ema = ModelEMA(model, decay=0.99)
    expected = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    for t in range(5):
        perturb(model, t)
        d = ema.update()
        assert d == pytest.approx(min(0.99, (1 + t) / (10 + t)))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.float()
            else:
                expected[k] = v.clone()  # num_batches_tracked is copied
    full = ema.full_state_dict()
    assert list(full) == list(model.state_dict())
    for k in full:
        torch.testing.assert_close(full[k], expected[k], msg=k)
    assert int(full["1.num_batches_tracked"]) == 5
    # the running statistics really are averaged (not copied)
    assert not torch.allclose(full["1.running_mean"], model.state_dict()["1.running_mean"])


def test_update_uses_the_given_step_for_the_warmup():
    model = small_model()
    ema = ModelEMA(model, decay=0.9999)
    assert ema.update(step=10**6) == 0.9999
    assert ema.num_updates == 1


def test_swapped_evaluates_ema_weights_and_restores_exactly():
    model = small_model()
    ema = ModelEMA(model, decay=0.5, tf_warmup=False)
    perturb(model, 1)
    ema.update()
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    raw_out = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = small_model()
    reference.load_state_dict(ema.full_state_dict())
    reference.eval()
    with ema.swapped() as m:
        assert m is model
        torch.testing.assert_close(model(x), reference(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(model(x), raw_out)


def test_state_dict_round_trip_and_full_dict_wrapper():
    model = small_model()
    ema = ModelEMA(model, decay=0.9)
    for t in range(3):
        perturb(model, t)
        ema.update()
    state = ema.state_dict()
    assert state["sharded"] is False and state["num_updates"] == 3
    other = ModelEMA(small_model(seed=5), decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 3
    for k, v in ema.full_state_dict().items():
        assert torch.equal(other.full_state_dict()[k], v)
    third = ModelEMA(small_model(seed=6), decay=0.9)
    third.load_state_dict(ModelEMA.from_full_state_dict(ema.full_state_dict(), num_updates=3))
    for k, v in ema.full_state_dict().items():
        assert torch.equal(third.full_state_dict()[k], v)


def test_load_state_dict_refuses_mismatches():
    ema = ModelEMA(small_model(), decay=0.9)
    state = ema.state_dict()
    wrong = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 3))
    with pytest.raises(ValueError, match="shape"):
        ModelEMA(wrong).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        ModelEMA(small_model()).load_state_dict(dict(state, version=99))
    with pytest.raises(ValueError, match="lacks"):
        ModelEMA(nn.Sequential(nn.Linear(2, 2))).load_state_dict(state)
    sharded = dict(state, sharded=True, world_size=2, rank=1)
    with pytest.raises(ValueError, match="shard"):
        ModelEMA(small_model()).load_state_dict(sharded)
    with pytest.raises(ValueError):
        ModelEMA(small_model(), decay=1.0)


def test_wrapper_prefixes_are_not_in_the_keys():
    model = small_model()
    compiled = torch.compile(model)  # an OptimizedModule: its state-dict keys start with _orig_mod.
    ema = ModelEMA(compiled, decay=0.9)
    assert ema.model is model
    assert list(ema.full_state_dict()) == list(model.state_dict())


def test_ema_follows_bf16_weights_in_float32():
    model = small_model().to(torch.bfloat16)
    ema = ModelEMA(model, decay=0.5, tf_warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    first = next(model.parameters())
    torch.testing.assert_close(ema.shadow[0], first.float() - 0.5, atol=1e-2, rtol=0)


# ------------------------------------------------------------------------------------ DeepSpeed, 1 and 2 ranks


def _load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_ema_zero2_and_zero3_agree(ds_runs, world):
    """Same data, same model: the sharded ZeRO-3 EMA gathers to the ZeRO-2 one (and ZeRO 0 / 1's)."""
    res = ds_launch.results(ds_runs[world])
    assert res["z3_ema_sharded"] is True and res["z2_ema_sharded"] is False
    ref = _load(ds_runs[world] / "ema_z2.pt")
    for stage in (0, 1, 3):
        other = _load(ds_runs[world] / f"ema_z{stage}.pt")
        assert list(other) == list(ref)
        for k in ref:
            torch.testing.assert_close(other[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {k}")
    # the EMA moved away from the initial weights (the comparison is not between two copies of the init)
    init = ds_worker.make_model(0).state_dict()
    assert max(float((ref[k] - init[k]).abs().max()) for k in init if k.endswith("weight")) > 1e-3


@pytest.mark.slow
def test_ema_weights_do_not_depend_on_the_world_size(ds_runs):
    one, two = _load(ds_runs[1] / "ema_z3.pt"), _load(ds_runs[2] / "ema_z3.pt")
    params = [k for k in one if "running" not in k and "num_batches" not in k]
    for k in params:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_ema_swap_evaluates_the_same_under_zero2_and_zero3(ds_runs, world):
    res = ds_launch.results(ds_runs[world])
    z2, z3 = _load(ds_runs[world] / "eval_z2.pt"), _load(ds_runs[world] / "eval_z3.pt")
    torch.testing.assert_close(z3["swapped"], z2["swapped"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z2["swapped"], z2["raw"])  # the EMA weights differ from the raw ones
    for stage in range(4):
        assert res[f"z{stage}_swap_restores_exactly"], f"ZeRO-{stage}: weights not restored after swapped()"


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_ema_state_round_trip_per_rank(ds_runs, world):
    res = ds_launch.results(ds_runs[world])
    for stage in range(4):
        assert res[f"z{stage}_ema_state_roundtrip"], f"ZeRO-{stage}"
        assert res[f"z{stage}_ema_num_updates"] == 8


@pytest.mark.slow
def test_sharded_ema_reshards_to_another_world_size(ds_runs):
    """The 2-rank ZeRO-3 EMA files, loaded as a list on 1 rank (ZeRO-3 and ZeRO-2), give the same weights."""
    ref = _load(ds_runs[2] / "ema_z3.pt")
    for stage in (3, 2):
        got = _load(ds_runs[1] / f"ema_resharded_into_z{stage}.pt")
        for k in ref:
            assert torch.equal(got[k], ref[k]), (stage, k)
