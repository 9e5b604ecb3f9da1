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
TIMM_INFO_NAME = "_info.json"  # timm's wds reader looks for this name first (then info.json, which it cannot read)
# Extra split names in _info.json, each an alias of one of ours: timm's train.py asks for `validation` by default.
TIMM_SPLIT_ALIASES = {"val": ("validation",)}
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


def timm_info(info: dict) -> dict:
    """timm's `_info.json` for a shard folder: what `timm.data.readers.reader_wds` reads, from our info.json.

    `splits.<name>` holds `name`, `num_samples`, `filenames` (relative to the folder, as timm joins them) and
    `shard_lengths`; our `val` also appears as `validation` (timm's default val split name). timm reads
    nothing else; `num_classes` and the class list stay in info.json. A pure function of info.json.
    """
    splits = {}
    for split, s in info["splits"].items():
        for name in (split, *TIMM_SPLIT_ALIASES.get(split, ())):
            splits[name] = {"name": name, "num_samples": s["samples"],
                            "filenames": [e["name"] for e in s["shards"]],
                            "shard_lengths": [e["samples"] for e in s["shards"]]}
    return {"name": info.get("name"), "splits": splits}


def timm_info_difference(expected: dict, found: Any, where: str = "") -> str | None:
    """The first place where `found` (a loaded _info.json) disagrees with `expected` (timm_info of info.json).

    Keys that `found` holds beyond the expected ones are ignored (timm reads e.g. an optional `alt_label`).
    """
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return f"{where or 'the file'} is {type(found).__name__}, not an object"
        for key, value in expected.items():
            here = f"{where}.{key}" if where else key
            if key not in found:
                return f"{here} missing"
            diff = timm_info_difference(value, found[key], here)
            if diff:
                return diff
        return None
    if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
        for i, (a, b) in enumerate(zip(expected, found)):
            if a != b:
                return f"{where}[{i}] is {b!r}, info.json gives {a!r}"
        return None
    if expected != found:
        shown = f"{len(found)} entries" if isinstance(found, list) else repr(found)
        wanted = f"{len(expected)} entries" if isinstance(expected, list) else repr(expected)
        return f"{where} is {shown}, info.json gives {wanted}"
    return None


def shard_paths(out: str | os.PathLike, info: dict, split: str) -> list[Path]:
    """Absolute paths of a split's shards, in info.json order."""
    if split not in info["splits"]:
        raise ShardError(f"{Path(out) / INFO_NAME}: no split {split!r} (has: {', '.join(info['splits'])})")
    return [Path(out) / s["name"] for s in info["splits"][split]["shards"]]
