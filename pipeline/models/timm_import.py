"""Weight exchange with timm: load timm's efficientnetv2_* / tf_efficientnetv2_* state dicts into our models
(and write ours in timm's layout), by an explicit key map built from our model's structure."""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from .blocks import ConvBnAct, FusedMBConv, MBConv
from .efficientnetv2 import EfficientNetV2, strip_prefixes

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_MAX_LISTED = 12


class LoadResult(NamedTuple):
    loaded: int
    """Number of tensors copied from the timm state dict."""
    kept: list[str]
    """Our keys left as they were (classifier when ignored; num_batches_tracked when the file has none)."""


def timm_model_options(timm_name: str) -> tuple[str, dict[str, Any]]:
    """Our model name and the options that make it compute what timm's model computes.

    ``tf_efficientnetv2_s.in21k_ft_in1k`` -> ('efficientnetv2_s', {'padding': 'same', 'bn_eps': 1e-3});
    ``efficientnetv2_m`` -> ('efficientnetv2_m', {'padding': 'symmetric', 'bn_eps': 1e-5}).
    """
    base = timm_name.split(".")[0]
    m = re.fullmatch(r"(tf_)?efficientnetv2_(s|m|l|xl|b[0-3])", base)
    if m is None or (m.group(1) is None and m.group(2).startswith("b")):
        raise ValueError(f"timm model {timm_name!r} has no counterpart here; supported: efficientnetv2_{{s,m,l,xl}}, "
                         f"tf_efficientnetv2_{{s,m,l,xl,b0,b1,b2,b3}}")
    if m.group(1):
        return f"efficientnetv2_{m.group(2)}", {"padding": "same", "bn_eps": 1e-3}
    return f"efficientnetv2_{m.group(2)}", {"padding": "symmetric", "bn_eps": 1e-5}


def timm_key_map(model: EfficientNetV2) -> dict[str, str]:
    """Our state-dict key -> timm's key, for every entry of ``model.state_dict()``."""
    mapping: dict[str, str] = {}

    def conv_bn(ours: str, unit: ConvBnAct, conv: str, bn: str) -> None:
        mapping[f"{ours}.conv.weight"] = f"{conv}.weight"
        for k in _BN_KEYS:
            if hasattr(unit.bn, k) and getattr(unit.bn, k) is not None:
                mapping[f"{ours}.bn.{k}"] = f"{bn}.{k}"

    conv_bn("stem", model.stem, "conv_stem", "bn1")
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            o, t = f"stages.{i}.{j}", f"blocks.{i}.{j}"
            if isinstance(block, FusedMBConv) and block.project is None:  # timm ConvBnAct
                conv_bn(f"{o}.fused", block.fused, f"{t}.conv", f"{t}.bn1")
            elif isinstance(block, FusedMBConv):  # timm EdgeResidual
                conv_bn(f"{o}.fused", block.fused, f"{t}.conv_exp", f"{t}.bn1")
                conv_bn(f"{o}.project", block.project, f"{t}.conv_pwl", f"{t}.bn2")
            elif isinstance(block, MBConv) and block.expand is not None and block.se is not None:
                conv_bn(f"{o}.expand", block.expand, f"{t}.conv_pw", f"{t}.bn1")  # timm InvertedResidual
                conv_bn(f"{o}.dw", block.dw, f"{t}.conv_dw", f"{t}.bn2")
                for a, b in (("reduce", "conv_reduce"), ("expand", "conv_expand")):
                    mapping[f"{o}.se.{a}.weight"] = f"{t}.se.{b}.weight"
                    mapping[f"{o}.se.{a}.bias"] = f"{t}.se.{b}.bias"
                conv_bn(f"{o}.project", block.project, f"{t}.conv_pwl", f"{t}.bn3")
            else:
                raise ValueError(f"{o}: {type(block).__name__} without expansion or SE has no timm counterpart")
    conv_bn("head", model.head, "conv_head", "bn2")
    if isinstance(model.classifier, nn.Linear):
        mapping["classifier.weight"] = "classifier.weight"
        mapping["classifier.bias"] = "classifier.bias"
    ours = set(model.state_dict())
    assert set(mapping) == ours, f"key map out of sync with the model: {sorted(ours ^ set(mapping))[:5]}"
    return mapping


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_timm_state_dict(model: EfficientNetV2, state_dict: Mapping[str, Any], *,
                         ignore_classifier: bool = False) -> LoadResult:
    """Copy a timm ``efficientnetv2_{s,m,l,xl}`` / ``tf_efficientnetv2_{s,m,l,xl,b0..b3}`` state dict into
    ``model``. Keys may carry ``module.`` / ``_orig_mod.`` prefixes.

    The model must have been created to match: the same variant, and for equal outputs
    :func:`timm_model_options` (tf_ weights: ``padding='same'``, BN eps 1e-3; timm's non-tf models: eps 1e-5).
    ``ignore_classifier=True`` keeps our (new) classifier, e.g. for fine-tuning on another class count.
    Raises ValueError naming the missing, unexpected and mis-shaped keys when the state dict does not fit;
    nothing is copied then.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
        hint = f"; it holds nested dicts {nested[:5]}: pass one of them (e.g. checkpoint['state_dict'] or " \
               f"checkpoint['state_dict_ema'])" if nested else ""
        raise ValueError(f"state dict has non-tensor values{hint}")

    theirs = strip_prefixes(dict(state_dict))
    mapping = timm_key_map(model)
    ours_sd = model.state_dict()
    if ignore_classifier:
        mapping = {o: t for o, t in mapping.items() if not o.startswith("classifier.")}
        theirs = {k: v for k, v in theirs.items() if not k.startswith("classifier.")}

    new_sd: dict[str, torch.Tensor] = {}
    kept, missing, mismatched = [], [], []
    for o, t in mapping.items():
        if t not in theirs:
            if o.endswith("num_batches_tracked"):  # older checkpoints omit it; it only matters for momentum=None
                kept.append(o)
            else:
                missing.append(t)
            continue
        if tuple(theirs[t].shape) != tuple(ours_sd[o].shape):
            mismatched.append(f"{t} {tuple(theirs[t].shape)} vs ours {tuple(ours_sd[o].shape)}")
            continue
        new_sd[o] = theirs[t]
    used = set(mapping.values())
    unexpected = sorted(k for k in theirs if k not in used)
    if missing or unexpected or mismatched:
        name = model.pretrained_cfg.get("architecture", type(model).__name__)
        parts = [f"timm state dict does not fit {name}"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        if any(m.startswith("classifier.") for m in mismatched):
            parts.append("a different class count: create the model with the checkpoint's num_classes, or pass "
                         "ignore_classifier=True to keep a new classifier")
        else:
            parts.append("check that the model variant matches the checkpoint (see timm_model_options)")
        raise ValueError("; ".join(parts))

    kept += [o for o in ours_sd if o not in mapping]
    with torch.no_grad():
        for o, v in new_sd.items():
            ours_sd[o].copy_(v)
    return LoadResult(loaded=len(new_sd), kept=kept)


def to_timm_state_dict(model: EfficientNetV2) -> dict[str, torch.Tensor]:
    """Our weights under timm's keys: ``timm.create_model(<matching name>).load_state_dict(...)`` accepts it."""
    mapping = timm_key_map(model)
    return {mapping[k]: v.detach().clone() for k, v in model.state_dict().items()}
