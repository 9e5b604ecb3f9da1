"""EfficientNetV2 building blocks: ConvBnAct, FusedMBConv, MBConv, SqueezeExcite, DropPath.

Every block takes its settings as explicit arguments (a :class:`LayerOptions` for padding and BatchNorm);
nothing here reads the run config. Parameter names are ours; ``timm_import`` maps timm's names onto them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Padding = Literal["symmetric", "same"]
PADDINGS: tuple[str, ...] = get_args(Padding)


@dataclass(frozen=True)
class LayerOptions:
    """Settings shared by every conv / BN layer of a model. The defaults are the model's (create_model's and the
    run config's ``model`` section's); the values are checked here, once, for every way a model is built."""

    padding: Padding = "symmetric"
    """'symmetric': PyTorch padding k // 2. 'same': TensorFlow SAME padding (asymmetric for stride 2 on even
    sizes), which the weights trained with the official TF code expect."""
    bn_eps: float = 1e-3
    bn_momentum: float = 0.1
    """PyTorch convention: new = (1 - m) * running + m * batch. Keras' 0.9 is 0.1 here, the paper's 0.99 is 0.01."""

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r}: expected one of {PADDINGS} ('same' = TensorFlow SAME "
                             f"padding, for weights of timm's tf_efficientnetv2_*)")
        if not _is_number(self.bn_eps) or not self.bn_eps > 0:
            raise ValueError(f"bn_eps={self.bn_eps!r}: expected a float > 0 (official 1e-3; timm's "
                             f"non-tf efficientnetv2_* use 1e-5)")
        if not _is_number(self.bn_momentum) or not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum={self.bn_momentum!r}: expected 0 < momentum <= 1 in PyTorch convention "
                             f"(0.1 = the official Keras 0.9, 0.01 = the paper's 0.99)")
        object.__setattr__(self, "bn_eps", float(self.bn_eps))
        object.__setattr__(self, "bn_momentum", float(self.bn_momentum))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (only needed for strided convs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pad_h = _same_pad(ih, self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(iw, self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            # TF puts the odd pixel at the end (right / bottom).
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def make_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False,
              padding: Padding = "symmetric") -> nn.Conv2d:
    """A conv with the requested padding (checked by :class:`LayerOptions`); 'same' padding of an odd kernel at
    stride 1 is static (k // 2)."""
    if padding == "same" and stride > 1:
        return SameConv2d(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=bias)
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)


class ConvBnAct(nn.Module):
    """conv (no bias) -> BatchNorm -> SiLU (or no activation)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
                 opts: LayerOptions = LayerOptions()):
        super().__init__()
        self.conv = make_conv(in_ch, out_ch, kernel, stride, groups=groups, padding=opts.padding)
        self.bn = nn.BatchNorm2d(out_ch, eps=opts.bn_eps, momentum=opts.bn_momentum)
        # In place (as timm does): BN's backward needs BN's input, not its output, so overwriting the output
        # is safe; gradients equal timm's bit for bit (tests/test_models.py).
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    """Channel gate: mean over H, W -> 1x1 reduce (bias) -> SiLU -> 1x1 expand (bias) -> sigmoid -> scale."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, H, W) -> (B, C, 1, 1)
        s = self.expand(self.act(self.reduce(s)))
        return x * s.sigmoid()


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: drops the whole branch per sample, rescales the survivors.

    ``forward(branch, shortcut)`` returns ``shortcut + drop(branch)`` in one fused op, so the residual add
    costs nothing extra. ``p`` is a plain attribute: it may be changed on a live model between steps.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0.0:
            return branch + shortcut
        keep = 1.0 - self.p
        # (B, 1, 1, 1): one Bernoulli draw per sample, 1 / keep for survivors, 0 for dropped ones.
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
        return torch.addcmul(shortcut, branch, mask)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class FusedMBConv(nn.Module):
    """Fused-MBConv. expand 1: 3x3 conv (stride) -> BN -> SiLU. expand > 1: 3x3 conv to in * expand channels
    (stride) -> BN -> SiLU -> 1x1 project -> BN. Residual + stochastic depth when stride 1 and in == out."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int, drop_path: float = 0.0,
                 opts: LayerOptions = LayerOptions()):
        super().__init__()
        self.has_residual = stride == 1 and in_ch == out_ch
        if expand == 1:
            self.fused = ConvBnAct(in_ch, out_ch, 3, stride, opts=opts)
            self.project = None
        else:
            mid = in_ch * expand
            self.fused = ConvBnAct(in_ch, mid, 3, stride, opts=opts)
            self.project = ConvBnAct(mid, out_ch, 1, act=False, opts=opts)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused(x)
        if self.project is not None:
            y = self.project(y)
        return self.drop_path(y, x) if self.has_residual else y


class MBConv(nn.Module):
    """MBConv: 1x1 expand -> BN -> SiLU -> depthwise 3x3 (stride) -> BN -> SiLU -> SE -> 1x1 project -> BN.
    Residual + stochastic depth when stride 1 and in == out."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int, se_ratio: float = 0.25,
                 drop_path: float = 0.0, opts: LayerOptions = LayerOptions()):
        super().__init__()
        self.has_residual = stride == 1 and in_ch == out_ch
        mid = in_ch * expand
        self.expand = ConvBnAct(in_ch, mid, 1, opts=opts) if expand != 1 else None
        self.dw = ConvBnAct(mid, mid, 3, stride, groups=mid, opts=opts)
        # The SE width follows the block's INPUT channels (official code), not the expanded ones.
        self.se = SqueezeExcite(mid, max(1, int(in_ch * se_ratio))) if se_ratio > 0 else None
        self.project = ConvBnAct(mid, out_ch, 1, act=False, opts=opts)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return self.drop_path(y, x) if self.has_residual else y
