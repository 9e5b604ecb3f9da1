"""The EfficientNetV2 network and the model registry (create_model / list_models)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Literal, Optional, Union, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import ConvBnAct, LayerOptions
from .builder import VARIANTS, ArchSpec, VariantSpec, build_stages

Granularity = Literal["block", "stage"]
CHECKPOINT_GRANULARITIES: tuple[str, ...] = get_args(Granularity)
GradCheckpointing = Literal["none", Granularity]
"""The checkpointing choices as the run config names them ('none', 'block', 'stage'); create_model also takes
False / None (off) and True ('block')."""
DEFAULT_DROP_PATH_RATE = 0.2
"""Stochastic depth of the deepest block, the official value for every variant (dropout is per variant)."""


class EfficientNetV2(nn.Module):
    """stem (3x3 s2 conv, BN, SiLU) -> stages -> head (1x1 conv, BN, SiLU) -> mean pool -> dropout -> linear.

    Build it with :func:`create_model`; the constructor takes an explicit :class:`ArchSpec`. With
    ``channels_last`` the forward pass runs in NHWC (the input is converted; parameters keep the default layout).
    """

    def __init__(self, arch: ArchSpec, num_classes: int = 1000, drop_rate: float = 0.2,
                 drop_path_rate: float = DEFAULT_DROP_PATH_RATE, in_chans: int = 3, opts: LayerOptions = LayerOptions(),
                 channels_last: bool = False):
        super().__init__()
        self.arch = arch
        self.opts = opts
        self.num_classes = num_classes
        self.num_features = arch.head_channels
        self.drop_path_rate = drop_path_rate
        self.channels_last = channels_last
        self.grad_checkpointing: Optional[str] = None

        self.stem = ConvBnAct(in_chans, arch.stem_channels, 3, 2, opts=opts)
        self.stages = build_stages(arch, arch.stem_channels, drop_path_rate, opts)
        self.head = ConvBnAct(arch.stages[-1].out_channels, arch.head_channels, 1, opts=opts)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg: dict[str, Any] = {}
        # channels_last is a layout of the activations, not of the parameters: forward_features makes the input
        # NHWC, and the conv kernels (cuDNN; on CPU oneDNN and the native im2col path) then run NHWC and return
        # NHWC outputs because the input is (torch's rule: input OR weight channels_last), so every activation
        # stays NHWC.
        # The weights stay contiguous: DeepSpeed broadcasts each parameter as a byte view (which needs a
        # contiguous last dimension) and ZeRO 1-3 re-create parameters as views of flat buffers anyway.
        self.reset_parameters()

    # ---- init -------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Official init: conv ~ N(0, sqrt(2 / fan_out)) with fan_out = k*k*out / groups, BN (1, 0),
        classifier ~ U(+-1 / sqrt(num_classes)), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                self._init_linear(m)

    @staticmethod
    def _init_linear(m: nn.Linear) -> None:
        bound = 1.0 / math.sqrt(m.out_features)
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)

    # ---- structure helpers -----------------------------------------------------------------------------
    def blocks(self) -> Iterator[nn.Module]:
        """All blocks in network order (the order stochastic-depth rates are assigned in)."""
        for stage in self.stages:
            yield from stage

    @property
    def drop_rate(self) -> float:
        return self.head_drop.p

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name for :attr:`pretrained_cfg` (sizes and defaults of the variant)."""
        return self.pretrained_cfg

    # ---- runtime changes ---------------------------------------------------------------------------------
    def set_regularization(self, dropout: Optional[float] = None, drop_path: Optional[float] = None) -> None:
        """Change the classifier dropout and / or the stochastic-depth rate on the live model, without
        rebuilding it (progressive learning raises them stage by stage). ``drop_path`` is the rate of the
        deepest block: block i of N gets ``drop_path * i / N``. None leaves a rate unchanged."""
        if dropout is not None:
            _check_rate("dropout", dropout)
            self.head_drop.p = float(dropout)
        if drop_path is not None:
            _check_rate("drop_path", drop_path)
            blocks = list(self.blocks())
            for i, block in enumerate(blocks):
                block.drop_path.p = float(drop_path) * i / len(blocks)
            self.drop_path_rate = float(drop_path)

    def set_grad_checkpointing(self, enable: bool = True, granularity: Granularity = "block") -> None:
        """Recompute activations in the backward pass: per block (least memory) or per stage (fewer
        boundaries, more memory). Only takes effect while gradients are enabled."""
        granularity = _checkpoint_granularity(granularity, "granularity")
        self.grad_checkpointing = granularity if enable else None

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised classifier (0: none, forward returns pooled features)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r}: expected an int >= 0")
        ref = next(self.parameters())
        self.num_classes = num_classes
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            self._init_linear(self.classifier)
        else:
            self.classifier = nn.Identity()
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    # ---- forward ---------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H / 32, W / 32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            units = self.stages if self.grad_checkpointing == "stage" else self.blocks()
            for unit in units:
                if torch.compiler.is_compiling():
                    # Dynamo traces checkpoint() as one region and supports no custom context_fn; its
                    # recompute lives in the backward graph, which does not replay the BN buffer updates.
                    x = checkpoint(unit, x, use_reentrant=False)
                else:
                    x = checkpoint(unit, x, use_reentrant=False, context_fn=_bn_stats_frozen_on_recompute(unit))
        else:
            x = self.stages(x)
        return self.head(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> pooled (B, C) if ``pre_logits`` else logits (B, num_classes)."""
        x = x.mean((2, 3))  # (B, C, H, W) -> (B, C)
        if pre_logits:
            return x
        return self.classifier(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _bn_stats_frozen_on_recompute(module: nn.Module):
    """checkpoint() context_fn: during the backward-pass recompute, BatchNorm still normalises with batch
    statistics (same output) but does not update its running statistics a second time. Momentum 0 keeps the
    running averages exactly as they are (and the same tensors get saved for backward, which checkpoint
    verifies); the extra num_batches_tracked increment is undone afterwards."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    @contextlib.contextmanager
    def frozen():
        saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            yield
        finally:
            with torch.no_grad():
                for m, momentum, tracked in saved:
                    m.momentum = momentum
                    m.num_batches_tracked.copy_(tracked)

    return lambda: (contextlib.nullcontext(), frozen())


# ---- registry ---------------------------------------------------------------------------------------------

OPTION_DEFAULTS: dict[str, Any] = {
    **dataclasses.asdict(LayerOptions()),  # padding, bn_eps, bn_momentum
    "channels_last": False,
    "grad_checkpointing": False,
    "in_chans": 3,
}


def list_models() -> list[str]:
    """Registered model names."""
    return sorted(VARIANTS)


def get_variant(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return VARIANTS[name]


class ModelArgs:
    """create_model()'s arguments, checked and completed: the variant, its dropout where none was given, every
    option with its default, the layer options, and the checkpointing granularity (None: off)."""

    def __init__(self, name: str, num_classes: int = 1000, drop_rate: Optional[float] = None,
                 drop_path_rate: float = DEFAULT_DROP_PATH_RATE, **options: Any):
        self.variant = get_variant(name)
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"create_model({name!r}): unknown option(s) {unknown}; known options: "
                             f"{sorted(OPTION_DEFAULTS)}")
        opt = dict(OPTION_DEFAULTS, **options)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r}: expected an int >= 0 (0 = no classifier)")
        drop_rate = self.variant.drop_rate if drop_rate is None else drop_rate
        _check_rate("drop_rate", drop_rate)
        _check_rate("drop_path_rate", drop_path_rate)
        self.layers = LayerOptions(padding=opt["padding"], bn_eps=opt["bn_eps"], bn_momentum=opt["bn_momentum"])
        if not isinstance(opt["channels_last"], bool):
            raise ValueError(f"channels_last={opt['channels_last']!r}: expected True or False")
        if isinstance(opt["in_chans"], bool) or not isinstance(opt["in_chans"], int) or opt["in_chans"] < 1:
            raise ValueError(f"in_chans={opt['in_chans']!r}: expected an int >= 1")
        self.granularity = _checkpoint_granularity(opt["grad_checkpointing"], "grad_checkpointing")
        self.name, self.num_classes = name, num_classes
        self.drop_rate, self.drop_path_rate = float(drop_rate), float(drop_path_rate)
        self.channels_last, self.in_chans = opt["channels_last"], opt["in_chans"]


def create_model(name: str, num_classes: int = 1000, drop_rate: Optional[float] = None,
                 drop_path_rate: float = DEFAULT_DROP_PATH_RATE, **options: Any) -> EfficientNetV2:
    """Build a registered EfficientNetV2.

    Args:
        name: one of :func:`list_models` (efficientnetv2_{s,m,l,xl,b0,b1,b2,b3,test}).
        num_classes: classifier outputs; 0 builds no classifier (forward returns pooled features).
        drop_rate: dropout before the classifier; None takes the variant's default (S 0.2, M 0.3, L/XL 0.4).
        drop_path_rate: stochastic depth of the deepest block (block i of N: rate * i / N).
        options: ``bn_eps`` (1e-3), ``bn_momentum`` (0.1 = official Keras 0.9; the paper's 0.99 is 0.01),
            ``padding`` ('symmetric' or TF 'same'), ``channels_last`` (False: NHWC activations, the input is
            converted in forward; parameters always keep the default contiguous layout), ``grad_checkpointing``
            (False / 'none', True / 'block', 'stage'), ``in_chans`` (3).

    Every argument is checked by :class:`ModelArgs` (a ValueError names the argument); the run config's
    ``model`` section is checked by the same code when it is loaded.
    """
    args = ModelArgs(name, num_classes, drop_rate, drop_path_rate, **options)
    variant = args.variant
    model = EfficientNetV2(variant.arch, num_classes=num_classes, drop_rate=args.drop_rate,
                           drop_path_rate=args.drop_path_rate, in_chans=args.in_chans, opts=args.layers,
                           channels_last=args.channels_last)
    model.grad_checkpointing = args.granularity
    model.pretrained_cfg = {
        "architecture": name,
        "num_classes": num_classes,
        "train_size": variant.train_size,
        "eval_size": variant.eval_size,
        "input_size": (args.in_chans, variant.train_size, variant.train_size),
        "test_input_size": (args.in_chans, variant.eval_size, variant.eval_size),
        "drop_rate": variant.drop_rate,
        "drop_path_rate": DEFAULT_DROP_PATH_RATE,
        "padding": args.layers.padding,
        "bn_eps": args.layers.bn_eps,
        "bn_momentum": args.layers.bn_momentum,
        "num_features": model.num_features,
    }
    return model


def _check_rate(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key}={value!r}: expected a probability 0 <= p < 1")


def _checkpoint_granularity(value: Union[bool, str, None], key: str) -> Optional[str]:
    if value in (False, None, "none"):
        return None
    if value is True:
        return "block"
    if value in CHECKPOINT_GRANULARITIES:
        return value
    raise ValueError(f"{key}={value!r}: expected False / 'none', True / 'block', or 'stage'")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def strip_prefixes(state_dict: dict) -> dict:
    """Remove wrapper prefixes (DDP 'module.', torch.compile '_orig_mod.') so keys match create_model()."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


# ---- analysis ---------------------------------------------------------------------------------------------

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, image_size: int, in_chans: int = 3) -> float:
    """Multiply-accumulates (GMACs) of one forward pass of one image, counted by PyTorch's own FLOP counter
    (``FlopCounterMode`` FLOPs / 2). A model on the meta device is counted without computing anything."""
    # ~0.1 s (it imports triton and sympy); only the model table and tests count GMACs
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415 - heavy, count_gmacs only

    param = next(model.parameters())
    x = torch.zeros(1, in_chans, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


__all__ = ["EfficientNetV2", "ModelArgs", "count_gmacs", "count_params", "create_model", "get_variant", "list_models"]
