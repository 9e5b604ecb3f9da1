"""Check a shard folder against its info.json (`verify`) and summarise it (`stats`)."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from . import remote
from .format import (
    BAD_NAME,
    CHECKSUM,
    KEY_RE,
    REQUIRED_EXTS,
    SAMPLE_EXTS,
    SHARD_RE,
    TIMM_INFO_NAME,
    check_sample,
    file_sha256,
    read_info,
    timm_info,
    timm_info_difference,
)
from .remote import RemoteOptions

MAX_ERRORS_PER_SHARD = 100


def _samples(path: Path, read: Callable[[str], bool],
             on_gap: Callable[[int, int], None] = lambda offset, size: None) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes or member size}) per sample of a shard, members grouped by key in tar order.

    Members whose extension `read` rejects are not read (the tar reader seeks over them); their size stands in.
    A damaged member header is passed over (tarfile's ignore_zeros resyncs at the next valid header): the
    bytes skipped are reported through ``on_gap(offset, size)`` and that member is absent from its sample.
    Raises tarfile.TarError / OSError / EOFError when the tar is truncated or corrupt.
    """
    with tarfile.open(path, "r:", ignore_zeros=True) as tf:
        key, members = None, {}
        expected = 0  # where the next header should start
        for m in tf:
            if m.offset != expected:
                on_gap(expected, m.offset - expected)
            expected = m.offset_data + m.size + (-m.size) % tarfile.BLOCKSIZE
            k, _, ext = m.name.partition(".")
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if not m.isfile():
                members[ext] = None
            elif read(ext):
                f = tf.extractfile(m)
                data = f.read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} cut short")
                members[ext] = data
            else:
                members[ext] = m.size
        if key is not None:
            yield key, members


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _decode(data: bytes, what: str, max_side: int) -> Optional[str]:
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        # from the header alone, before any pixel is decoded: a decompression bomb costs nothing here
        if max_side and max(img.size) > max_side:
            return f"{what} is {img.size[0]}x{img.size[1]}, larger than max side {max_side}"
        if img.size[0] * img.size[1] > (Image.MAX_IMAGE_PIXELS or float("inf")):
            return f"{what} claims {img.size[0]}x{img.size[1]} pixels, above PIL's limit {Image.MAX_IMAGE_PIXELS}"
        img.load()
    except Exception as e:  # any decoder failure is a finding, not a crash
        return f"{what} does not decode ({type(e).__name__}: {e})"
    if fmt != "JPEG" or img.mode != "RGB":
        return f"{what} is {fmt} {img.mode}, expected an RGB JPEG"
    if max_side and max(img.size) > max_side:
        return f"{what} is {img.size[0]}x{img.size[1]}, larger than max side {max_side}"
    return None


def check_shard(path: str, num_classes: int, max_side: int, small_side: int, decode: bool = True,
                sha256: Optional[str] = None, checksums: bool = False) -> dict:
    """Read every sample of one shard and check it; returns counts, key hashes and the errors found.

    ``sha256``: the whole file's recorded digest (None: not recorded); ``checksums``: every sample must carry
    its members' digests (format version 2), checked whether or not images are decoded.
    """
    path = Path(path)
    name = path.name
    errors: list[str] = []
    keys: list[int] = []
    seen: set[str] = set()
    class_counts: dict[int, int] = {}
    samples = 0

    def error(msg: str) -> None:
        errors.append(f"{name}: {msg}")

    if sha256 is not None:
        try:
            if file_sha256(path) != sha256:
                error(f"{CHECKSUM} of the file differs from info.json: the shard changed after it was written "
                      "(the damaged samples are listed below where they can be located); rewrite it")
        except OSError as e:
            error(f"unreadable ({e})")

    def gap(offset: int, size: int) -> None:
        error(f"damaged tar header at byte {offset}: {size} bytes passed over to the next member (the member "
              "there is missing from its sample)")

    read = (lambda ext: True) if (decode or checksums) else (lambda ext: ext in ("cls", "json"))
    try:
        for key, members in _samples(path, read, gap):
            samples += 1
            where = f"sample {key!r}"
            if not KEY_RE.match(key):
                error(f"{where}: key is not made of [A-Za-z0-9_-] (webdataset keys cannot hold dots)")
            if key in seen:
                error(f"{where}: key appears twice (its members are not consecutive)")
            seen.add(key)
            keys.append(_key_hash(key))
            unknown = sorted(set(members) - set(SAMPLE_EXTS))
            missing = [e for e in REQUIRED_EXTS if e not in members]
            if unknown or missing:
                error(f"{where}: " + "; ".join(
                    ([f"unexpected members {unknown}"] if unknown else []) +
                    ([f"missing members {missing}"] if missing else [])))
                continue
            if checksums:
                problems = check_sample(members)
                if problems:
                    error(f"{where}: " + "; ".join(problems))
            try:
                label = int(members["cls"].decode("ascii"))
            except (ValueError, UnicodeDecodeError, AttributeError):
                error(f"{where}: cls {members['cls']!r} is not a decimal class index")
                continue
            if not 0 <= label < num_classes:
                error(f"{where}: label {label} outside 0..{num_classes - 1}")
            class_counts[label] = class_counts.get(label, 0) + 1
            try:
                meta = json.loads(members["json"])
                if not isinstance(meta, dict) or "id" not in meta or "size" not in meta:
                    raise ValueError("needs 'id' and 'size'")
                for extra in meta.get("labels", []):
                    if not (isinstance(extra, int) and 0 <= extra < num_classes):
                        raise ValueError(f"label {extra!r} in 'labels' outside 0..{num_classes - 1}")
            except (ValueError, TypeError) as e:
                error(f"{where}: bad json ({e})")
            if decode:
                for ext, limit in (("jpg", max_side), ("jpg_small", small_side)):
                    if ext in members:
                        problem = _decode(members[ext], ext, limit)
                        if problem:
                            error(f"{where}: {problem}")
    except (tarfile.TarError, OSError, EOFError) as e:
        error(f"unreadable after {samples} samples ({e}): the shard is truncated or corrupt; rewrite it")
    more = len(errors) - MAX_ERRORS_PER_SHARD
    if more > 0:
        errors = errors[:MAX_ERRORS_PER_SHARD] + [f"{name}: ... and {more} more errors"]
    return {"name": name, "samples": samples, "errors": errors, "class_counts": class_counts,
            "keys": np.array(keys, dtype=np.uint64)}


def check_timm_info(out: Path | str, info: dict, options: Optional[RemoteOptions] = None) -> Optional[str]:
    """None when OUT/_info.json agrees with info.json; otherwise one line saying where and what to run."""
    fix = f"rerun `python -m shards timm-info {out}`"
    missing = f"no {TIMM_INFO_NAME}: timm's wds reader cannot read this folder; add it with `python -m shards " \
              f"timm-info {out}`"
    try:
        if remote.is_remote(str(out)):
            try:
                text = remote.read_bytes(remote.join_url(str(out), TIMM_INFO_NAME), options or RemoteOptions())
            except remote.RemoteError:
                return missing
        else:
            path = Path(out) / TIMM_INFO_NAME
            if not path.exists():
                return missing
            text = path.read_text()
        found = json.loads(text)
    except (OSError, ValueError) as e:
        return f"{TIMM_INFO_NAME}: not readable JSON ({e}); {fix}"
    diff = timm_info_difference(timm_info(info), found)
    return None if diff is None else f"{TIMM_INFO_NAME} disagrees with info.json: {diff}; {fix}"


def _localized(fn: Callable, url: str, options: RemoteOptions, *args, **kw):
    """``fn(path, ...)`` on a remote shard streamed into a temporary file (one shard per worker at a time)."""
    with tempfile.TemporaryDirectory(prefix="shards-remote-") as tmp:
        try:
            path = remote.download(url, Path(tmp) / url.rstrip("/").rsplit("/", 1)[-1], options)
        except OSError as e:
            return None, f"{url.rsplit('/', 1)[-1]}: unreadable ({e})"
        return fn(str(path), *args, **kw), None


def _check_item(item: tuple[str, Optional[str]], options: Optional[RemoteOptions] = None, **kw) -> dict:
    path, sha256 = item
    if remote.is_remote(path):
        result, error = _localized(check_shard, path, options or RemoteOptions(), sha256=sha256, **kw)
        return result if result is not None else {"name": path.rsplit("/", 1)[-1], "errors": [error], "samples": 0,
                                                  "class_counts": {}, "keys": np.zeros(0, dtype=np.uint64)}
    return check_shard(path, sha256=sha256, **kw)


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _map_shards(fn: Callable, paths: list, workers: int, progress: bool, desc: str) -> list:
    from tqdm import tqdm  # noqa: PLC0415 - tqdm: progress bars only

    with tqdm(total=len(paths), unit="shard", desc=desc, disable=not progress, file=sys.stderr) as bar:
        if workers <= 1 or len(paths) <= 1:
            out = []
            for p in paths:
                out.append(fn(p))
                bar.update(1)
            return out
        with mp.Pool(min(workers, len(paths))) as pool:
            out = []
            for r in pool.imap(fn, paths):
                out.append(r)
                bar.update(1)
            return out


def verify(out: str | Path, workers: int = 1, decode: bool = True, progress: bool = False,
           options: Optional[RemoteOptions] = None) -> Report:
    """Open every shard, decode every image, check keys, labels and every count against info.json.

    ``out`` may be an ``s3://`` or ``http(s)://`` folder: each shard is streamed into a temporary file, checked
    and deleted (free disk for one shard per worker)."""
    options = options or RemoteOptions()
    is_remote = remote.is_remote(str(out))
    out = str(out) if is_remote else Path(out)
    info = remote.read_remote_info(out, options) if is_remote else read_info(out)
    sizes = None
    if is_remote:
        names = [e["name"] for s in info["splits"].values() for e in s["shards"]] + [TIMM_INFO_NAME]
        sizes = remote.object_sizes(out, names, options)
    report = Report()
    num_classes = info["num_classes"]
    if len(info["classes"]) != num_classes:
        report.errors.append(f"info.json: {len(info['classes'])} classes listed, num_classes says {num_classes}")
    max_side = int(info.get("options", {}).get("max_side") or 0)
    small_side = int((info.get("small_copy") or {}).get("max_side") or 0)

    listed, todo = set(), []
    for split, s in info["splits"].items():
        for entry in s["shards"]:
            listed.add(entry["name"])
            path = remote.join_url(out, entry["name"]) if is_remote else out / entry["name"]
            if not (entry["name"] in sizes if is_remote else path.is_file()):
                report.errors.append(f"{entry['name']}: listed in info.json ({split}) but missing")
                continue
            size = sizes[entry["name"]] if is_remote else path.stat().st_size
            if "bytes" in entry and size != entry["bytes"]:
                report.errors.append(f"{entry['name']}: {size} bytes on disk, info.json says {entry['bytes']} "
                                     "(truncated or replaced)")
            todo.append((split, entry, path))
        if sum(e["samples"] for e in s["shards"]) != s["samples"]:
            report.errors.append(f"info.json: split {split} says {s['samples']} samples, its shards sum to "
                                 f"{sum(e['samples'] for e in s['shards'])}")
    timm_problem = check_timm_info(out, info, options)
    if timm_problem is not None:
        exists = TIMM_INFO_NAME in sizes if is_remote else (out / TIMM_INFO_NAME).exists()
        (report.errors if exists else report.warnings).append(timm_problem)
    present = sizes if is_remote else [p.name for p in out.iterdir()]
    stray = sorted(n for n in present if SHARD_RE.match(n) and n not in listed)
    if stray:
        report.warnings.append(f"{len(stray)} shard files not listed in info.json (ignored by loaders): "
                               f"{', '.join(stray[:5])}")

    checksums = info.get("checksums") == CHECKSUM
    if not checksums:
        report.warnings.append(f"info.json records no checksums (format version {info.get('version')}): damage "
                               "inside an image that still decodes cannot be found; rewrite the shards with this "
                               "toolkit to add them")
    fn = partial(_check_item, num_classes=num_classes, max_side=max_side, small_side=small_side, decode=decode,
                 checksums=checksums, options=options)
    results = _map_shards(fn, [(str(p), entry.get(CHECKSUM)) for _, entry, p in todo], workers, progress,
                          "verify")
    all_keys = []
    for split in info["splits"]:
        found, counts = 0, np.zeros(num_classes, dtype=np.int64)
        for (s, entry, _), r in zip(todo, results):
            if s != split:
                continue
            report.errors += r["errors"]
            if r["samples"] != entry["samples"]:
                report.errors.append(f"{entry['name']}: {r['samples']} samples, info.json says {entry['samples']}")
            found += r["samples"]
            for label, n in r["class_counts"].items():
                if 0 <= label < num_classes:
                    counts[label] += n
            all_keys.append(r["keys"])
        expected = info["splits"][split].get("class_counts")
        if expected is not None and list(counts) != list(expected) and found == info["splits"][split]["samples"]:
            wrong = int(np.flatnonzero(counts != np.asarray(expected))[0])
            report.errors.append(f"split {split}: class {wrong} has {counts[wrong]} samples, info.json says "
                                 f"{expected[wrong]}")
        nshards = len(info["splits"][split]["shards"])
        report.lines.append(f"{split}: {found} samples in {nshards} shards "
                            f"(info.json: {info['splits'][split]['samples']})")
    if all_keys:
        keys = np.concatenate(all_keys)
        duplicates = len(keys) - len(np.unique(keys))
        if duplicates:
            report.errors.append(f"{duplicates} duplicate sample keys across the dataset")
    return report


# ---------------------------------------------------------------------------------------------- stats


def scan_shard(path: str, options: Optional[RemoteOptions] = None) -> dict:
    """Labels, original sizes and member bytes of a shard, without decoding images."""
    if remote.is_remote(path):
        result, error = _localized(scan_shard, path, options or RemoteOptions())
        return result if result is not None else {"labels": [], "sizes": [], "jpg": [], "small": [],
                                                  "error": f"{error}; run `python -m shards verify`"}
    labels, sizes, jpg, small = [], [], [], []
    error = None
    try:
        for _, members in _samples(Path(path), lambda ext: ext in ("cls", "json")):
            try:
                labels.append(int(members["cls"]))
                sizes.append(json.loads(members["json"])["size"])
            except (KeyError, ValueError, TypeError):
                continue
            jpg.append(members.get("jpg") or 0)
            small.append(members.get("jpg_small") or 0)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{Path(path).name}: unreadable ({e}); run `python -m shards verify`"
    return {"labels": labels, "sizes": sizes, "jpg": jpg, "small": small, "error": error}


def stats(out: str | Path, workers: int = 1, top: int = 5, progress: bool = False,
          options: Optional[RemoteOptions] = None) -> dict:
    """Class histogram and image / byte sizes per split, from the shards themselves (``out``: a folder, or an
    ``s3://`` / ``http(s)://`` one, whose shards are streamed through a temporary file one at a time)."""
    options = options or RemoteOptions()
    is_remote = remote.is_remote(str(out))
    out = str(out) if is_remote else Path(out)
    info = remote.read_remote_info(out, options) if is_remote else read_info(out)
    names = [c.get("wnid") or c["name"] for c in info["classes"]]
    result = {"name": info.get("name"), "path": str(out), "num_classes": info["num_classes"],
              "multi_label": info.get("multi_label", False), "small_copy": info.get("small_copy"),
              "bad_samples": sum(s.get("bad_samples", 0) for s in info["splits"].values()),
              "splits": {}, "errors": []}
    for split, s in info["splits"].items():
        paths = [remote.join_url(out, e["name"]) if is_remote else str(out / e["name"]) for e in s["shards"]]
        scans = _map_shards(partial(scan_shard, options=options), paths, workers, progress, f"stats {split}")
        result["errors"] += [r["error"] for r in scans if r["error"]]
        labels = np.array([x for r in scans for x in r["labels"]], dtype=np.int64)
        counts = np.bincount(labels, minlength=info["num_classes"]) if len(labels) else np.zeros(1, np.int64)
        sizes = np.array([x for r in scans for x in r["sizes"]], dtype=np.int64).reshape(-1, 2)
        jpg = np.array([x for r in scans for x in r["jpg"]], dtype=np.int64)
        small = np.array([x for r in scans for x in r["small"]], dtype=np.int64)
        order = np.argsort(counts, kind="stable")
        longer = sizes.max(axis=1) if len(sizes) else np.zeros(1, np.int64)
        result["splits"][split] = {
            "samples": int(len(labels)), "shards": len(paths), "bytes": int(s.get("bytes", 0)),
            "classes_present": int((counts > 0).sum()),
            "per_class": {"min": int(counts.min()), "median": float(np.median(counts)),
                          "mean": round(float(counts.mean()), 2), "max": int(counts.max())},
            "smallest_classes": [[names[i], int(counts[i])] for i in order[:top]],
            "largest_classes": [[names[i], int(counts[i])] for i in order[::-1][:top]],
            "class_counts": counts.tolist(),
            "original_longer_side": {q: int(np.percentile(longer, p)) for q, p in
                                     (("p5", 5), ("p50", 50), ("p95", 95))},
            "original_median_size": [int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))] if len(sizes)
            else [0, 0],
            "jpg_bytes_mean": int(jpg.mean()) if len(jpg) else 0,
            "jpg_small_bytes_mean": int(small[small > 0].mean()) if (small > 0).any() else 0,
            "jpg_small_samples": int((small > 0).sum()),
        }
    return result


def format_stats(st: dict) -> str:
    """Human-readable text of a stats() result."""
    mib = 2 ** 20
    lines = [f"{st['name']} ({st['path']}): {st['num_classes']} classes"
             f"{', multi-label' if st['multi_label'] else ''}"]
    for split, s in st["splits"].items():
        pc = s["per_class"]
        lines += [
            f"{split}: {s['samples']} samples in {s['shards']} shards, {s['bytes'] / mib:.1f} MiB "
            f"({s['bytes'] / max(1, s['samples']) / 1024:.1f} KiB/sample); {s['classes_present']} classes present",
            f"  images per class: min {pc['min']}, median {pc['median']:g}, mean {pc['mean']:g}, max {pc['max']}",
            "  smallest classes: " + ", ".join(f"{n} {c}" for n, c in s["smallest_classes"]),
            "  largest classes:  " + ", ".join(f"{n} {c}" for n, c in s["largest_classes"]),
            f"  original size: median {s['original_median_size'][0]}x{s['original_median_size'][1]}, longer side "
            f"p5 {s['original_longer_side']['p5']} / p50 {s['original_longer_side']['p50']} / p95 "
            f"{s['original_longer_side']['p95']}",
            f"  jpg: {s['jpg_bytes_mean'] / 1024:.1f} KiB mean",
        ]
        if s["jpg_small_samples"]:
            lines.append(f"  jpg_small: {s['jpg_small_samples']} samples, {s['jpg_small_bytes_mean'] / 1024:.1f} KiB "
                         "mean")
    if st["small_copy"]:
        total = sum(s["bytes"] for s in st["splits"].values())
        extra = st["small_copy"]["extra_bytes"]
        lines.append(f"small copies (max side {st['small_copy']['max_side']}): +{extra / mib:.1f} MiB, "
                     f"{100 * extra / max(1, total - extra):.1f}% over the shards without them")
    lines.append(f"bad samples skipped: {st['bad_samples']}" +
                 (f" (listed in {BAD_NAME})" if st["bad_samples"] else ""))
    lines += [f"error: {e}" for e in st["errors"]]
    return "\n".join(lines)
