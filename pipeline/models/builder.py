"""Stage tables of the EfficientNetV2 family as data, width / depth scaling, and the stage builder."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .blocks import FusedMBConv, LayerOptions, MBConv

BLOCK_TYPES = ("fused", "mbconv")


@dataclass(frozen=True)
class StageSpec:
    """One row of a stage table: ``num_blocks`` blocks of one type; only the first one strides."""

    block: str
    """'fused' (Fused-MBConv) or 'mbconv' (MBConv with SE)."""
    expand: int
    stride: int
    out_channels: int
    num_blocks: int
    se_ratio: float = 0.0
    """SE width as a fraction of the block's input channels (MBConv only; 0 = no SE)."""


@dataclass(frozen=True)
class ArchSpec:
    """A full network: stem conv, stages, 1x1 head conv (then pool, dropout, classifier)."""

    stem_channels: int
    stages: tuple[StageSpec, ...]
    head_channels: int = 1280

    @property
    def num_blocks(self) -> int:
        return sum(s.num_blocks for s in self.stages)


@dataclass(frozen=True)
class VariantSpec:
    """A registered model: its architecture plus the defaults that go with it (sizes, dropout)."""

    arch: ArchSpec
    train_size: int
    eval_size: int
    drop_rate: float
    """Dropout before the classifier (official code; the paper schedules it with progressive learning)."""


def _table(*rows: tuple) -> tuple[StageSpec, ...]:
    return tuple(StageSpec(*row) for row in rows)


# Rows: (block, expand, stride, out channels, blocks, se ratio). Reference section 1 / official effnetv2_configs.
ARCH_S = ArchSpec(24, _table(
    ("fused", 1, 1, 24, 2),
    ("fused", 4, 2, 48, 4),
    ("fused", 4, 2, 64, 4),
    ("mbconv", 4, 2, 128, 6, 0.25),
    ("mbconv", 6, 1, 160, 9, 0.25),
    ("mbconv", 6, 2, 256, 15, 0.25),
))
ARCH_M = ArchSpec(24, _table(
    ("fused", 1, 1, 24, 3),
    ("fused", 4, 2, 48, 5),
    ("fused", 4, 2, 80, 5),
    ("mbconv", 4, 2, 160, 7, 0.25),
    ("mbconv", 6, 1, 176, 14, 0.25),
    ("mbconv", 6, 2, 304, 18, 0.25),
    ("mbconv", 6, 1, 512, 5, 0.25),
))
ARCH_L = ArchSpec(32, _table(
    ("fused", 1, 1, 32, 4),
    ("fused", 4, 2, 64, 7),
    ("fused", 4, 2, 96, 7),
    ("mbconv", 4, 2, 192, 10, 0.25),
    ("mbconv", 6, 1, 224, 19, 0.25),
    ("mbconv", 6, 2, 384, 25, 0.25),
    ("mbconv", 6, 1, 640, 7, 0.25),
))
ARCH_XL = ArchSpec(32, _table(
    ("fused", 1, 1, 32, 4),
    ("fused", 4, 2, 64, 8),
    ("fused", 4, 2, 96, 8),
    ("mbconv", 4, 2, 192, 16, 0.25),
    ("mbconv", 6, 1, 256, 24, 0.25),
    ("mbconv", 6, 2, 512, 32, 0.25),
    ("mbconv", 6, 1, 640, 8, 0.25),
))
# The B0-B3 base table (the V1-sized family), scaled per variant by width / depth below.
ARCH_BASE = ArchSpec(32, _table(
    ("fused", 1, 1, 16, 1),
    ("fused", 4, 2, 32, 2),
    ("fused", 4, 2, 48, 2),
    ("mbconv", 4, 2, 96, 3, 0.25),
    ("mbconv", 6, 1, 112, 5, 0.25),
    ("mbconv", 6, 2, 192, 8, 0.25),
))
# Tiny, for fast tests: one block per stage, both block types, a residual block of each type (stages 1 and
# 5), fused with and without expansion, strided MBConvs, and the same 32x total downsampling as S.
ARCH_TEST = ArchSpec(8, _table(
    ("fused", 1, 1, 8, 1),
    ("fused", 4, 2, 16, 1),
    ("fused", 4, 2, 24, 1),
    ("mbconv", 4, 2, 32, 1, 0.25),
    ("mbconv", 6, 1, 32, 1, 0.25),
    ("mbconv", 6, 2, 48, 1, 0.25),
), head_channels=64)


def round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    """Official EfficientNetV2 rounding: scale, then to the nearest multiple of ``divisor`` (at least one).
    Unlike V1 there is no "never drop more than 10 %" correction."""
    scaled = channels * multiplier
    return int(max(divisor, int(scaled + divisor / 2) // divisor * divisor))


def scale_arch(arch: ArchSpec, width: float = 1.0, depth: float = 1.0) -> ArchSpec:
    """Width scales every channel count (stem and head too); depth scales block counts, rounded up."""
    if width == 1.0 and depth == 1.0:
        return arch
    stages = tuple(
        StageSpec(s.block, s.expand, s.stride, round_channels(s.out_channels, width),
                  int(math.ceil(s.num_blocks * depth)), s.se_ratio)
        for s in arch.stages)
    return ArchSpec(round_channels(arch.stem_channels, width), stages, round_channels(arch.head_channels, width))


VARIANTS: dict[str, VariantSpec] = {
    # name: (arch, train size, eval size, dropout). S-XL from the official configs (section 2 / 4 of the
    # reference); B0-B3: (width, depth) 1.0/1.0, 1.0/1.1, 1.1/1.2, 1.2/1.4.
    "efficientnetv2_s": VariantSpec(ARCH_S, 300, 384, 0.2),
    "efficientnetv2_m": VariantSpec(ARCH_M, 384, 480, 0.3),
    "efficientnetv2_l": VariantSpec(ARCH_L, 384, 480, 0.4),
    "efficientnetv2_xl": VariantSpec(ARCH_XL, 384, 512, 0.4),
    "efficientnetv2_b0": VariantSpec(scale_arch(ARCH_BASE, 1.0, 1.0), 192, 224, 0.2),
    "efficientnetv2_b1": VariantSpec(scale_arch(ARCH_BASE, 1.0, 1.1), 192, 240, 0.2),
    "efficientnetv2_b2": VariantSpec(scale_arch(ARCH_BASE, 1.1, 1.2), 208, 260, 0.3),
    "efficientnetv2_b3": VariantSpec(scale_arch(ARCH_BASE, 1.2, 1.4), 240, 300, 0.3),
    "efficientnetv2_test": VariantSpec(ARCH_TEST, 32, 48, 0.1),
}


def build_stages(arch: ArchSpec, in_channels: int, drop_path_rate: float, opts: LayerOptions) -> nn.Sequential:
    """Stages as ``nn.Sequential`` of ``nn.Sequential`` of blocks. Block i of N (counted over the whole
    network, from 0) gets stochastic-depth probability ``drop_path_rate * i / N``."""
    total = arch.num_blocks
    index = 0
    stages = []
    for spec in arch.stages:
        if spec.block not in BLOCK_TYPES:
            raise ValueError(f"stage table: block {spec.block!r} is not one of {BLOCK_TYPES}")
        blocks = []
        for j in range(spec.num_blocks):
            stride = spec.stride if j == 0 else 1
            rate = drop_path_rate * index / total
            if spec.block == "fused":
                blocks.append(FusedMBConv(in_channels, spec.out_channels, spec.expand, stride, rate, opts))
            else:
                blocks.append(MBConv(in_channels, spec.out_channels, spec.expand, stride, spec.se_ratio, rate, opts))
            in_channels = spec.out_channels
            index += 1
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)
