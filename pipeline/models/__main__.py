"""Model CLI: ``python -m pipeline.models summary NAME --image-size N [--num-classes K]`` and ``list``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .blocks import PADDINGS, LayerOptions, Padding
from .efficientnetv2 import count_gmacs, count_params, create_model, get_variant, list_models


def summarize(name: str, image_size: Optional[int] = None, num_classes: int = 1000,
              padding: Padding = LayerOptions.padding):
    """Parameters and GMACs of a registered model. Built on the meta device: no memory, no compute, so even
    XL at 512 px takes a fraction of a second."""
    variant = get_variant(name)
    size = image_size or variant.eval_size
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, padding=padding)
    stages = [(s.block, s.expand, s.stride, s.out_channels, s.num_blocks) for s in variant.arch.stages]
    return {
        "name": name,
        "image_size": size,
        "num_classes": num_classes,
        "params": count_params(model),
        "gmacs": count_gmacs(model, size),
        "blocks": variant.arch.num_blocks,
        "stages": stages,
        "num_features": model.num_features,
        "train_size": variant.train_size,
        "eval_size": variant.eval_size,
        "drop_rate": variant.drop_rate,
    }


def _print_summary(s: dict) -> None:
    print(f"model          {s['name']}")
    print(f"image size     {s['image_size']} (default train {s['train_size']} / eval {s['eval_size']})")
    print(f"classes        {s['num_classes']}")
    print(f"parameters     {s['params']:,} ({s['params'] / 1e6:.3f} M)")
    print(f"GMACs          {s['gmacs']:.3f}  (torch.utils.flop_counter FLOPs / 2, one image)")
    print(f"train FLOPs    ~{6 * s['gmacs']:.2f} G per image (forward + backward ~ 3x forward)")
    print(f"blocks         {s['blocks']} in {len(s['stages'])} stages; features {s['num_features']}; "
          f"default dropout {s['drop_rate']}")
    print("stages         block   expand stride out  blocks")
    for block, expand, stride, out, n in s["stages"]:
        print(f"               {block:<7} {expand:>6} {stride:>6} {out:>4} {n:>6}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="parameters and GMACs of a model")
    p.add_argument("name", help=f"one of: {', '.join(list_models())}")
    p.add_argument("--image-size", type=int, default=None, help="square input side (default: the eval size)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--padding", choices=PADDINGS, default=LayerOptions.padding)
    sub.add_parser("list", help="registered model names")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in list_models():
            v = get_variant(name)
            print(f"{name:<22} train {v.train_size:>3} / eval {v.eval_size:>3}  dropout {v.drop_rate}")
        return 0
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size {args.image_size}: must be at least 32 (the network downsamples 32x)")
    try:
        s = summarize(args.name, args.image_size, args.num_classes, args.padding)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
