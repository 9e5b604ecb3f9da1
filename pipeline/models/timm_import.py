"""Weight exchange with timm: load timm's efficientnetv2_* / tf_efficientnetv2_* state dicts into our models
(and write ours in timm's layout), by an explicit key map built from our model's structure; and the names: which
timm model (and which timm ``create_model`` arguments) computes what one of our models computes.

The easy way is the right one: ``create_model_from_timm("tf_efficientnetv2_s", state_dict)`` builds our model
with the options of timm's variant (padding, BN eps) and loads the weights. :func:`load_timm_state_dict` warns
when the model it loads into matches no timm variant (e.g. our default BN eps 1e-3 with timm's efficientnetv2_s,
which uses 1e-5: the logits then differ from timm's, silently otherwise).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import nn

from .blocks import ConvBnAct, FusedMBConv, MBConv
from .efficientnetv2 import EfficientNetV2, create_model, strip_prefixes

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


TIMM_SIZES = ("s", "m", "l", "xl", "b0", "b1", "b2", "b3")
"""Our variants (efficientnetv2_<size>) that timm has: every size as tf_efficientnetv2_<size>, and s / m / l / xl
also as timm's own efficientnetv2_<size>."""
TIMM_PAD_TYPES = {"symmetric": "", "same": "same"}
"""Our padding option -> timm's ``pad_type`` argument."""
TIMM_DEFAULT_BN_MOMENTUM = 0.1
"""timm's BatchNorm momentum (PyTorch's default; ours is the same unless model.bn_momentum changes it)."""


def _size_of(name: str) -> Optional[str]:
    m = re.fullmatch(r"efficientnetv2_(\w+)", name)
    return m.group(1) if m and m.group(1) in TIMM_SIZES else None


def _timm_candidates(name: str) -> list[str]:
    """timm's variants of our model ``name`` (none for efficientnetv2_test)."""
    size = _size_of(name)
    if size is None:
        return []
    return [f"efficientnetv2_{size}", f"tf_efficientnetv2_{size}"] if not size.startswith("b") else \
        [f"tf_efficientnetv2_{size}"]


def _same_options(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["padding"] == b["padding"] and math.isclose(float(a["bn_eps"]), float(b["bn_eps"]), rel_tol=1e-6)


def timm_variant_of(name: str, padding: str, bn_eps: float) -> Optional[str]:
    """The timm model that computes exactly what our ``name`` with these layer options computes, or None.

    ``('efficientnetv2_s', 'symmetric', 1e-5)`` -> 'efficientnetv2_s'; ``('efficientnetv2_s', 'same', 1e-3)`` ->
    'tf_efficientnetv2_s'; our defaults ``('efficientnetv2_s', 'symmetric', 1e-3)`` -> None.
    """
    ours = {"padding": padding, "bn_eps": bn_eps}
    for cand in _timm_candidates(name):
        if _same_options(timm_model_options(cand)[1], ours):
            return cand
    return None


def nearest_timm_variant(name: str, padding: str) -> Optional[str]:
    """timm's variant of ``name`` with the same padding ('same': tf_efficientnetv2_*; 'symmetric': timm's own
    efficientnetv2_*, or tf_efficientnetv2_b* for B0-B3, which timm has only as tf_ models); None when timm has
    no variant of ``name``."""
    cands = _timm_candidates(name)
    for cand in cands:
        if timm_model_options(cand)[1]["padding"] == padding:
            return cand
    return cands[0] if cands else None


def timm_model_args(name: str, padding: str, bn_eps: float,
                    bn_momentum: float = TIMM_DEFAULT_BN_MOMENTUM) -> tuple[str, dict[str, Any]]:
    """The timm model name and the ``timm.create_model`` keyword arguments that build a model computing what our
    ``name`` with these options computes: the exact variant with no arguments when there is one, else the nearest
    variant with ``bn_eps`` / ``pad_type`` set (timm's EfficientNet builders take both); ``bn_momentum`` only when
    it is not timm's default. Raises ValueError for a model timm has no variant of (efficientnetv2_test)."""
    timm_name = nearest_timm_variant(name, padding)
    if timm_name is None:
        raise ValueError(f"{name} has no timm counterpart; timm has efficientnetv2_{{s,m,l,xl}} and "
                         f"tf_efficientnetv2_{{s,m,l,xl,b0,b1,b2,b3}}")
    exact = timm_variant_of(name, padding, bn_eps)
    args: dict[str, Any] = {}
    if exact is not None:
        timm_name = exact
    else:
        opts = timm_model_options(timm_name)[1]
        if not math.isclose(float(bn_eps), opts["bn_eps"], rel_tol=1e-6):
            args["bn_eps"] = float(bn_eps)
        if padding != opts["padding"]:
            args["pad_type"] = TIMM_PAD_TYPES[padding]
    if not math.isclose(float(bn_momentum), TIMM_DEFAULT_BN_MOMENTUM, rel_tol=1e-6):
        args["bn_momentum"] = float(bn_momentum)
    return timm_name, args


def create_model_from_timm(timm_name: str, state_dict: Optional[Mapping[str, Any]] = None, *,
                           ignore_classifier: bool = False, **overrides: Any) -> EfficientNetV2:
    """Our model for timm's ``timm_name`` (e.g. 'tf_efficientnetv2_s.in21k_ft_in1k', 'efficientnetv2_m'), built
    with the options that variant uses (:func:`timm_model_options`: tf_ models 'same' padding and BN eps 1e-3,
    timm's own efficientnetv2_* symmetric padding and eps 1e-5), with ``state_dict`` (timm's keys) loaded when
    given. The logits then equal timm's model's with the same weights.

    ``overrides`` go to :func:`create_model` (``drop_rate``, ``channels_last`` ...; ``padding`` / ``bn_eps``
    change what the weights compute, and :func:`load_timm_state_dict` warns then). ``num_classes`` defaults to
    the state dict's classifier rows (0 when it has no classifier), else timm's 1000.
    ``ignore_classifier=True`` keeps a new classifier (e.g. ``num_classes`` of another dataset).
    """
    name, opts = timm_model_options(timm_name)
    kwargs: dict[str, Any] = dict(opts)
    if "num_classes" not in overrides and state_dict is not None and not ignore_classifier:
        head = strip_prefixes(dict(state_dict)).get("classifier.weight")
        kwargs["num_classes"] = int(head.shape[0]) if isinstance(head, torch.Tensor) else 0
    kwargs.update(overrides)
    model = create_model(name, **kwargs)
    if state_dict is not None:
        load_timm_state_dict(model, state_dict, ignore_classifier=ignore_classifier)
    return model


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
                         ignore_classifier: bool = False, check_options: bool = True) -> LoadResult:
    """Copy a timm ``efficientnetv2_{s,m,l,xl}`` / ``tf_efficientnetv2_{s,m,l,xl,b0..b3}`` state dict into
    ``model``. Keys may carry ``module.`` / ``_orig_mod.`` prefixes.

    The model must have been created to match: the same variant, and for equal outputs
    :func:`timm_model_options` (tf_ weights: ``padding='same'``, BN eps 1e-3; timm's non-tf models: eps 1e-5).
    ``ignore_classifier=True`` keeps our (new) classifier, e.g. for fine-tuning on another class count.
    A UserWarning says when the model's padding and BN eps match no timm variant of it (``check_options=False``:
    the caller knows the weights' options, e.g. from a config.json that names them); prefer
    :func:`create_model_from_timm`, which builds the model to match. Raises ValueError naming the missing,
    unexpected and mis-shaped keys when the state dict does not fit; nothing is copied then.
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
    if check_options:
        _warn_if_no_variant(model)
    with torch.no_grad():
        for o, v in new_sd.items():
            ours_sd[o].copy_(v)
    return LoadResult(loaded=len(new_sd), kept=kept)


def _warn_if_no_variant(model: EfficientNetV2) -> None:
    """A UserWarning (once per model name and options) when no timm variant computes what ``model`` computes."""
    name = model.pretrained_cfg.get("architecture", "")
    padding, eps = model.opts.padding, model.opts.bn_eps
    if timm_variant_of(name, padding, eps) is not None:
        return
    near = nearest_timm_variant(name, padding)
    if near is None:
        return
    want = timm_model_options(near)[1]
    others = [f"{c} uses padding={timm_model_options(c)[1]['padding']!r}, bn_eps={timm_model_options(c)[1]['bn_eps']:g}"
              for c in _timm_candidates(name) if c != near]
    warnings.warn(
        f"loading timm weights into {name} with padding={padding!r}, bn_eps={eps:g}, which matches no timm "
        f"variant: timm's {near} uses padding={want['padding']!r}, bn_eps={want['bn_eps']:g}"
        + "".join(f" ({o})" for o in others)
        + f"; the outputs will differ from timm's. Build the model with "
        f"create_model_from_timm({near!r}, state_dict) (or the name the weights were trained as)",
        UserWarning, stacklevel=3)


def to_timm_state_dict(model: EfficientNetV2) -> dict[str, torch.Tensor]:
    """Our weights under timm's keys: ``timm.create_model(<matching name>).load_state_dict(...)`` accepts it."""
    mapping = timm_key_map(model)
    return {mapping[k]: v.detach().clone() for k, v in model.state_dict().items()}
