"""Soft targets and mixup / cutmix: rows sum to 1, the official half / half split, area-corrected cutmix."""

import pytest
import torch

from pipeline.data.mixing import _lam, cutmix, mix_batch, mixup, multi_label_targets, one_hot_targets, smooth


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def constant_batch(n, size=16, channels=3):
    """Image i is filled with the value i + 1: every mixed pixel tells which images it came from."""
    return torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, size, size).clone()


def test_one_hot_and_smoothing():
    t = one_hot_targets(torch.tensor([0, 2, 1]), 4)
    assert torch.equal(t, torch.eye(4)[[0, 2, 1]])
    s = one_hot_targets(torch.tensor([0, 2, 1]), 4, smoothing=0.1)
    assert torch.allclose(s.sum(1), torch.ones(3))
    assert s[0, 0] == pytest.approx(0.9 + 0.025) and s[0, 1] == pytest.approx(0.025)
    with pytest.raises(ValueError, match="num_classes"):
        one_hot_targets(torch.tensor([4]), 4)
    with pytest.raises(ValueError, match="smoothing"):
        smooth(t, 1.0)


def test_multi_label_targets_are_normalised():
    t = multi_label_targets([[1, 3], [2], [2, 2, 5], [0, 1, 2, 3]], 6)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0].tolist() == [0, 0.5, 0, 0.5, 0, 0]
    assert t[2].tolist() == [0, 0, 0.5, 0, 0, 0.5]  # a repeated label counts once
    assert torch.allclose(t[3, :4], torch.full((4,), 0.25))
    ts = multi_label_targets([[1, 3]], 6, smoothing=0.12)
    assert torch.allclose(ts.sum(1), torch.ones(1))
    assert ts[0, 1] == pytest.approx(0.5 * 0.88 + 0.02) and ts[0, 0] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="no label"):
        multi_label_targets([[1], []], 6)
    with pytest.raises(ValueError, match="outside"):
        multi_label_targets([[7]], 6)


def test_mixup_pairs_with_the_reversed_batch_and_keeps_at_least_half():
    n = 6
    images, targets = constant_batch(n), one_hot_targets(torch.arange(n), n)
    mixed, t = mixup(images, targets, 0.4, gen(1))
    assert torch.allclose(t.sum(1), torch.ones(n))
    for i in range(n):
        j = n - 1 - i
        lam = t[i, i].item() if i != j else 1.0
        assert lam >= 0.5
        # pixel value = lam * (i + 1) + (1 - lam) * (j + 1), with the target's weights
        expect = t[i, i] * (i + 1) + t[i, j] * (j + 1) if i != j else torch.tensor(i + 1.0)
        assert torch.allclose(mixed[i], expect.expand_as(mixed[i]), atol=1e-5)
        assert (t[i] > 0).sum() <= 2


def test_cutmix_target_weight_is_the_actual_box_area():
    n = 8
    images, targets = constant_batch(n, size=20), one_hot_targets(torch.arange(n), n)
    for seed in range(20):
        mixed, t = cutmix(images, targets, 1.0, gen(seed))
        assert torch.allclose(t.sum(1), torch.ones(n))
        for i in range(n):
            j = n - 1 - i
            own = (mixed[i, 0] == i + 1).float().mean().item()
            from_partner = (mixed[i, 0] == j + 1).float().mean().item()
            assert own + from_partner == pytest.approx(1.0)  # every pixel is one of the two images
            assert t[i, j].item() == pytest.approx(from_partner, abs=1e-6)  # corrected to the clipped box
            assert own >= 0.5 - 1e-6  # lambda = max(lambda, 1 - lambda): the box takes at most half
            assert (mixed[i, 1] == mixed[i, 0]).all()  # the same box in every channel


def test_mix_batch_splits_half_mixup_half_cutmix():
    n = 8
    images, targets = constant_batch(n), one_hot_targets(torch.arange(n), 10, smoothing=0.1)
    mixed, t = mix_batch(images, targets, 0.5, 0.5, gen(3))
    assert mixed.shape == images.shape and t.shape == targets.shape
    assert torch.allclose(t.sum(1), torch.ones(n))
    # first half: mixup within images 0..3 (uniform pixel values, partners 3-i)
    for i in range(4):
        values = mixed[i].unique()
        assert values.numel() == 1
        own, partner = i + 1, 4 - i
        assert abs(values.item() - own) <= abs(values.item() - partner) + 1e-5  # lambda >= 0.5: closer to own
        assert set(torch.nonzero(t[i] > 0.05).flatten().tolist()) <= {i, 3 - i}
    # second half: cutmix within images 4..7, partners 11-i: pixels are exactly one of the two values
    for i in range(4, 8):
        assert set(mixed[i].unique().tolist()) <= {float(i + 1), float(11 - i + 1)}
        assert set(torch.nonzero(t[i] > 0.05).flatten().tolist()) <= {i, 11 - i}


def test_mix_batch_single_kind_and_none():
    n = 5
    images, targets = constant_batch(n), one_hot_targets(torch.arange(n), n)
    only_mix, t1 = mix_batch(images, targets, 0.3, 0.0, gen(0))
    assert all(only_mix[i].unique().numel() == 1 for i in range(n))  # mixup everywhere: uniform images
    assert torch.allclose(t1.sum(1), torch.ones(n))
    only_cut, t2 = mix_batch(images, targets, 0.0, 1.0, gen(0))
    for i in range(n):
        assert set(only_cut[i].unique().tolist()) <= {float(i + 1), float(n - i)}
    assert torch.allclose(t2.sum(1), torch.ones(n))
    same, t3 = mix_batch(images, targets, 0.0, 0.0, gen(0))
    assert same is images and t3 is targets


def test_mix_batch_is_deterministic_given_the_generator():
    images = torch.rand(7, 3, 12, 12)  # odd batch: 3 mixup, 4 cutmix
    targets = one_hot_targets(torch.randint(0, 5, (7,)), 5, 0.1)
    a = mix_batch(images, targets, 0.2, 0.5, gen(42))
    b = mix_batch(images, targets, 0.2, 0.5, gen(42))
    c = mix_batch(images, targets, 0.2, 0.5, gen(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.allclose(a[1].sum(1), torch.ones(7))
    state = torch.get_rng_state()
    mix_batch(images, targets, 0.2, 0.5, gen(42))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not touched


def test_mix_batch_bad_inputs():
    with pytest.raises(ValueError, match="batch size"):
        mix_batch(torch.zeros(4, 3, 8, 8), torch.zeros(3, 5), 0.2, 0.0, gen())
    with pytest.raises(ValueError, match="alpha"):
        mix_batch(torch.zeros(4, 3, 8, 8), torch.zeros(4, 5), -0.1, 0.0, gen())
    x, t = mix_batch(torch.zeros(1, 3, 8, 8), one_hot_targets(torch.tensor([1]), 3), 0.2, 0.2, gen())
    assert x.shape == (1, 3, 8, 8) and torch.allclose(t.sum(1), torch.ones(1))  # a batch of one still works


def test_lambda_distribution():
    lam = _lam(1.0, 20000, gen(5))  # Beta(1, 1) = U(0, 1); max(u, 1 - u) = U(0.5, 1)
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert lam.mean().item() == pytest.approx(0.75, abs=0.01)
    small = _lam(0.2, 20000, gen(6))  # small alpha: mostly close to 1 (little mixing)
    assert small.mean().item() > 0.85
