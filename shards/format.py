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
# Version 2 adds checksums (see "Checksums" below); version 1 shards (none) stay readable.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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


# ------------------------------------------------------------------------------------------- checksums
#
# A version-2 writer records (info.json says "checksums": "sha256"):
# - per shard: "sha256" of the whole tar file, beside "bytes" in its info.json entry (`sha256sum` checks it too);
# - per sample: in the sample's json member, "sha256": {ext: hex digest of that member's bytes} for cls, jpg and
#   jpg_small, plus "json": the digest of the json member itself, computed over `dumps_canonical` of the json
#   with that one entry left out. Every member of a sample is covered, the json included; a member listed
#   there but absent (a damaged tar header hides it) is as wrong as one whose bytes differ.
# A flipped byte inside a JPEG usually still decodes (libjpeg repairs what it can and warns at most), so
# decoding a shard does not find corruption: the digests do. Version 1 shards carry none.
CHECKSUM = "sha256"
_CHUNK = 1 << 20


def member_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole file, read in chunks (the per-shard checksum)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def add_sample_digests(meta: dict, members: dict[str, bytes]) -> dict:
    """``meta`` (the sample's json, without digests) with its "sha256" entry for ``members`` (ext -> bytes,
    the json itself excluded) and for the json."""
    digests = {ext: member_digest(data) for ext, data in members.items() if ext != "json"}
    out = {**meta, CHECKSUM: digests}
    digests["json"] = member_digest(dumps_canonical(out))
    return out


def check_sample(members: dict, required: bool = True) -> list[str]:
    """Problems of one sample against its recorded digests: ``members`` ext -> bytes (keys starting with "__"
    are ignored). Empty when every member matches; "no checksums" is a problem only when ``required``."""
    raw = members.get("json")
    if not isinstance(raw, (bytes, bytearray)):
        return ["json member missing: no checksums to check"] if required else []
    try:
        meta = json.loads(raw)
        digests = meta.get(CHECKSUM) if isinstance(meta, dict) else None
    except (ValueError, UnicodeDecodeError):
        return ["json member is not valid JSON (corrupt)"]
    if not isinstance(digests, dict) or not isinstance(digests.get("json"), str):
        return [f"json member holds no {CHECKSUM} digests (corrupt, or written without checksums)"] if required \
            else []
    problems = []
    canonical = dumps_canonical(meta) == bytes(raw)
    recorded_json = digests.pop("json")
    if not canonical or member_digest(dumps_canonical(meta)) != recorded_json:
        problems.append("json differs from its recorded sha256 (corrupt)")
    exts = {k for k in members if not k.startswith("__") and k != "json"}
    for ext in sorted(exts | set(digests)):
        if ext not in exts:
            problems.append(f"{ext} listed in its checksums but absent (a damaged tar header, or removed)")
        elif ext not in digests:
            problems.append(f"{ext} has no recorded sha256")
        elif not isinstance(members[ext], (bytes, bytearray, memoryview)):
            problems.append(f"{ext} is not a regular file member")
        elif member_digest(bytes(members[ext])) != digests[ext]:
            problems.append(f"{ext} differs from its recorded sha256 (corrupt)")
    return problems


def unsafe_shard_name(name: Any) -> str | None:
    """Why a shard name from info.json may not be used, or None. Names are paths relative to the shard folder
    (or URLs): an absolute path, a `..` component or a `file:` URL would read files outside the folder."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "not a non-empty file name"
    if "://" in name and not name.startswith("file:"):
        return None  # a remote shard (http(s), s3, ...): fetched, never a local path
    if name.startswith(("file:", "/")) or os.path.isabs(name):
        return "an absolute path (shard names are relative to the folder of info.json)"
    if ".." in re.split(r"[/\\]", name):
        return "a path with '..' (shard names must stay inside the folder of info.json)"
    return None


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
        text = path.read_text()
    except OSError as e:
        raise ShardError(f"{path}: not readable ({e}); rewrite the shards") from None
    return parse_info(text, str(path))


def parse_info(text: str | bytes, path: str) -> dict:
    """info.json's text, checked (``path`` names it in the errors): format, version, keys, safe shard names."""
    try:
        info = json.loads(text)
    except ValueError as e:
        raise ShardError(f"{path}: not readable JSON ({e}); rewrite the shards") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ShardError(f"{path}: not an {FORMAT} info file (format={info.get('format')!r})")
    if info.get("version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: format version {info.get('version')}, this tool reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}; rewrite the shards with this version of the tool")
    for field in ("num_classes", "classes", "splits"):
        if field not in info:
            raise ShardError(f"{path}: key {field!r} missing; rewrite the shards")
    for split, s in info["splits"].items():
        for entry in s.get("shards", []) if isinstance(s, dict) else []:
            name = entry.get("name") if isinstance(entry, dict) else None
            problem = unsafe_shard_name(name)
            if problem:
                raise ShardError(f"{path}: shard name {name!r} in split {split!r} is {problem}; refused")
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
