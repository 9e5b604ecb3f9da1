"""The shard format: file names, sample keys and members, and info.json (the contract the loader reads)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from . import ShardError

FORMAT = "effnetv2-shards"
FORMAT_VERSION = 1
INFO_NAME = "info.json"
BAD_NAME = "bad_samples.txt"
WORK_DIR = ".work"  # per-shard results of an unfinished write; removed once info.json exists
SPLITS = ("train", "val")

# Member suffixes of one sample, in the order they are written to the tar.
SAMPLE_EXTS = ("cls", "jpg", "jpg_small", "json")
REQUIRED_EXTS = ("cls", "jpg", "json")

SHARD_RE = re.compile(r"^(train|val)-(\d{6})\.tar$")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Tar (ustar) member names hold at most 100 characters; ".jpg_small" takes 10 of them.
MAX_KEY_LEN = 80


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def make_key(hint: str) -> str:
    """A webdataset key from an id: only [A-Za-z0-9_-] (webdataset splits a member name at its first dot)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", hint).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        digest = hashlib.blake2b(hint.encode(), digest_size=6).hexdigest()
        key = key[: MAX_KEY_LEN - 13] + "_" + digest
    return key


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is max_side, aspect kept; unchanged if already within it.

    The stored `jpg` of a sample follows this rule exactly (max_side = options.max_side), so a loader knows its
    size from the sample's original `size`. `jpg_small` follows it with small_copy.max_side, except that a
    copy may be up to 10% smaller when libjpeg's DCT scaling gets there without a resize (500x375 -> 250x188
    for 256): read its size from its JPEG header.
    """
    if max_side <= 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def dumps_canonical(obj: Any) -> bytes:
    """Compact JSON with sorted keys: the bytes written into shards (identical on every run)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write JSON to a temporary name, then rename: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_info(out: str | os.PathLike) -> dict:
    """Load and check OUT/info.json; errors name the file and what to run."""
    out = Path(out)
    path = out / INFO_NAME
    if not out.is_dir():
        raise ShardError(f"{out}: no such shard folder; write one with `python -m shards write KIND SRC {out}`")
    if not path.is_file():
        hint = " (an unfinished write: rerun the same `python -m shards write` command to finish it)" if (
            out / WORK_DIR).is_dir() else ""
        raise ShardError(f"{path}: missing{hint}; write shards with `python -m shards write KIND SRC {out}`")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: not readable JSON ({e}); rewrite the shards") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ShardError(f"{path}: not an {FORMAT} info file (format={info.get('format')!r})")
    if info.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {info.get('version')}, this tool reads version "
                         f"{FORMAT_VERSION}; rewrite the shards with this version of the tool")
    for field in ("num_classes", "classes", "splits"):
        if field not in info:
            raise ShardError(f"{path}: key {field!r} missing; rewrite the shards")
    return info


def shard_paths(out: str | os.PathLike, info: dict, split: str) -> list[Path]:
    """Absolute paths of a split's shards, in info.json order."""
    if split not in info["splits"]:
        raise ShardError(f"{Path(out) / INFO_NAME}: no split {split!r} (has: {', '.join(info['splits'])})")
    return [Path(out) / s["name"] for s in info["splits"][split]["shards"]]
