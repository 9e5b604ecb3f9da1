"""Shard index and reader plans: info.json, shard URLs, per-epoch order, the rank / worker split, tar reading.

Vocabulary. A *reader* is one (rank, worker) pair; ``slot = rank * workers + worker`` with ``workers >= 1`` (a
loader without worker processes is one reader per rank). An *address* (:class:`~.protocol.Address`) names one
sample without reading it: ``(dataset, instance, shard, member, occurrence)`` where ``instance`` counts the shards a
reader has opened for that dataset (a shard may come back in a later pass), ``member`` is the sample's position
inside its tar, and ``occurrence`` separates repeats of a sample within an epoch (their augmentation differs).
:class:`TrainPlan` and :class:`ShuffleStream` implement protocol.py's Plan and SampleStream, :class:`DatasetReaders`
its Fetch.

The key property: the sequence of addresses a reader delivers in an epoch is a pure function of (seed, epoch,
world size, workers, slot) and of the per-shard sample counts in info.json, never of file contents. Shard
order, the split, the dataset interleave and the shuffle buffer all draw from seeded RNGs whose draws depend
only on counts. Hence a reader's position is one integer ("n samples delivered"), and fast-forwarding to it
needs no decoding and reads only the tar members still sitting in the shuffle buffer at that point: whole
shards before the oldest of them are never opened. Samples a shard fails to deliver (truncated or missing
file) keep their address and reach the batch as *missing*, so damage changes what is counted as bad, never
which samples come next.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import lzma
import os
import random
import sys
import tarfile
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from webdataset.gopen import gopen

from shards.format import (  # the writer's contract, defined once
    CHECKSUM,
    FORMAT,
    INFO_NAME,
    READABLE_VERSIONS,
    check_sample,
    unsafe_shard_name,
)
from shards.remote import RemoteError, RemoteOptions, is_remote, join_url, open_remote

from .protocol import Address, Content, Fetch, Missing
from .tar import TarStream

SUPPORTED_VERSIONS = READABLE_VERSIONS
WRITE_HINT = "python -m shards write KIND SRC OUT"

# _address(Address, (d, i, s, m, o)) is Address(d, i, s, m, o) without the argument handling of its __new__: the
# plan's hot loop (a resume replays every address a reader delivered), twice as fast
_address = tuple.__new__


class DataError(RuntimeError):
    """A problem with the data or its layout; the message names the file / key and what to do."""


# ----------------------------------------------------------------------------------------------- seeds


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any repr-able parts; the same on every machine and Python run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def sample_seed(base: int, key: str) -> int:
    """Per-sample seed from a per-epoch base seed and the sample key (hot path: one blake2b call)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8,
                                          key=(base & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")).digest(), "little")


# ----------------------------------------------------------------------------------------------- index


def is_url(name: str) -> bool:
    """Anything webdataset's gopen opens that is not a plain local path (pipe:, http://, s3://, ...)."""
    return name.startswith("pipe:") or "://" in name or name.startswith("file:")


def _join(root: str, name: str) -> str:
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(root):
        return join_url(root, name)
    return os.path.join(root, name)


def _open_url(url: str, remote: Optional[RemoteOptions] = None, sha256: Optional[str] = None):
    """http(s):// and s3:// through shards.remote (retries that resume at the byte, the cache); the rest
    (pipe:, file:, other fsspec schemes) through webdataset's gopen."""
    if is_remote(url):
        return open_remote(url, remote or RemoteOptions(), sha256)
    return gopen(url, "rb")


def read_info(root: str, remote: Optional[RemoteOptions] = None) -> tuple[dict, str]:
    """Load and check ``root/info.json`` (``root`` may also name the json file or be a URL); returns (info, path)."""
    root = str(root)
    path = root if root.endswith(".json") else _join(root, INFO_NAME)
    if is_url(path):
        try:
            with _open_url(path, replace(remote or RemoteOptions(), cache_dir=None)) as f:
                text = f.read().decode()
        except Exception as e:  # any transport error
            raise DataError(f"{path}: cannot read ({e}); check the URL, or keep info.json in a local folder "
                            "and give the shards as URLs inside it") from None
    else:
        if not os.path.isfile(path):
            where = "folder does not exist" if not os.path.exists(os.path.dirname(path) or ".") else "no info.json"
            raise DataError(f"{path}: {where}; data.train / data.val must name shard folders written by "
                            f"`{WRITE_HINT}`")
        with open(path) as f:
            text = f.read()
    try:
        info = json.loads(text)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rewrite the shards with `{WRITE_HINT}`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise DataError(f"{path}: not an {FORMAT} info file (format={got!r}); write shards with `{WRITE_HINT}`")
    if info.get("version") not in SUPPORTED_VERSIONS:
        raise DataError(f"{path}: shard format version {info.get('version')!r}, this loader reads "
                        f"{list(SUPPORTED_VERSIONS)}; rewrite the shards with this version of the toolkit")
    for key in ("num_classes", "splits"):
        if key not in info:
            raise DataError(f"{path}: key {key!r} missing; rewrite the shards with `{WRITE_HINT}`")
    return info, path


@dataclass(frozen=True)
class SplitIndex:
    """One split of one shard folder: shard URLs and sample counts (shards with 0 samples are left out)."""

    root: str
    info_path: str
    name: str
    split: str
    num_classes: int
    classes: tuple  # of dicts {"index", "wnid", "name"}
    multi_label: bool
    urls: tuple[str, ...]
    names: tuple[str, ...]
    counts: tuple[int, ...]
    offsets: tuple[int, ...] = field(default=(), compare=False)
    """Global index of each shard's first sample (cumulative counts)."""
    sha256: tuple[Optional[str], ...] = field(default=(), compare=False)
    """Per shard: the whole file's recorded sha256 (None where info.json has none, format version 1). The
    loader streams members; the node-local cache of remote shards (shards.remote.ShardCache) keeps a shard only
    when the bytes it streamed match this digest."""
    checksums: bool = field(default=False, compare=False)
    """Every sample's json carries its members' sha256 (format version 2): see shards.format.check_sample."""
    damaged: tuple[tuple[str, int, int, int], ...] = field(default=(), compare=False)
    """Local shards whose size differs from info.json's ``bytes``: (name, size, recorded bytes, samples)."""

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    @property
    def samples(self) -> int:
        return int(sum(self.counts))

    def fingerprint(self) -> str:
        """Identity of the sample stream: shard names and counts (not the folder, so data can move)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.split}|{self.num_classes}|".encode())
        for n, c in zip(self.names, self.counts):
            h.update(f"{n}:{c};".encode())
        return h.hexdigest()

    def wnids(self) -> list[Optional[str]]:
        out: list[Optional[str]] = [None] * self.num_classes
        for c in self.classes:
            i = c.get("index")
            if isinstance(i, int) and 0 <= i < self.num_classes:
                out[i] = c.get("wnid") or c.get("name")
        return out


def load_split(root: str, split: str, *, check_files: bool = True, allow_pipe: bool = False,
               remote: Optional[RemoteOptions] = None) -> SplitIndex:
    """Read a split's shard list from ``root/info.json``; local shard files are checked to exist.

    A shard name in info.json that is a ``pipe:`` command is refused unless ``allow_pipe`` (data.allow_pipe): a
    dataset handed over must not run commands. A ``pipe:`` *root* is the user's own command line and is run.
    """
    info, path = read_info(root, remote)
    root = str(root)
    if root.endswith(".json"):
        root = os.path.dirname(root) or "."
    splits = info["splits"]
    if split not in splits:
        raise DataError(f"{path}: no split {split!r} (it has: {', '.join(splits) or 'none'}); set data.train_split "
                        "/ data.val_split to one of those, or write that split with the shards toolkit")
    entry = splits[split]
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{path}: splits.{split}.shards is missing or not a list; rewrite the shards")
    urls, names, counts, digests, recorded_bytes = [], [], [], [], []
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int) \
                or s["samples"] < 0:
            raise DataError(f"{path}: splits.{split}.shards[{i}] needs a 'name' and a non-negative integer "
                            f"'samples' (got {s!r}); rewrite the shards")
        unsafe = unsafe_shard_name(s["name"])
        if unsafe:
            raise DataError(f"{path}: splits.{split}.shards[{i}].name {s['name']!r} is {unsafe}; refused. Shard "
                            "names are file names inside the shard folder: rewrite the shards with "
                            f"`{WRITE_HINT}`, or fix the name")
        if s["name"].startswith("pipe:") and not allow_pipe:
            raise DataError(f"{path}: splits.{split}.shards[{i}].name {s['name'][:60]!r} is a shell command "
                            "(pipe:); refused, as reading the dataset would run it. If you trust this info.json, "
                            "set data.allow_pipe=true")
        if s["samples"] == 0:
            continue
        names.append(s["name"])
        urls.append(_join(root, s["name"]))
        counts.append(int(s["samples"]))
        digests.append(s.get(CHECKSUM) if isinstance(s.get(CHECKSUM), str) else None)
        recorded_bytes.append(s.get("bytes") if isinstance(s.get("bytes"), int) else None)
    declared = entry.get("samples")
    if isinstance(declared, int) and declared != sum(counts):
        raise DataError(f"{path}: splits.{split}.samples is {declared} but its shards hold {sum(counts)}; the file "
                        "is inconsistent: rewrite the shards")
    if not urls:
        raise DataError(f"{path}: split {split!r} has no samples; write shards with `{WRITE_HINT}`")
    damaged = []
    if check_files:
        missing = [u for u in urls if not is_url(u) and not os.path.isfile(u)]
        if missing:
            raise DataError(f"{path}: {len(missing)} of {len(urls)} {split} shards listed there do not exist (first: "
                            f"{missing[0]}); copy the missing files or rewrite the shards")
        for name, url, want, n in zip(names, urls, recorded_bytes, counts):
            if want is not None and not is_url(url):
                size = os.path.getsize(url)
                if size != want:
                    damaged.append((name, size, want, n))
    num_classes = info["num_classes"]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"{path}: num_classes must be a positive integer (got {num_classes!r})")
    offsets = tuple(int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]]))
    return SplitIndex(root=root, info_path=path, name=str(info.get("name", os.path.basename(root.rstrip("/")))),
                      split=split, num_classes=num_classes, classes=tuple(info.get("classes") or ()),
                      multi_label=bool(info.get("multi_label", False)), urls=tuple(urls), names=tuple(names),
                      counts=tuple(counts), offsets=offsets, sha256=tuple(digests),
                      checksums=info.get("checksums") == CHECKSUM, damaged=tuple(damaged))


def check_damage(split: SplitIndex, max_bad_fraction: float, world_size: int, what: str) -> Optional[str]:
    """Shards whose size differs from info.json (emptied, truncated, replaced): None when there are none; else a
    warning line (their unreadable samples are skipped and counted), or a DataError now when zero-byte shards
    alone would put the rank that reads them over ``data.max_bad_fraction`` in the first epoch (the run would
    stop there, hours in). One reader reads a shard, so its rank sees the loss among samples / world_size.

    A truncated shard's loss is only estimated here (from the bytes missing) and never stops the start: the
    threshold applies when it is read. A shard that grew or changed at the same size is not seen here.
    """
    if not split.damaged:
        return None
    certain = sum(n for _, size, _, n in split.damaged if size == 0)
    about = sum(n * max(0, want - size) // max(1, want) for _, size, want, n in split.damaged)
    listed = ", ".join(f"{name}: {size} bytes, info.json says {want}" for name, size, want, _ in split.damaged[:3])
    more = f" and {len(split.damaged) - 3} more" if len(split.damaged) > 3 else ""
    head = (f"{what} ({split.info_path}): {len(split.damaged)} shard(s) differ in size from info.json ({listed}"
            f"{more}), about {about} of {split.samples} samples lost")
    if certain * world_size > max_bad_fraction * split.samples:
        raise DataError(f"{head}, above data.max_bad_fraction={max_bad_fraction:g} for the rank that reads them "
                        f"({world_size} rank(s)). Restore or rewrite those shards (`python -m shards verify "
                        f"{split.root}` lists the damage), or raise data.max_bad_fraction")
    return (f"{head}; their unreadable samples are skipped and counted against data.max_bad_fraction "
            f"(check with `python -m shards verify {split.root}`)")


class ChecksumMismatch(ValueError):
    """A sample's members differ from the sha256 digests its json records (counted as a bad sample)."""


def verify_sample(sample: dict) -> None:
    """Raises :class:`ChecksumMismatch` naming the damaged members of a sample (data.verify_checksums)."""
    problems = check_sample(sample)
    if problems:
        raise ChecksumMismatch("; ".join(problems))


# ------------------------------------------------------------------------------------- order and split


def epoch_order(num_shards: int, seed: int, epoch: int, salt: tuple = ()) -> list[int]:
    """The shard order of an epoch: a permutation seeded by (seed, epoch, salt)."""
    order = list(range(num_shards))
    random.Random(stable_seed("order", seed, epoch, *salt)).shuffle(order)
    return order


def balanced_split(items: Sequence[int], counts: Sequence[int], groups: int,
                   largest_first: bool = False) -> list[list[int]]:
    """Deal shards to ``groups`` in order, each to the group holding the fewest samples so far (ties: lowest).

    With equal shard sizes this is round-robin; with uneven sizes the groups' totals differ by at most one
    shard's size, which keeps the per-reader quota (the minimum) close to the mean. ``largest_first`` deals the
    largest shards first (longest-processing-time order; equal counts keep their order), which balances the
    mixed counts that an epoch continued on another number of readers leaves (whole shards, half-read ones and
    read ones) much more evenly; each group's shards are then put back in ``items`` order.
    """
    deal = sorted(items, key=lambda i: -counts[i]) if largest_first else items
    heap = [(0, g) for g in range(groups)]
    out: list[list[int]] = [[] for _ in range(groups)]
    for i in deal:
        total, g = heapq.heappop(heap)
        out[g].append(i)
        heapq.heappush(heap, (total + counts[i], g))
    if largest_first:
        position = {i: p for p, i in enumerate(items)}
        for group in out:
            group.sort(key=position.__getitem__)
    return out


def split_shards(order: Sequence[int], counts: Sequence[int], world_size: int, workers: int,
                 largest_first: bool = False) -> list[list[list[int]]]:
    """``[rank][worker] -> shard indices``: split by rank first, then each rank's shards by worker."""
    return [balanced_split(r, counts, workers, largest_first)
            for r in balanced_split(order, counts, world_size, largest_first)]


def check_enough_shards(split: SplitIndex, world_size: int, workers: int, what: str) -> None:
    readers = world_size * workers
    if split.num_shards < readers:
        raise DataError(
            f"{what} ({split.info_path}, split {split.split!r}) has {split.num_shards} shards but {world_size} ranks x "
            f"{workers} workers = {readers} readers need at least {readers}, one per reader. Write more, smaller "
            f"shards (`python -m shards write ... --shard-size N` with N <= {max(1, split.samples // readers)}), "
            f"lower data.workers, or set data.resampled=true (shards drawn with replacement)")


# ------------------------------------------------------------------------------------------ train plan


class TrainPlan:
    """What every reader yields in every epoch: shard order, split, dataset interleave, shuffle seeds, quota.

    Pure and cheap (no file access), shared by the main process (quota, state checks) and the workers.

    * One dataset: the reader's shards in order. Several datasets without weights: a without-replacement
      interleave (the next sample comes from dataset d with probability proportional to what the reader still
      has of d), so an epoch is one pass over everything. With weights: draws with replacement by weight; a
      dataset that runs out starts another pass with a new shard order (more epochs of the small set).
    * ``resampled``: each reader draws shards with replacement from a (seed, epoch, slot) RNG, forever; the
      quota makes nominal epochs of ``total / readers`` samples. No minimum shard count.
    * Quota: every reader delivers exactly the same number of samples per epoch (the smallest reader's pass-0
      count; with resampling total / readers), so every rank yields the same number of batches.
    * ``exclude``: per dataset a boolean mask over its global sample index; those samples are left out of
      pass 0 (used to continue an epoch on a different number of readers without repeating what was seen).
    """

    def __init__(self, datasets: Sequence[SplitIndex], *, weights: Optional[Sequence[float]], seed: int,
                 world_size: int, workers: int, resampled: bool, shuffle_buffer: int,
                 exclude: Optional[Sequence[Optional[np.ndarray]]] = None, segment: int = 0):
        if not datasets:
            raise DataError("data.train is empty: name at least one shard folder written by "
                            f"`{WRITE_HINT}` (or set data.hf_dataset)")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights] if weights else None
        if self.weights is not None:
            if len(self.weights) != len(self.datasets) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise DataError(f"data.train_weights {list(weights)} must be {len(self.datasets)} non-negative "
                                "numbers with a positive sum, one per data.train entry")
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.workers = max(1, int(workers))
        self.readers = self.world_size * self.workers
        self.resampled = bool(resampled)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.exclude = list(exclude) if exclude is not None else [None] * len(self.datasets)
        self.segment = int(segment)
        self._split_cache: dict[tuple[int, int, int], list[list[list[int]]]] = {}
        self._quota_cache: dict[int, int] = {}
        self._counts_cache: dict[int, list[int]] = {}
        if not self.resampled:
            for i, d in enumerate(self.datasets):
                check_enough_shards(d, self.world_size, self.workers, f"data.train[{i}]")

    # --- per-dataset shard lists

    def _member_counts(self, d: int) -> list[int]:
        """Per-shard counts of pass 0 after exclusion (= info.json counts without exclusion)."""
        if d not in self._counts_cache:
            ds = self.datasets[d]
            mask = self.exclude[d]
            if mask is None:
                self._counts_cache[d] = list(ds.counts)
            else:
                kept = np.add.reduceat((~mask).astype(np.int64), np.asarray(ds.offsets))
                self._counts_cache[d] = [int(x) for x in kept]
        return self._counts_cache[d]

    def shard_split(self, epoch: int, d: int, passno: int = 0) -> list[list[list[int]]]:
        key = (epoch, d, passno)
        if key not in self._split_cache:
            ds = self.datasets[d]
            counts = self._member_counts(d) if passno == 0 else list(ds.counts)
            # an exclusion changes the counts, not the shard order, so the order stays the epoch's
            order = epoch_order(ds.num_shards, self.seed, epoch, (d, passno) if (d or passno) else ())
            if len(self._split_cache) > 64:
                self._split_cache.clear()
            # the rest of an epoch continued on another layout: every sample left, as evenly as whole shards allow
            rest = passno == 0 and self.exclude[d] is not None
            self._split_cache[key] = split_shards(order, counts, self.world_size, self.workers, largest_first=rest)
        return self._split_cache[key]

    def reader_counts(self, epoch: int, rank: int, worker: int) -> list[int]:
        """Pass-0 samples per dataset for one reader."""
        out = []
        for d in range(len(self.datasets)):
            counts = self._member_counts(d)
            out.append(sum(counts[j] for j in self.shard_split(epoch, d)[rank][worker]))
        return out

    def quota(self, epoch: int) -> int:
        """Samples every reader delivers in ``epoch`` (the same on all readers)."""
        if epoch not in self._quota_cache:
            if self.resampled:
                total = sum(d.samples for d in self.datasets)
                q = total // self.readers
            else:
                q = min(sum(self.reader_counts(epoch, r, w)) for r in range(self.world_size)
                        for w in range(self.workers))
            self._quota_cache[epoch] = q
        return self._quota_cache[epoch]

    # --- address streams

    def _seed(self, what: str, epoch: int, slot: int, *more) -> int:
        parts = (what, self.seed, epoch, slot) + tuple(more)
        if self.segment:
            parts += ("segment", self.segment)
        return stable_seed(*parts)

    def _substream(self, epoch: int, d: int, rank: int, worker: int, slot: int,
                   infinite: bool) -> Iterator[Address]:
        """Addresses of one dataset for one reader, in read order."""
        ds = self.datasets[d]
        instance = 0
        if self.resampled:
            rng = random.Random(self._seed("resample", epoch, slot, d))
            while True:
                j = rng.randrange(ds.num_shards)
                for m in range(ds.counts[j]):
                    yield _address(Address, (d, instance, j, m, instance))  # every draw is a new occurrence
                instance += 1
        passno = 0
        while True:
            mask = self.exclude[d] if passno == 0 else None
            for j in self.shard_split(epoch, d, passno)[rank][worker]:
                if mask is None:
                    for m in range(ds.counts[j]):
                        yield _address(Address, (d, instance, j, m, passno))
                else:
                    off = ds.offsets[j]
                    for m in np.flatnonzero(~mask[off: off + ds.counts[j]]).tolist():
                        yield _address(Address, (d, instance, j, m, passno))
                instance += 1
            if not infinite:
                return
            passno += 1

    def addresses(self, epoch: int, rank: int, worker: int) -> Iterator[Address]:
        """A reader's input addresses (before the shuffle buffer) for an epoch; may run past the quota."""
        slot = rank * self.workers + worker
        n = len(self.datasets)
        if n == 1:
            yield from self._substream(epoch, 0, rank, worker, slot, infinite=self.resampled)
            return
        rng = random.Random(self._seed("interleave", epoch, slot))
        if self.weights is None and not self.resampled:
            remaining = self.reader_counts(epoch, rank, worker)
            subs = [self._substream(epoch, d, rank, worker, slot, infinite=False) for d in range(n)]
            total = sum(remaining)
            while total > 0:
                x = rng.randrange(total)
                d = 0
                while x >= remaining[d]:
                    x -= remaining[d]
                    d += 1
                remaining[d] -= 1
                total -= 1
                yield next(subs[d])
            return
        weights = self.weights or [float(ds.samples) for ds in self.datasets]
        subs = [self._substream(epoch, d, rank, worker, slot, infinite=True) for d in range(n)]
        cum = (np.cumsum(weights) / sum(weights)).tolist()
        cum[-1] = 1.0  # random() < 1, so a zero-weight dataset (equal cumulative values) is never drawn
        while True:
            yield next(subs[bisect.bisect_right(cum, rng.random())])

    def global_index(self, address: Address) -> tuple[int, int]:
        """(dataset, index of the sample within the dataset's split)."""
        return address.dataset, self.datasets[address.dataset].offsets[address.shard] + address.member

    def stream(self, epoch: int, rank: int, worker: int, fetch: Optional[Fetch] = None) -> "ShuffleStream":
        slot = rank * self.workers + worker
        return ShuffleStream(self.addresses(epoch, rank, worker), self.shuffle_buffer,
                             random.Random(self._seed("shuffle", epoch, slot)), self.quota(epoch), fetch)

    def delivered(self, epoch: int, rank: int, worker: int, count: int) -> Iterator[Address]:
        """The first ``count`` addresses a reader delivered (no file access); for seen-sample bookkeeping."""
        s = self.stream(epoch, rank, worker)
        for _ in range(min(count, s.quota)):
            yield s.next(load=False)[0]


class ShuffleStream:
    """A seeded shuffle buffer over an address stream, truncated at ``quota`` outputs.

    Entries are ``[input_index, address, content]``. ``next(load=True)`` fetches each input's content when it
    enters the buffer; ``skip(n)`` moves the same RNG through ``n`` outputs without any content, then
    ``materialize()`` fetches, in read order, only what is left in the buffer. The RNG draws depend only on the
    buffer's length, so both paths produce the same sequence of addresses.
    """

    def __init__(self, inputs: Iterator, size: int, rng: random.Random, quota: int, fetch=None):
        self._inputs = inputs
        self.size = max(1, int(size))
        self._rng = rng
        self.quota = quota
        self.fetch = fetch
        self.buf: list[list[Any]] = []
        self._pulled = 0
        self._done = False
        self.delivered = 0

    def _top_up(self, load: bool) -> None:
        while len(self.buf) < self.size and not self._done:
            a = next(self._inputs, None)
            if a is None:
                self._done = True
                break
            content = self.fetch(a) if (load and self.fetch is not None) else None
            self.buf.append([self._pulled, a, content])
            self._pulled += 1

    @property
    def remaining(self) -> int:
        return self.quota - self.delivered

    def next(self, load: bool = True) -> tuple[Any, Any]:
        """(address, content) of the next output; StopIteration at the quota or when the inputs run dry."""
        if self.delivered >= self.quota:
            raise StopIteration
        self._top_up(load)
        if not self.buf:
            raise StopIteration
        i = self._rng.randrange(len(self.buf))
        last = self.buf.pop()
        if i < len(self.buf):
            entry, self.buf[i] = self.buf[i], last
        else:
            entry = last
        self.delivered += 1
        return entry[1], entry[2]

    def skip(self, n: int) -> None:
        for _ in range(min(n, self.remaining)):
            try:
                self.next(load=False)
            except StopIteration:
                break
        self.materialize()

    def materialize(self) -> None:
        if self.fetch is None:
            return
        for entry in sorted((e for e in self.buf if e[2] is None), key=lambda e: e[0]):
            entry[2] = self.fetch(entry[1])

    def peek_contents(self) -> Iterator[Any]:
        """Contents still in the buffer, in buffer order (a deterministic fallback source)."""
        for e in self.buf:
            yield e[1], e[2]


# ------------------------------------------------------------------------------------------ tar reading


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.jpg_small' -> ('dir/abc', 'jpg_small'): the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (head + "/" + stem if head else stem), ext


_WARNED_URLS: set[str] = set()


def mark_warned(*urls: str) -> None:
    """Record that a loader worker warned about ``urls``: the readers of the next epoch or stage carry them into
    their workers (:func:`warned_urls`), which do not repeat the warning."""
    _WARNED_URLS.update(urls)


def warned_urls() -> frozenset[str]:
    return frozenset(_WARNED_URLS)


def _warn_remote_once(url: str, error: Exception, remote: Optional[RemoteOptions]) -> None:
    if url not in _WARNED_URLS:  # once per shard URL and process, however often the shard comes back
        _WARNED_URLS.add(url)
        retries = (remote or RemoteOptions()).retries
        print(f"warning: {error}; the rest of this shard is counted as bad samples (data.remote_retries={retries})",
              file=sys.stderr, flush=True)


class ShardReader:
    """Reads one dataset's samples for one reader, in stream order, opening a shard only when needed.

    ``get(instance, shard, member)`` must be called with non-decreasing (instance, member); members before the
    wanted one are passed over without reading their data (seeks for local files, reads-and-drops for pipes).
    A shard that ends early or breaks yields :class:`Missing` for every sample it still owes.
    """

    def __init__(self, split: SplitIndex, remote: Optional[RemoteOptions] = None):
        self.split = split
        self.remote = remote
        self._instance = -1
        self._tf: Optional[TarStream] = None
        self._pending = None  # (member, ext, sample_index, key): a header read but not consumed
        self._last_key: Optional[str] = None
        self._count = -1
        self._eof = False
        self._broken: Optional[str] = None
        self._url = ""
        self.opened = 0  # shards opened (tests check that fast-forward skips whole shards)

    def close(self) -> None:
        if self._tf is not None:
            self._tf.close()
        self._tf = None

    def _open(self, instance: int, shard: int) -> None:
        self.close()
        self._instance = instance
        self._pending, self._last_key, self._count, self._eof, self._broken = None, None, -1, False, None
        self._url = url = self.split.urls[shard]
        self.opened += 1
        try:
            sha256 = self.split.sha256[shard] if self.split.sha256 else None  # checked by the cache on fill
            self._tf = TarStream(_open_url(url, self.remote, sha256)) if is_url(url) else TarStream.open(url)
        except Exception as e:
            self._broken = f"cannot open shard: {type(e).__name__}: {e}"
            self.close()
            if isinstance(e, RemoteError):
                _warn_remote_once(url, e, self.remote)

    def _advance(self) -> None:
        assert self._tf is not None
        while True:
            ti = self._tf.next()
            if ti is None:
                self._eof = True
                self._pending = None
                return
            key, ext = split_member_name(ti.name)
            if key != self._last_key:
                self._last_key = key
                self._count += 1
            self._pending = (ti, ext, self._count, key)
            return

    def get(self, instance: int, shard: int, member: int) -> "dict | Missing":
        if instance != self._instance:
            self._open(instance, shard)
        url = self._url
        if self._broken is not None:
            return Missing(f"{os.path.basename(url)}#{member}", url, self._broken)
        group: Optional[dict] = None
        try:
            while True:
                if self._pending is None:
                    if self._eof:
                        break
                    self._advance()
                    if self._pending is None:
                        break
                ti, ext, idx, key = self._pending
                if idx > member:
                    if group is None:
                        raise RuntimeError(f"{url}: sample {member} requested after sample {idx} was read "
                                           "(reads must go forward)")
                    break
                if idx == member:
                    if group is None:
                        group = {"__key__": key, "__url__": url}
                    group[ext] = self._tf.read()  # TarFormatError if the shard ends inside the member
                self._pending = None
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:  # cut, I/O, pipe
            self._broken = f"shard unreadable after sample {self._count}: {type(e).__name__}: {e}"
            self.close()
            if isinstance(e, RemoteError):
                _warn_remote_once(url, e, self.remote)
            if group is None:
                return Missing(f"{os.path.basename(url)}#{member}", url, self._broken)
            return Missing(group["__key__"], url, self._broken)  # the sample itself may be cut short
        if group is None:
            self._broken = (f"shard ended after {self._count + 1} samples, info.json says "
                            f"{self.split.counts[shard]}")
            return Missing(f"{os.path.basename(url)}#{member}", url, self._broken)
        return group


class DatasetReaders:
    """One :class:`ShardReader` per dataset: the ``fetch`` callback of a reader's :class:`ShuffleStream`."""

    def __init__(self, datasets: Sequence[SplitIndex], remote: Optional[RemoteOptions] = None):
        self.readers = [ShardReader(d, remote) for d in datasets]

    def __call__(self, address: Address) -> Content:
        return self.readers[address.dataset].get(address.instance, address.shard, address.member)

    @property
    def opened(self) -> int:
        return sum(r.opened for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()


# ------------------------------------------------------------------------------------------- eval plan


def eval_ranges(total: int, readers: int) -> list[tuple[int, int]]:
    """Contiguous global-index ranges, one per reader, sizes differing by at most one; every sample once."""
    return [(total * s // readers, total * (s + 1) // readers) for s in range(readers)]


def eval_addresses(split: SplitIndex, start: int, stop: int) -> Iterator[Address]:
    """Addresses of global samples [start, stop) in info.json order (dataset 0; instance = shard index)."""
    j = int(np.searchsorted(split.offsets, start, side="right")) - 1
    g = start
    while g < stop and j < split.num_shards:
        off, n = split.offsets[j], split.counts[j]
        for m in range(g - off, min(n, stop - off)):
            yield Address(0, j, j, m, 0)
        g = off + n
        j += 1
