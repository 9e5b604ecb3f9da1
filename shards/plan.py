"""The write plan: class filtering, the held-out validation split, keys, the seeded shuffle and the shard cut.

Everything here is a pure function of (listing, options, seed), so every rerun and every worker count cuts the
same shards; the fingerprint of the result decides whether an existing output may be resumed.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from . import ShardError
from .format import SPLITS, dumps_canonical, make_key, shard_name
from .sources import ClassInfo, Item, Listing

# Separate random streams per purpose, so e.g. changing the cap never moves the validation split.
_VAL_PER_CLASS, _VAL_COUNT, _CAP, _SHUFFLE = 1, 2, 3, 4


@dataclass(frozen=True)
class PlanOptions:
    seed: int = 0
    shard_size: int = 1000
    """Samples per shard (used when shard_bytes is 0)."""
    shard_bytes: int = 0
    """Target bytes per shard, planned from the source file sizes (re-encoded images only get smaller)."""
    val_count: int = 0
    """Hold out this many random images as the val split (sources without one)."""
    val_per_class: int = 0
    """Hold out this many images of every class (at most half of a class) as the val split."""
    min_per_class: int = 1
    """Drop classes with fewer images (counted before the held-out split; 21k-P uses 500)."""
    max_per_class: int = 0
    """Keep at most this many training images per class (0: all)."""


class Sample(NamedTuple):
    key: str
    id: str
    label: int
    labels: Optional[tuple]
    ref: tuple
    nbytes: int


@dataclass
class ShardTask:
    split: str
    index: int
    name: str
    samples: list[Sample]


@dataclass
class Plan:
    classes: list[ClassInfo]
    tasks: list[ShardTask]
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def split_samples(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tasks:
            counts[t.split] = counts.get(t.split, 0) + len(t.samples)
        return counts


def _class_rng(seed: int, purpose: int, cls: ClassInfo) -> np.random.Generator:
    # Seeded by the class's identity, not its index: dropping other classes leaves this class's draw alone.
    return np.random.default_rng([seed, purpose, zlib.crc32((cls.wnid or cls.name).encode())])


def _pick(rng: np.random.Generator, n: int, k: int) -> set[int]:
    return set(rng.choice(n, size=k, replace=False).tolist()) if k > 0 else set()


def make_plan(listing: Listing, opts: PlanOptions, header: dict) -> Plan:
    """Cut a listing into shard tasks; `header` (tool version, options, source) enters the fingerprint."""
    if opts.shard_size < 1 and opts.shard_bytes < 1:
        raise ShardError("--shard-size must be at least 1 sample or a byte size such as 256MB")
    if opts.val_count and opts.val_per_class:
        raise ShardError("--val-count and --val-per-class exclude each other; give one")
    if listing.has_val and (opts.val_count or opts.val_per_class):
        raise ShardError(f"the {listing.kind} source has its own validation split; --val-count / "
                         "--val-per-class apply only to sources without one")
    notes = list(listing.warnings)

    # 1. Drop small classes (counted on the training side) and renumber the rest in their original order.
    counts = np.bincount([it.label for it in listing.items if it.split != "val"], minlength=len(listing.classes))
    keep = [c for c in range(len(listing.classes)) if counts[c] >= max(1, opts.min_per_class)]
    if not keep:
        raise ShardError(f"no class has at least --min-per-class {opts.min_per_class} images (the largest has "
                         f"{int(counts.max(initial=0))})")
    if len(keep) < len(listing.classes):
        notes.append(f"dropped {len(listing.classes) - len(keep)} classes with fewer than "
                     f"{max(1, opts.min_per_class)} images")
    remap = {old: new for new, old in enumerate(keep)}
    classes = [listing.classes[c] for c in keep]
    items: list[Item] = []
    for it in listing.items:
        if it.label not in remap:
            continue
        labels = None
        if it.labels is not None:
            labels = tuple(remap[x] for x in it.labels if x in remap)
        items.append(it._replace(label=remap[it.label], labels=labels))

    # 2. Held-out validation split for sources without one.
    split_of = [it.split or "train" for it in items]
    if not listing.has_val and opts.val_per_class:
        by_class: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_class.setdefault(it.label, []).append(i)
        for label, members in by_class.items():
            chosen = _pick(_class_rng(opts.seed, _VAL_PER_CLASS, classes[label]), len(members),
                           min(opts.val_per_class, len(members) // 2))
            for j in chosen:
                split_of[members[j]] = "val"
    elif not listing.has_val and opts.val_count:
        if opts.val_count >= len(items):
            raise ShardError(f"--val-count {opts.val_count} is not below the {len(items)} images of the source")
        for j in _pick(np.random.default_rng([opts.seed, _VAL_COUNT]), len(items), opts.val_count):
            split_of[j] = "val"

    # 3. Cap training images per class.
    if opts.max_per_class > 0:
        by_class = {}
        for i, it in enumerate(items):
            if split_of[i] == "train":
                by_class.setdefault(it.label, []).append(i)
        for label, members in by_class.items():
            if len(members) > opts.max_per_class:
                kept = _pick(_class_rng(opts.seed, _CAP, classes[label]), len(members), opts.max_per_class)
                for j in range(len(members)):
                    if j not in kept:
                        split_of[members[j]] = None

    # 4. Keys unique over the whole dataset (train and val): collisions get a numbered suffix, in listing order.
    seen: set[str] = set()
    per_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for it, split in zip(items, split_of):
        if split is None:
            continue
        key = make_key(it.key)
        if key in seen:
            n = 2
            while f"{key}_{n}" in seen:
                n += 1
            key = f"{key}_{n}"
        seen.add(key)
        per_split[split].append(Sample(key, it.id, it.label, it.labels, it.ref, it.nbytes))

    # 5. One seeded permutation per split over all its images, then consecutive cuts: classes mix in shards.
    tasks = []
    for s_index, split in enumerate(SPLITS):
        samples = per_split[split]
        if not samples:
            continue
        order = np.random.default_rng([opts.seed, _SHUFFLE, s_index]).permutation(len(samples))
        shuffled = [samples[i] for i in order]
        for index, chunk in enumerate(_cut(shuffled, opts)):
            tasks.append(ShardTask(split, index, shard_name(split, index), chunk))
    if not any(t.split == "train" for t in tasks):
        raise ShardError("no training images left after the validation split and class filters")
    if not any(t.split == "val" for t in tasks):
        notes.append("no validation split (pass --val-per-class N or --val-count N to hold one out)")
    return Plan(classes, tasks, _fingerprint(header, classes, tasks), notes)


def _cut(samples: list[Sample], opts: PlanOptions) -> list[list[Sample]]:
    if opts.shard_bytes <= 0:
        return [samples[i:i + opts.shard_size] for i in range(0, len(samples), opts.shard_size)]
    chunks, current, size = [], [], 0
    for s in samples:
        if current and size + s.nbytes > opts.shard_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current:
        chunks.append(current)
    return chunks


def _fingerprint(header: dict, classes: list[ClassInfo], tasks: list[ShardTask]) -> str:
    h = hashlib.sha256(dumps_canonical({"header": header, "classes": [[c.wnid, c.name] for c in classes]}))
    for t in tasks:
        h.update(t.name.encode() + b"\n")
        for s in t.samples:
            h.update(dumps_canonical([s.key, s.id, s.label, s.labels, s.nbytes]))
    return h.hexdigest()
