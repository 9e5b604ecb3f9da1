"""Command line: `python -m shards write | verify | stats | timm-info` (see shards/README.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from typing import Optional

from . import ShardError, __version__, remote
from .format import TIMM_INFO_NAME
from .plan import PlanOptions
from .sources import SourceOptions, open_source
from .verify import format_stats, stats, verify
from .writer import WriteOptions, add_timm_info, write

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_shard_size(text: str) -> tuple[int, int]:
    """'1000' -> (1000 samples, 0 bytes); '256MB' -> (0, 256e6); '1GiB' -> (0, 2**30)."""
    m = _SIZE_RE.match(text)
    if not m or (not m.group(2) and not m.group(3) and "." in m.group(1)):
        raise ShardError(f"--shard-size {text!r}: give a sample count (1000) or a size (256MB, 1GiB)")
    number, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").lower()
    if not unit and not suffix:
        return int(number), 0
    base = 1024 if suffix == "ib" else 1000
    return 0, int(number * base ** ("KMGT".index(unit) + 1 if unit else 0))


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description="Write, verify and inspect WebDataset "
                                "shards for EfficientNetV2 training (format: shards/README.md).")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{write,verify,stats,timm-info}")

    w = sub.add_parser("write", help="write shards from a dataset layout",
                       description="Write shards: KIND is imagenet21k, imagenet1k, imagefolder, hf or demo. "
                       "For demo, SRC is the set: pretrain or transfer.")
    w.add_argument("kind", metavar="KIND")
    w.add_argument("src", metavar="SRC")
    w.add_argument("out", metavar="OUT")
    g = w.add_argument_group("images")
    g.add_argument("--max-side", type=int, default=512, help="downscale images with a longer side above this "
                   "(aspect kept) and re-encode them; 0 keeps every size (default 512)")
    g.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    g.add_argument("--small-copy", type=int, default=0, metavar="SIDE", help="also store jpg_small, a copy with "
                   "this longer side, for images larger than that (e.g. 256; default 0: none)")
    g = w.add_argument_group("shards and splits")
    g.add_argument("--shard-size", default=None, help="samples per shard (1000) or bytes (256MB); default 1000 "
                   "(256 for demo)")
    g.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the held-out split (default 0)")
    g.add_argument("--val-per-class", type=int, default=None, help="hold out this many images per class as val "
                   "(at most half a class) where the source has no val split (default: 50 for imagenet21k, "
                   "else none); for demo: the number of val images drawn per class")
    g.add_argument("--val-count", type=int, default=0, help="hold out this many random images as val instead")
    g.add_argument("--min-per-class", type=int, default=1, help="drop classes with fewer images (21k-P: 500)")
    g.add_argument("--max-per-class", type=int, default=0, help="keep at most this many training images per "
                   "class (default 0: all)")
    g = w.add_argument_group("run")
    g.add_argument("--workers", type=int, default=_default_workers(), help="writer processes (default: cores, "
                   "at most 8); the output does not depend on it")
    g.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail when more than this fraction "
                   "of images cannot be used (default 0.01)")
    g.add_argument("--name", default=None, help="dataset name recorded in info.json")
    g.add_argument("--overwrite", action="store_true", help="replace a different shard set already in OUT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = w.add_argument_group("remote OUT (s3://bucket/prefix/)")
    g.add_argument("--staging", default=None, metavar="DIR", help="local folder where shards are written before "
                   "their upload (default: a folder under $TMPDIR named after OUT; a rerun resumes from it)")
    g.add_argument("--multipart-size", default="64MB", help="shards above this size go up as multipart uploads "
                   "in parts of this size (at least 5MB, S3's smallest part; default 64MB)")
    g.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, "
                   "~/.aws/config, AWS); credentials from AWS_* or ~/.aws")
    g = w.add_argument_group("source specific")
    g.add_argument("--class-names", default=None, metavar="FILE", help="`wnid name` lines (LOC_synset_mapping.txt, "
                   "words.txt; found automatically in SRC)")
    g.add_argument("--val-labels", default=None, metavar="CSV", help="imagenet1k: LOC_val_solution.csv for a "
                   "flat val/ folder (found automatically)")
    g.add_argument("--hf-train-split", default="train")
    g.add_argument("--hf-val-split", default=None, help="default: validation, val or test, whichever exists")
    g.add_argument("--hf-config", default=None, help="hub dataset configuration name")
    g.add_argument("--image-column", default=None, help="hf: image column (default: the one Image column)")
    g.add_argument("--label-column", default=None, help="hf: label column (default: the one ClassLabel column)")
    g.add_argument("--classes", type=int, default=None, help="demo: number of classes (pretrain 100, transfer 12)")
    g.add_argument("--per-class", type=int, default=None, help="demo: training images per class (default 60)")
    g.add_argument("--image-size", type=int, default=None, help="demo: longer side in pixels (default 160)")

    v = sub.add_parser("verify", help="check every sample's checksums, decode it, check it against info.json")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--workers", type=int, default=_default_workers())
    v.add_argument("--no-decode", action="store_true", help="check structure, counts and checksums only (fast)")
    v.add_argument("--no-progress", action="store_true")
    v.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUT")

    s = sub.add_parser("stats", help="class histogram and sizes")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--workers", type=int, default=_default_workers())
    s.add_argument("--top", type=int, default=5, help="smallest / largest classes to show")
    s.add_argument("--json", action="store_true", help="print JSON (with the full class histogram)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for an s3:// OUT")

    t = sub.add_parser("timm-info", help=f"add timm's {TIMM_INFO_NAME} to existing shard folders",
                       description=f"Write OUT/{TIMM_INFO_NAME}, the index timm's wds reader looks for "
                       "(`train.py --dataset wds/NAME --data-dir OUT`), from OUT/info.json. The writer adds it "
                       "itself; this is for folders written before it did. Idempotent.")
    t.add_argument("out", metavar="OUT", nargs="+")
    return p


def _write(args: argparse.Namespace) -> int:
    demo = args.kind == "demo"
    if args.shard_size is None:
        shard_size, shard_bytes = (256 if demo else 1000), 0
    else:
        shard_size, shard_bytes = parse_shard_size(args.shard_size)
    val_per_class = args.val_per_class
    if val_per_class is None:
        val_per_class = 50 if args.kind == "imagenet21k" and not args.val_count else 0
    if args.workers < 1:
        raise ShardError("--workers must be at least 1")
    source_opts = SourceOptions(
        class_names=args.class_names, val_labels=args.val_labels, hf_train_split=args.hf_train_split,
        hf_val_split=args.hf_val_split, hf_config=args.hf_config, image_column=args.image_column,
        label_column=args.label_column, demo_classes=args.classes, demo_per_class=args.per_class,
        demo_val_per_class=args.val_per_class if demo else None, demo_image_size=args.image_size,
        workers=args.workers)
    listing = open_source(args.kind, args.src, source_opts, seed=args.seed)
    plan = PlanOptions(seed=args.seed, shard_size=shard_size, shard_bytes=shard_bytes, val_count=args.val_count,
                       val_per_class=0 if demo else val_per_class, min_per_class=args.min_per_class,
                       max_per_class=args.max_per_class)
    opts = WriteOptions(max_side=args.max_side, quality=args.quality, small_copy=args.small_copy, plan=plan,
                        max_bad_fraction=args.max_bad_fraction, workers=args.workers,
                        progress=not args.no_progress, overwrite=args.overwrite, name=args.name)
    if remote.scheme(args.out) == "s3":
        _, multipart = parse_shard_size(args.multipart_size)
        if multipart < 1:
            raise ShardError(f"--multipart-size {args.multipart_size}: give a size in bytes (64MB, 1GiB)")
        staging = args.staging or os.path.join(tempfile.gettempdir(), "shards-staging-" + hashlib.blake2b(
            args.out.rstrip("/").encode(), digest_size=8).hexdigest())
        publish = remote.S3Publisher(args.out, _remote_options(args), multipart_bytes=multipart)
        write(listing, staging, opts, publish=publish)
        return 0
    if remote.is_remote(args.out):
        raise ShardError(f"{args.out}: shards can be written to a local folder or to s3://bucket/prefix/ (not to "
                         "http); serve a local folder over HTTP instead")
    write(listing, args.out, opts)
    return 0


def _remote_options(args: argparse.Namespace) -> remote.RemoteOptions:
    return remote.RemoteOptions(s3_endpoint_url=args.endpoint_url)  # None: boto3's AWS_ENDPOINT_URL, ~/.aws


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.out, workers=args.workers, decode=not args.no_decode, progress=not args.no_progress,
                    options=_remote_options(args))
    for line in report.lines:
        print(line)
    for w in report.warnings:
        print(f"warning: {w}")
    for e in report.errors[:200]:
        print(f"error: {e}")
    if len(report.errors) > 200:
        print(f"error: ... and {len(report.errors) - 200} more")
    print(f"verify {args.out}: " + ("OK" if report.ok else f"FAILED ({len(report.errors)} errors)"))
    return 0 if report.ok else 1


def _stats(args: argparse.Namespace) -> int:
    st = stats(args.out, workers=args.workers, top=args.top, progress=not args.no_progress,
               options=_remote_options(args))
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        for split in st["splits"].values():
            split.pop("class_counts")
        print(format_stats(st))
    return 1 if st["errors"] else 0


def _timm_info(args: argparse.Namespace) -> int:
    failed = 0
    for out in args.out:
        try:
            written = add_timm_info(out)
        except ShardError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{os.path.join(out, TIMM_INFO_NAME)}: " + ("written" if written else "unchanged (already agrees "
                                                                                     "with info.json)"))
    return 2 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        commands = {"write": _write, "verify": _verify, "stats": _stats, "timm-info": _timm_info}
        return commands[args.command](args)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
