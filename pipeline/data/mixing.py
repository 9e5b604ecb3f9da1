"""Soft targets and batch mixing: one-hot / multi-label targets with label smoothing, mixup and cutmix.

Order: targets are built (and label-smoothed) per sample first, then the batch is mixed; every target row sums to
1 at each step, so the mixed rows do too. Mixing follows the released EfficientNetV2 code:

- both alphas > 0: the first half of the batch (B // 2 samples) gets mixup, the rest cutmix; with one alpha > 0
  the whole batch gets that one;
- each sample gets its own lambda ~ Beta(alpha, alpha), lambda = max(lambda, 1 - lambda), so a sample keeps at
  least half of itself (the TF cutmix draws without the max; with a symmetric Beta and the reversed pairing that
  gives the same distribution of mixed pairs);
- the partner of sample i is the reversed batch (within its half): i <-> n - 1 - i;
- cutmix pastes a box of area ~(1 - lambda) of the partner, centred uniformly and clipped at the borders, and
  the target weight is the box's actual area after clipping.

Pure tensor ops, on any device, deterministic given the ``torch.Generator`` (which must live on the images' device
or on the CPU).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Integer labels (B,) -> float targets (B, num_classes): 1 - smoothing + smoothing / C on the label,
    smoothing / C elsewhere."""
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (batch,), got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}; "
                         "check model.num_classes against the data's class count")
    targets = torch.zeros(labels.shape[0], num_classes, dtype=torch.float32, device=labels.device)
    targets.scatter_(1, labels[:, None], 1.0)
    return smooth(targets, smoothing)


def multi_label_targets(label_lists: Sequence[Sequence[int]], num_classes: int,
                        smoothing: float = 0.0) -> torch.Tensor:
    """Samples with several labels (ImageNet-21k) -> targets (B, num_classes) with weight 1 / k on each of a
    sample's k distinct labels (normalised to sum 1, as the reference does before the softmax loss), then
    label smoothing."""
    targets = torch.zeros(len(label_lists), num_classes, dtype=torch.float32)
    for row, labels in enumerate(label_lists):
        distinct = sorted({int(c) for c in labels})
        if not distinct:
            raise ValueError(f"sample {row} of the batch has no label")
        if distinct[0] < 0 or distinct[-1] >= num_classes:
            raise ValueError(f"sample {row}: labels {distinct} outside [0, {num_classes}); check model.num_classes "
                             "against the data's class count")
        targets[row, distinct] = 1.0 / len(distinct)
    return smooth(targets, smoothing)


def smooth(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of rows that sum to 1: (1 - s) * t + s / C (rows still sum to 1)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if smoothing == 0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def _beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) from ``generator``, as float64 on the CPU.

    torch.distributions cannot take a generator, so a NumPy generator seeded from ours draws them: still
    deterministic given the torch generator, and independent of any global RNG.
    """
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n))


def _lam(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    lam = _beta(alpha, n, generator)
    return torch.maximum(lam, 1.0 - lam)


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup with the reversed batch, one lambda per sample: x_i * lam_i + x_{n-1-i} * (1 - lam_i)."""
    n = images.shape[0]
    lam = _lam(alpha, n, generator).to(images.device)
    lam_x = lam.to(images.dtype).view(n, *([1] * (images.ndim - 1)))
    lam_y = lam.to(targets.dtype).view(n, 1)
    mixed = images * lam_x + images.flip(0) * (1.0 - lam_x)
    return mixed, targets * lam_y + targets.flip(0) * (1.0 - lam_y)


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix with the reversed batch: each sample gets its own box of area ~(1 - lambda) from its partner;
    the target weight is the box's actual (clipped) area."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    lam = _lam(alpha, n, generator)
    side = torch.sqrt(1.0 - lam)  # box side as a fraction of the image side
    cut_h = (side * h).long()
    cut_w = (side * w).long()
    gen_device = generator.device
    cy = torch.randint(0, h, (n,), generator=generator, device=gen_device).cpu()
    cx = torch.randint(0, w, (n,), generator=generator, device=gen_device).cpu()
    y0 = (cy - cut_h // 2).clamp(0, h)
    y1 = (cy + cut_h // 2).clamp(0, h)
    x0 = (cx - cut_w // 2).clamp(0, w)
    x1 = (cx + cut_w // 2).clamp(0, w)
    area = ((y1 - y0) * (x1 - x0)).double() / (h * w)  # (n,) fraction taken from the partner
    dev = images.device
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    # (n, 1, H, 1) & (n, 1, 1, W) -> (n, 1, H, W): True inside each sample's box.
    in_rows = (rows >= y0.to(dev)[:, None]) & (rows < y1.to(dev)[:, None])
    in_cols = (cols >= x0.to(dev)[:, None]) & (cols < x1.to(dev)[:, None])
    mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    mixed = torch.where(mask, images.flip(0), images)
    a = area.to(device=targets.device, dtype=targets.dtype).view(n, 1)
    return mixed, targets * (1.0 - a) + targets.flip(0) * a


def mix_batch(images: torch.Tensor, targets: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup and / or cutmix on a batch (images (B, C, H, W), targets (B, K) rows summing to 1).

    Both alphas > 0: mixup on images[:B // 2], cutmix on images[B // 2:], each half paired with itself
    reversed. One alpha > 0: the whole batch gets that one. Neither: the inputs are returned unchanged.
    """
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and targets ({targets.shape[0]}) differ in batch size")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup / cutmix alpha must be >= 0, got {mixup_alpha} / {cutmix_alpha}")
    n = images.shape[0]
    if mixup_alpha > 0 and cutmix_alpha > 0:
        half = n // 2
        # Always draw for both halves (even if one is empty) so the generator advances the same way.
        img_a, tgt_a = mixup(images[:half], targets[:half], mixup_alpha, generator)
        img_b, tgt_b = cutmix(images[half:], targets[half:], cutmix_alpha, generator)
        return torch.cat([img_a, img_b]), torch.cat([tgt_a, tgt_b])
    if mixup_alpha > 0:
        return mixup(images, targets, mixup_alpha, generator)
    if cutmix_alpha > 0:
        return cutmix(images, targets, cutmix_alpha, generator)
    return images, targets
