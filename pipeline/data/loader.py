"""Streaming loaders: the resumable training loader (shards or a datasets folder) and the eval loader.

Training. ``build_train_loader(cfg.data, stage=..., micro_batch_size=..., ...)`` returns a :class:`TrainLoader`,
an endless iterator of :class:`~.protocol.Batch` records (``image`` (B, C, H, W), ``target`` (B, K) soft targets,
``key`` [B keys]; read by attribute or like the dict they were, ``batch["image"]``) across epochs; ``stage`` is a
:class:`~.protocol.Stage`. Each rank runs ``data.workers`` reader processes (or reads in-process with
0 workers); each reader streams its own shards (see shards.py), decodes and transforms its samples and builds
whole batches, including mixup / cutmix. The per-sample augmentation is seeded from (seed, epoch, sample key) and
the batch mixing from (seed, epoch, reader, position), so what a sample becomes depends on nothing else.

Position and resume. Every batch comes with a :class:`~.protocol.ReaderReport`: the reader it came from and
that reader's position (samples delivered); the loader records them as the *consumer* receives batches, so
prefetched batches that were never handed out do not count. torch's DataLoader polls its workers round-robin
starting at worker 0 and skips exhausted ones; on a restart (resume, stage change, new epoch) worker ``i`` serves
reader ``(i + next_reader) % workers``, so the round-robin continues where it stopped. Fast-forward replays only
the readers' RNGs and reads the tar members still in the shuffle buffers; nothing is decoded. After
``load_state_dict`` the batches' keys (and, at the same stage, images and targets) are those the uninterrupted
run would have produced. A state from a different number of ranks or workers continues the epoch with the
samples not yet seen (no sample twice in the epoch) -- exactly, but not in the same order as an uninterrupted
run on the new layout.

``data.resampled``: every reader draws shards with replacement from a (seed, epoch, reader) RNG and an "epoch"
is nominal (dataset size / readers per reader). The draws are as deterministic as the rest, so a resume on the
same layout is exact here too; a resume on another layout starts fresh draws (statistically equivalent: with
replacement there is no "already seen" to avoid).

Equal batches per rank: every reader of every rank delivers the same number of samples per epoch (the smallest
reader's share; the rest of the others' shares waits for the next epoch's order), and bad samples are replaced
inside their batch instead of shortening it, so no rank ever waits in a collective for a batch that does not
come.

Eval. ``build_eval_loader`` splits the validation samples into contiguous ranges, one per reader: every sample
exactly once across ranks; ranks with fewer batches get padding batches (:class:`~.protocol.EvalBatch`), and
``batch.valid`` marks the real samples.

Sources. Shard folders and a datasets folder are both a :class:`~.protocol.Source` (a Plan, a Fetch factory and
the facts checked on resume); see protocol.py for what another source implements.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import remote as remote_io

from ..config import DataConfig
from .decode import resolve_decoder
from .hf import HFPlan, HFSource, row_address
from .mixing import mix_batch, multi_label_targets, one_hot_targets
from .protocol import (
    Address,
    Batch,
    Content,
    EvalBatch,
    Fetch,
    Missing,
    Plan,
    ReaderBatch,
    ReaderFailure,
    ReaderReport,
    SampleStream,
    Source,
    Stage,
)
from .shards import (
    DataError,
    DatasetReaders,
    SplitIndex,
    TrainPlan,
    check_damage,
    eval_addresses,
    eval_ranges,
    load_split,
    mark_warned,
    sample_seed,
    stable_seed,
    verify_sample,
    warned_urls,
)
from .transforms import EvalTransform, TrainTransform
from .workers import worker_options

STATE_VERSION = 1
STATE_KIND = "effnetv2-train-loader"
# The bad-sample threshold is checked once this many samples were seen (and at every epoch end), so that
# one corrupt image among the first few does not stop a run with a 1 % threshold.
MIN_SAMPLES_FOR_BAD_CHECK = 500
_MAX_BAD_EXAMPLES = 5


# ------------------------------------------------------------------------------------------- sources


class _Same:
    """A picklable ``lambda: obj`` (reader processes may be spawned, not forked)."""

    def __init__(self, obj):
        self.obj = obj

    def __call__(self):
        return self.obj


def _hf_addresses(start: int, stop: int) -> Iterator[Address]:
    return (row_address(i) for i in range(start, stop))


_Source = Source  # its name before protocol.py


def _label_maps(splits: Sequence[SplitIndex]) -> list[Optional[np.ndarray]]:
    """Map each dataset's class indices onto the first dataset's by wnid (ImageNet-1k inside 21k)."""
    ref = splits[0].wnids()
    ref_index = {w: i for i, w in enumerate(ref) if w is not None}
    maps: list[Optional[np.ndarray]] = [None]
    for d, s in enumerate(splits[1:], start=1):
        w = s.wnids()
        if w == ref or (not s.classes and s.num_classes <= splits[0].num_classes):
            maps.append(None)
            continue
        unknown = [x for x in w if x not in ref_index]
        if unknown:
            raise DataError(f"data.train[{d}] ({s.info_path}) has classes that data.train[0] ({splits[0].info_path}) "
                            f"does not: {unknown[:5]} ({len(unknown)} in all); datasets are mixed in the first one's "
                            "label space (matched by wnid), so put the dataset with every class first")
        maps.append(np.asarray([ref_index[x] for x in w], dtype=np.int64))
    return maps


def _check_splits(splits: Sequence[SplitIndex], cfg: DataConfig, world_size: int, rank: int, what: str) -> None:
    """At start, not hours in: damage visible from file sizes, and checksums asked for but not recorded.

    Training data: errors. Validation data (``what`` data.val, built at the first evaluation): warnings only,
    as its damaged samples are left out of the metrics and counted, never trained on.
    """
    def warn(msg: str) -> None:
        if rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    train = what == "data.train"
    for i, s in enumerate(splits):
        where = f"{what}[{i}]" if train else what
        if cfg.verify_checksums and not s.checksums:
            msg = (f"data.verify_checksums=true but {s.info_path} records no checksums (shards written before "
                   "format version 2)")
            if train:
                raise DataError(f"{msg}: rewrite them with `python -m shards write ...`, or set "
                                "data.verify_checksums=false")
            warn(f"{msg}: its samples are read unchecked")
        try:
            warning = check_damage(s, cfg.max_bad_fraction, world_size, where)
        except DataError as e:
            if train:
                raise
            warning = str(e)
        if warning:
            warn(warning)


def _shard_source(cfg: DataConfig, *, seed: int, world_size: int, workers: int, rank: int = 0) -> Source:
    if not cfg.train:
        raise DataError("data.train is empty: list shard folders written by `python -m shards write` "
                        "(or set data.hf_dataset to a datasets folder)")
    remote = remote_options(cfg)
    splits = [load_split(root, cfg.train_split, allow_pipe=cfg.allow_pipe, remote=remote) for root in cfg.train]
    _check_splits(splits, cfg, world_size, rank, "data.train")

    def make_plan(world_size: int, workers: int, exclude=None, segment: int = 0) -> TrainPlan:
        return TrainPlan(splits, weights=cfg.train_weights or None, seed=seed, world_size=world_size,
                         workers=workers, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
                         exclude=exclude, segment=segment)

    plan = make_plan(world_size, workers)
    identity = {"type": "shards", "datasets": [s.fingerprint() for s in splits],
                "weights": list(cfg.train_weights), "resampled": bool(cfg.resampled),
                "shuffle_buffer": int(cfg.shuffle_buffer), "seed": int(seed)}
    names = ", ".join(f"{s.root} ({s.samples} samples, {s.num_shards} shards)" for s in splits)
    return Source(kind="shards", plan=plan, make_plan=make_plan,
                  make_fetch=functools.partial(DatasetReaders, splits, remote),
                  num_classes=splits[0].num_classes, label_maps=_label_maps(splits),
                  multi_label=[s.multi_label for s in splits], identity=identity, describe=names,
                  dataset_samples=sum(s.samples for s in splits), classes=splits[0].classes,
                  dataset_sizes=[s.samples for s in splits], draws_with_replacement=bool(cfg.resampled))


def _hf_source(cfg: DataConfig, *, seed: int, world_size: int, workers: int, split: str) -> Source:
    src = HFSource.from_config(cfg, split)

    def make_plan(world_size: int, workers: int, exclude=None, segment: int = 0) -> HFPlan:
        return HFPlan(len(src), seed=seed, world_size=world_size, workers=workers, exclude=exclude,
                      segment=segment)

    identity = {"type": "hf", "datasets": [src.fingerprint()], "seed": int(seed)}
    return Source(kind="hf", plan=make_plan(world_size, workers), make_plan=make_plan, make_fetch=_Same(src),
                  num_classes=src.num_classes, label_maps=[None], multi_label=[src.multi_label],
                  identity=identity, describe=f"{cfg.hf_dataset} [{split}] ({len(src)} samples)",
                  dataset_samples=len(src), classes=src.classes, dataset_sizes=[len(src)])


def remote_options(cfg: DataConfig) -> remote_io.RemoteOptions:
    """How http(s):// and s3:// shards are read (retries, timeouts, endpoint, node-local cache)."""
    return remote_io.RemoteOptions(
        retries=cfg.remote_retries, backoff_s=cfg.remote_backoff_s, backoff_max_s=cfg.remote_backoff_max_s,
        timeout_s=cfg.remote_timeout_s, s3_endpoint_url=cfg.s3_endpoint_url, cache_dir=cfg.cache_dir,
        cache_bytes=int(cfg.cache_gb * 1e9) if cfg.cache_dir else 0)


# -------------------------------------------------------------------------------------------- labels


def _parse_labels(sample: dict, multi_label: bool, label_map: Optional[np.ndarray], num_classes: int) -> list[int]:
    if multi_label and "json" in sample:
        labels = json.loads(sample["json"]).get("labels")
        if not isinstance(labels, list) or not labels:
            raise ValueError("multi-label sample without a non-empty 'labels' list in its json")
        labels = [int(x) for x in labels]
    elif "cls" in sample:
        labels = [int(sample["cls"])]
    else:
        raise ValueError(f"no 'cls' member (members: {sorted(k for k in sample if not k.startswith('__'))})")
    if label_map is not None:
        if any(not 0 <= x < len(label_map) for x in labels):
            raise ValueError(f"label {labels} outside the dataset's {len(label_map)} classes")
        labels = [int(label_map[x]) for x in labels]
    if any(not 0 <= x < num_classes for x in labels):
        raise ValueError(f"label {labels} outside [0, {num_classes})")
    return labels


def _soft_targets(labels: list[list[int]], num_classes: int, smoothing: float) -> torch.Tensor:
    """(B, K) targets summing to 1: one-hot (or multi-hot / n) with label smoothing."""
    if all(len(x) == 1 for x in labels):
        return one_hot_targets(torch.tensor([x[0] for x in labels], dtype=torch.long), num_classes, smoothing)
    return multi_label_targets(labels, num_classes, smoothing)


# --------------------------------------------------------------------------------------- train reader


class _Decoded(NamedTuple):
    """One sample after decoding: an image and labels, or the error that replaced them."""

    image: Optional[torch.Tensor]
    labels: Optional[list[int]]
    key: str
    error: Optional[str]


class _TrainReaders(IterableDataset):
    """One epoch segment of one rank: iterated in each worker (or in-process), yields whole batches as
    :class:`ReaderBatch` records (a :class:`ReaderFailure` when the data cannot go on)."""

    def __init__(self, *, source: Source, plan: Plan, epoch: int, rank: int, workers: int, positions: list[int],
                 start_reader: int, batch_size: int, transform: Callable, num_classes: int, smoothing: float,
                 mixup: float, cutmix: float, seed: int, verify_checksums: bool = False):
        self.plan, self.epoch, self.rank = plan, epoch, rank
        self.verify_checksums = verify_checksums
        self.make_fetch = source.make_fetch
        self.multi_label, self.label_maps = list(source.multi_label), list(source.label_maps)
        self.workers = max(1, workers)
        self.positions = list(positions)
        self.start_reader = start_reader
        self.batch_size = batch_size
        self.transform = transform
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.mixup, self.cutmix = mixup, cutmix
        self.seed = seed
        self.sample_base = stable_seed("sample", seed, epoch)
        self.warned = warned_urls()  # shard URLs earlier workers warned about: not again (workers may not fork)

    def __iter__(self) -> Iterator[Union[ReaderBatch, ReaderFailure]]:
        info = get_worker_info()
        reader = 0 if info is None else (info.id + self.start_reader) % self.workers
        return self._run(reader)

    def _run(self, reader: int) -> Iterator[Union[ReaderBatch, ReaderFailure]]:
        mark_warned(*self.warned)
        fetch: Fetch = self.make_fetch()
        self._io_mark = remote_io.counters_snapshot()
        try:
            stream = self.plan.stream(self.epoch, self.rank, reader, fetch=fetch)
            stream.skip(self.positions[reader])
            while stream.remaining >= self.batch_size:
                yield self._batch(stream, reader)
        except DataError as e:
            yield ReaderFailure(str(e))
        finally:
            fetch.close()

    def _decode(self, address: Address, content: Content) -> _Decoded:
        """The sample's image and labels; its augmentation seeded from (seed, epoch, key)."""
        if isinstance(content, Missing):
            return _Decoded(None, None, content.key, content.reason)
        key = content.get("__key__", "?")
        d = address.dataset
        try:
            if self.verify_checksums:
                verify_sample(content)
            labels = _parse_labels(content, self.multi_label[d], self.label_maps[d], self.num_classes)
            s = sample_seed(self.sample_base, key if not address.occurrence else f"{key}#{address.occurrence}")
            random.seed(s)
            torch.default_generator.manual_seed(s)
            image = self.transform(content)
        except Exception as e:  # decode errors, bad labels: counted, shown in the threshold error
            return _Decoded(None, None, key, f"{type(e).__name__}: {e}")
        return _Decoded(image, labels, key, None)

    def _batch(self, stream: SampleStream, reader: int) -> ReaderBatch:
        start_pos = stream.delivered
        items = [stream.next() for _ in range(self.batch_size)]
        images, labels, keys, bad = [], [], [], []
        for address, content in items:
            image, lab, key, err = self._decode(address, content)
            images.append(image)
            labels.append(lab)
            keys.append(key)
            if err is not None:
                url = content.url if isinstance(content, Missing) else content.get("__url__", "?")
                bad.append(Missing(key, url, err))
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            # the whole batch failed: take a replacement from the shuffle buffer, which is the same in a
            # resumed run (decoding it here does not consume it)
            for address, content in stream.peek_contents():
                image, lab, key, err = self._decode(address, content)
                if err is None:
                    images[0], labels[0], keys[0] = image, lab, key
                    good = [0]
                    break
            else:
                raise DataError(f"all {self.batch_size} samples of a batch failed and no readable replacement "
                                f"is left in the shuffle buffer (e.g. {bad[0].url}: {bad[0].reason}); check the "
                                "shards with `python -m shards verify`")
        # bad samples are replaced by good ones of the same batch: the batch keeps its size, and the position
        # (samples consumed) is the same whatever fails to decode
        j = 0
        for i in range(len(images)):
            if images[i] is None:
                src = good[j % len(good)]
                j += 1
                images[i], labels[i], keys[i] = images[src], labels[src], keys[src]
        image = torch.stack(images)  # (B, C, H, W)
        target = _soft_targets(labels, self.num_classes, self.smoothing)
        if self.mixup > 0 or self.cutmix > 0:
            slot = self.rank * self.workers + reader
            gen = torch.Generator().manual_seed(stable_seed("mix", self.seed, self.epoch, slot, start_pos)
                                                & 0x7FFFFFFFFFFFFFFF)
            image, target = mix_batch(image, target, self.mixup, self.cutmix, gen)
        io_delta = remote_io.counters_since(self._io_mark)
        report = ReaderReport(reader=reader, position=stream.delivered, samples=len(items), bad=len(bad),
                              bad_examples=tuple(bad[:_MAX_BAD_EXAMPLES]),
                              remote=tuple((k, v) for k, v in io_delta.items() if v))
        return ReaderBatch(Batch(image=image, target=target, key=keys), report)


# -------------------------------------------------------------------------------------- train loader


@contextlib.contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global CPU generators as they were before the block: reading in the
    training process must not move the trainer's random streams (a worker process has its own)."""
    py, nps, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(nps)
        torch.set_rng_state(th)


def _rngs_kept_per_item(it: Iterator) -> Iterator:
    """``it``'s items, each produced under :func:`_global_rngs_kept` (the consumer runs between items)."""
    while True:
        with _global_rngs_kept():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _loader_generator(*parts: Any) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from when an iterator starts.

    Without one it draws from torch's global generator: the trainer's dropout / stochastic-depth stream. A
    run resumed mid-stage starts its reader processes at the resume step, where the uninterrupted run did
    not, so every mask after it would differ (and a stage change or eval pass would shift the stream too).
    The readers reseed per sample, so this seed only has to be deterministic, never shared with training.
    """
    return torch.Generator().manual_seed(stable_seed("dataloader", *parts) & 0x7FFFFFFFFFFFFFFF)


def _default_transform(cfg: DataConfig, stage: Stage) -> Callable:
    return TrainTransform(cfg, stage.image_size, stage.randaug)


def _check_stage(stage: Any) -> None:
    if not isinstance(stage, Stage):
        raise TypeError(f"the training loader takes a pipeline.progressive.Stage, got {type(stage).__name__} (build "
                        "one: Stage(index=0, start_step=0, end_step=1, image_size=..., mixup=..., ...))")


class TrainLoader:
    """Endless, resumable batches for one rank; see the module docstring for the guarantees.

    Counters (per rank, saved in the state): ``samples_seen`` (samples consumed, bad ones included),
    ``bad_samples``. ``stats()`` adds samples/s and the time the consumer waited for batches.
    """

    def __init__(self, cfg: DataConfig, source: Source, *, stage: Stage, micro_batch_size: int, num_classes: int,
                 label_smoothing: float, seed: int, rank: int, world_size: int, workers: int,
                 transform_factory: Optional[Callable[[DataConfig, Stage], Callable]] = None):
        _check_stage(stage)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg = cfg
        self.source = source
        self.plan = source.plan
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(0, int(workers))  # DataLoader processes (0: read in this process)
        self.readers_per_rank = max(1, self.num_workers)
        self.seed = int(seed)
        self.num_classes = int(num_classes) if num_classes else source.num_classes
        if self.num_classes < source.num_classes:
            raise DataError(f"the model has {self.num_classes} classes but the training data has "
                            f"{source.num_classes} ({source.describe}); set model.num_classes=0 to take the "
                            "data's class count, or a value >= it")
        self.label_smoothing = float(label_smoothing)
        self._transform_factory = transform_factory or _default_transform
        self.stage = stage
        self.micro_batch_size = int(micro_batch_size)
        self._transform = None
        self._transform_now()  # build it here: a bad setting fails at construction, not at the first batch
        self.epoch = 0
        self.positions = [0] * self.readers_per_rank
        self.next_reader = 0
        self.history: list[dict] = []  # earlier layouts within the current epoch (after a world-size change)
        self.samples_seen = 0
        self.bad_samples = 0
        self.batches = 0
        self.bad_examples: list[Missing] = []
        self.remote_io = {k: 0 for k in remote_io.COUNTERS}  # retries, bytes, wait_s, ... (this rank's readers)
        self._it: Optional[Iterator] = None
        self._dl: Optional[DataLoader] = None
        self._empty_epochs = 0
        self._epoch_first_batch = 0  # self.batches when the current epoch began (or the loader was restored)
        # throughput window
        self.wait_s = 0.0
        self._win_start = time.perf_counter()
        self._win_samples = 0
        self._win_wait = 0.0
        self._check_batch_size()

    # --- public properties

    @property
    def quota(self) -> int:
        """Samples each reader delivers this epoch (equal on all readers of all ranks)."""
        return self.plan.quota(self.epoch)

    @property
    def dataset_samples(self) -> int:
        return self.source.dataset_samples

    @property
    def classes(self) -> tuple:
        return self.source.classes

    def batches_per_epoch(self, micro_batch_size: Optional[int] = None) -> int:
        """Batches per rank in a whole epoch at a fixed micro-batch size (the same on every rank)."""
        b = micro_batch_size or self.micro_batch_size
        return self.readers_per_rank * (self.plan.quota(self.epoch) // b)

    # --- iteration

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._start()
            t0 = time.perf_counter()
            try:
                if self.num_workers == 0:
                    # in-process readers reseed the global RNGs per sample; keep the trainer's streams intact
                    with _global_rngs_kept():
                        rec = next(self._it)
                else:
                    rec = next(self._it)
            except StopIteration:
                self._end_epoch()
                continue
            waited = time.perf_counter() - t0
            self.wait_s += waited
            self._win_wait += waited
            return self._accept(rec)

    def _check_batch_size(self) -> None:
        q = self.plan.quota(self.epoch)
        if q < self.micro_batch_size:
            raise DataError(
                f"each of the {self.world_size} ranks x {self.readers_per_rank} readers gets {q} samples per epoch "
                f"({self.source.describe}), fewer than the micro-batch size {self.micro_batch_size}; lower "
                "data.workers or the micro-batch size, or use more data")

    def _transform_now(self) -> Callable:
        if self._transform is None:
            self._transform = self._transform_factory(self.cfg, self.stage)
        return self._transform

    def _start(self) -> None:
        self._check_batch_size()
        readers = _TrainReaders(
            source=self.source, plan=self.plan, epoch=self.epoch, rank=self.rank, workers=self.readers_per_rank,
            positions=self.positions, start_reader=self.next_reader, batch_size=self.micro_batch_size,
            transform=self._transform_now(), num_classes=self.num_classes, smoothing=self.label_smoothing,
            mixup=float(self.stage.mixup), cutmix=float(self.stage.cutmix), seed=self.seed,
            verify_checksums=self.cfg.verify_checksums)
        if self.num_workers == 0:
            self._dl = None
            self._it = iter(readers)
        else:
            self._dl = DataLoader(readers, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                  **worker_options(self.cfg.worker_start),
                                  generator=_loader_generator("train", self.seed, self.epoch, self.rank))
            self._it = iter(self._dl)

    def _stop(self) -> None:
        it, self._it, self._dl = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        """Stop the reader processes (prefetched batches are dropped; the position stays where it was)."""
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass

    def _end_epoch(self) -> None:
        self._stop()
        # Empty means no batch in the whole epoch. An epoch whose last batch came just before a restart (a
        # stage change at the epoch's end) also ends here with nothing new from the restarted readers: it is
        # not empty, and it must not count towards the two empty epochs in a row that stop the run.
        if self.batches == self._epoch_first_batch:
            self._empty_epochs += 1
            if self._empty_epochs > 1:
                raise DataError(f"the loader produced no batch in a whole epoch ({self.source.describe}); "
                                "every shard may be unreadable")
        else:
            self._empty_epochs = 0
        self._check_bad(force=True)
        self.epoch += 1
        self._epoch_first_batch = self.batches
        self.positions = [0] * self.readers_per_rank
        self.next_reader = 0
        if self.history:
            self.history = []
            self.plan = self.source.make_plan(self.world_size, self.readers_per_rank)

    def _accept(self, rec: Union[ReaderBatch, ReaderFailure]) -> Batch:
        if isinstance(rec, ReaderFailure):
            self._stop()
            raise DataError(rec.message)
        report = rec.report
        self.positions[report.reader] = report.position
        self.next_reader = (report.reader + 1) % self.readers_per_rank
        self.samples_seen += report.samples
        self._win_samples += report.samples
        self.bad_samples += report.bad
        for k, v in report.remote:
            self.remote_io[k] += v
        self.batches += 1
        if report.bad_examples:
            self.bad_examples = (self.bad_examples + list(report.bad_examples))[-_MAX_BAD_EXAMPLES:]
            for b in report.bad_examples:
                if "RemoteError" in b.reason:  # the worker warned about it; the next epoch's workers must not
                    mark_warned(b.url)
        self._check_bad()
        return rec.batch

    def _check_bad(self, force: bool = False) -> None:
        if self.samples_seen == 0 or (not force and self.samples_seen < MIN_SAMPLES_FOR_BAD_CHECK):
            return
        frac = self.bad_samples / self.samples_seen
        if frac > self.cfg.max_bad_fraction:
            self._stop()
            lines = "; ".join(f"{b.key} in {b.url}: {b.reason}" for b in self.bad_examples)
            raise DataError(
                f"rank {self.rank}: {self.bad_samples} of {self.samples_seen} samples ({frac:.2%}) could not be "
                f"read or decoded, above data.max_bad_fraction={self.cfg.max_bad_fraction:g}. Recent: {lines}. "
                "Check the shards (`python -m shards verify FOLDER`), rewrite the damaged ones, or raise "
                "data.max_bad_fraction")

    # --- stages

    def set_stage(self, stage: Stage, micro_batch_size: Optional[int] = None) -> None:
        """Switch to a stage's transforms (and micro-batch size) at the current position.

        The readers restart from the samples the consumer has received: prefetched batches of the old stage
        are dropped and their samples come again under the new stage, so none is lost or repeated.
        """
        _check_stage(stage)
        self._stop()
        self.stage = stage
        if micro_batch_size is None:
            micro_batch_size = stage.micro_batch_size or self.micro_batch_size
        self.micro_batch_size = int(micro_batch_size)
        self._transform = None
        self._check_batch_size()

    # --- counters

    def stats(self, reset: bool = True) -> dict:
        """Counters for logging; samples/s and wait time cover the window since the last reset."""
        now = time.perf_counter()
        window = max(now - self._win_start, 1e-9)
        out = {"epoch": self.epoch, "samples_seen": self.samples_seen, "bad_samples": self.bad_samples,
               "bad_fraction": self.bad_samples / max(1, self.samples_seen),
               "samples_per_s": self._win_samples / window, "wait_s": self._win_wait,
               "wait_fraction": self._win_wait / window, "wait_s_total": self.wait_s,
               **{f"remote_{k}": v for k, v in self.remote_io.items()}}
        if reset:
            self._win_start, self._win_samples, self._win_wait = now, 0, 0.0
        return out

    # --- state

    def state_dict(self) -> dict:
        """The position and counters. Positions are the same on every rank (all ranks consume alike), so a
        state saved by any rank restores any rank's position; ``bad_samples`` is this rank's."""
        return {"version": STATE_VERSION, "kind": STATE_KIND, "source": dict(self.source.identity),
                "world_size": self.world_size, "workers": self.readers_per_rank, "rank": self.rank,
                "epoch": self.epoch, "positions": list(self.positions), "next_reader": self.next_reader,
                "history": [dict(h) for h in self.history], "samples_seen": self.samples_seen,
                "bad_samples": self.bad_samples, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise DataError("the checkpoint's data-loader state is not a training-loader state; it cannot be "
                            "resumed by this version (start with checkpoint.resume=none)")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data-loader state version {state.get('version')} (this code reads {STATE_VERSION}); "
                            "resume with the code version that wrote the checkpoint")
        saved, now = state["source"], self.source.identity
        changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k)]
        if changed:
            raise DataError("cannot resume the data stream: the data or its order changed since the checkpoint ("
                            + "; ".join(changed) + "). Restore data.train / data.train_weights / "
                            "data.shuffle_buffer / data.resampled / train.seed, or start a new run")
        self._stop()
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])
        self.bad_samples = int(state["bad_samples"]) if state.get("rank") == self.rank else 0
        self.batches = int(state.get("batches", 0))
        self._epoch_first_batch = self.batches
        same_layout = (state["world_size"] == self.world_size and state["workers"] == self.readers_per_rank)
        history = [dict(h) for h in state.get("history", [])]
        if same_layout:
            self.positions = [int(p) for p in state["positions"]]
            self.next_reader = int(state["next_reader"])
        else:
            history.append({"world_size": int(state["world_size"]), "workers": int(state["workers"]),
                            "positions": [int(p) for p in state["positions"]]})
            self.positions = [0] * self.readers_per_rank
            self.next_reader = 0
        self.history = history
        self.plan = self._plan_after(history)
        self._check_batch_size()

    def _plan_after(self, history: list[dict]) -> Plan:
        """The plan for this layout, leaving out what earlier layouts delivered in this epoch."""
        if not history:
            return self.source.make_plan(self.world_size, self.readers_per_rank)
        if self.source.draws_with_replacement:
            # draws with replacement: nothing to exclude, only a fresh RNG stream
            return self.source.make_plan(self.world_size, self.readers_per_rank, None, len(history))
        seen = [np.zeros(n, dtype=bool) for n in self.source.dataset_sizes]
        for k, seg in enumerate(history):
            plan = self.source.make_plan(seg["world_size"], seg["workers"], [m.copy() for m in seen], k)
            for r in range(seg["world_size"]):
                for w in range(seg["workers"]):
                    for address in plan.delivered(self.epoch, r, w, seg["positions"][w]):
                        d, g = plan.global_index(address)
                        seen[d][g] = True
        return self.source.make_plan(self.world_size, self.readers_per_rank, seen, len(history))


def build_train_loader(cfg: DataConfig, *, stage: Stage, micro_batch_size: Optional[int] = None,
                       num_classes: int = 0, label_smoothing: float = 0.0, seed: int = 0, rank: int = 0,
                       world_size: int = 1, workers: Optional[int] = None,
                       transform_factory: Optional[Callable[[DataConfig, Stage], Callable]] = None) -> TrainLoader:
    """The training loader of one rank, from shards (``cfg.train``) or a datasets folder (``cfg.hf_dataset``).

    ``stage``: a :class:`~.protocol.Stage` (image_size, randaug, mixup, cutmix, micro_batch_size are
    read).
    ``micro_batch_size``: per rank; None takes ``stage.micro_batch_size``. ``num_classes`` 0: the data's.
    ``workers`` None: ``cfg.workers``. ``transform_factory(cfg, stage)`` replaces the TrainTransform (tests,
    benchmarks).
    """
    workers = cfg.workers if workers is None else workers
    readers = max(1, workers)
    resolve_decoder(cfg.decoder)  # a decoder that is not installed: refused here, not in a worker
    if cfg.hf_dataset:
        if cfg.verify_checksums:
            raise DataError("data.verify_checksums=true needs shards (a datasets folder records no checksums): set "
                            "data.verify_checksums=false")
        source = _hf_source(cfg, seed=seed, world_size=world_size, workers=readers, split=cfg.hf_train_split)
    else:
        source = _shard_source(cfg, seed=seed, world_size=world_size, workers=readers, rank=rank)
    _check_stage(stage)
    mbs = micro_batch_size or stage.micro_batch_size
    if not mbs:
        raise ValueError("build_train_loader needs micro_batch_size (or a stage with micro_batch_size)")
    return TrainLoader(cfg, source, stage=stage, micro_batch_size=mbs, num_classes=num_classes,
                       label_smoothing=label_smoothing, seed=seed, rank=rank, world_size=world_size,
                       workers=workers, transform_factory=transform_factory)


# --------------------------------------------------------------------------------------------- eval


class _EvalReaders(IterableDataset):
    """One rank's eval readers: reader ``i`` reads the samples of ``ranges[i]`` in order, yields ReaderBatch
    records of EvalBatch (the last one padded)."""

    def __init__(self, *, ranges: list[tuple[int, int]], addresses: Callable[[int, int], Iterator[Address]],
                 make_fetch: Callable[[], Fetch], batch_size: int, transform: Callable, image_size: int,
                 num_classes: int, multi_label: bool, verify_checksums: bool = False):
        self.ranges, self.addresses, self.make_fetch = ranges, addresses, make_fetch
        self.verify_checksums = verify_checksums
        self.batch_size, self.transform, self.image_size = batch_size, transform, image_size
        self.num_classes, self.multi_label = num_classes, multi_label

    def __iter__(self) -> Iterator[ReaderBatch]:
        info = get_worker_info()
        reader = 0 if info is None else info.id
        start, stop = self.ranges[reader]
        fetch = self.make_fetch()
        position = 0
        try:
            batch: list[_Decoded] = []
            for address in self.addresses(start, stop):
                batch.append(self._one(fetch(address)))
                if len(batch) == self.batch_size:
                    position += len(batch)
                    yield self._record(reader, position, batch)
                    batch = []
            if batch:
                position += len(batch)
                yield self._record(reader, position, batch)
        finally:
            fetch.close()

    def _one(self, content: Content) -> _Decoded:
        if isinstance(content, Missing):
            return _Decoded(None, None, content.key, content.reason)
        key = content.get("__key__", "?")
        try:
            if self.verify_checksums:
                verify_sample(content)
            labels = _parse_labels(content, self.multi_label, None, self.num_classes)
            return _Decoded(self.transform(content), labels, key, None)
        except Exception as e:
            return _Decoded(None, None, key, f"{type(e).__name__}: {e}")

    def _record(self, reader: int, position: int, items: list[_Decoded]) -> ReaderBatch:
        report = ReaderReport(reader=reader, position=position, samples=len(items),
                              bad=sum(d.image is None for d in items))
        return ReaderBatch(self.collate(items), report)

    def collate(self, items: list[_Decoded]) -> EvalBatch:
        """A full-size batch (in the worker, so that the stacked tensor is what gets pinned): ``items`` first,
        then padding (zeros, label -1, invalid); ``collate([])`` is an all-padding batch."""
        good = next((d.image for d in items if d.image is not None), None)
        pad = torch.zeros(good.shape if good is not None else (3, self.image_size, self.image_size))
        n = self.batch_size
        valid = torch.zeros(n, dtype=torch.bool)
        label = torch.full((n,), -1, dtype=torch.long)
        keys = [""] * n
        images = [pad] * n
        multi = torch.zeros(n, self.num_classes, dtype=torch.bool) if self.multi_label else None
        for i, (im, lab, key, _) in enumerate(items):
            keys[i] = key
            if im is not None:
                valid[i] = True
                label[i] = lab[0]
                images[i] = im
                if multi is not None:
                    multi[i, lab] = True
        return EvalBatch(image=torch.stack(images), valid=valid, label=label, key=keys, labels=multi)


class EvalLoader:
    """Every validation sample exactly once across ranks, the same number of batches on every rank.

    Iterating yields :class:`~.protocol.EvalBatch` records: ``image`` (B, C, S, S), ``label`` (B,) (-1 on
    padding), ``valid`` (B,) bool, ``key`` [...], plus ``labels`` (B, K) multi-hot for multi-label data (None, and
    not ``in`` the batch, otherwise); batches are always full size, padded. Every iteration is a fresh pass.
    ``bad_samples`` counts unreadable samples of the last pass (they are invalid).
    """

    def __init__(self, *, ranges_by_rank: list[list[tuple[int, int]]], rank: int,
                 addresses: Callable[[int, int], Iterator[Address]], make_fetch: Callable[[], Fetch], workers: int,
                 batch_size: int, transform: Callable, image_size: int, num_classes: int, multi_label: bool,
                 verify_checksums: bool = False, worker_start: str = "forkserver"):
        self.num_workers = max(0, workers)
        self.worker_start = worker_start
        self.rank = rank
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_classes = num_classes
        self.num_batches = max(sum(math.ceil((b - a) / batch_size) for a, b in r) for r in ranges_by_rank)
        self._readers = _EvalReaders(ranges=ranges_by_rank[rank], addresses=addresses, make_fetch=make_fetch,
                                     batch_size=batch_size, transform=transform, image_size=image_size,
                                     num_classes=num_classes, multi_label=multi_label,
                                     verify_checksums=verify_checksums)
        self.bad_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[EvalBatch]:
        self.bad_samples = 0
        if self.num_workers == 0:
            it = _rngs_kept_per_item(iter(self._readers))
        else:
            it = iter(DataLoader(self._readers, batch_size=None, num_workers=self.num_workers,
                                 pin_memory=torch.cuda.is_available(),
                                 **worker_options(self.worker_start),
                                 generator=_loader_generator("eval", self.image_size, self.batch_size)))
        produced = valid = 0
        for rec in it:
            self.bad_samples += rec.report.bad
            valid += rec.report.samples - rec.report.bad
            produced += 1
            yield rec.batch
        for _ in range(self.num_batches - produced):
            yield self._readers.collate([])
        if self.bad_samples:  # an evaluation never shrinks silently
            print(f"warning: rank {self.rank}: evaluation read {valid} of {valid + self.bad_samples} validation "
                  f"samples; {self.bad_samples} could not be read or decoded and are left out of the metrics "
                  "(check the shards with `python -m shards verify`)", file=sys.stderr, flush=True)


def build_eval_loader(cfg: DataConfig, *, image_size: int, micro_batch_size: int, rank: int = 0,
                      world_size: int = 1, split: Optional[str] = None, workers: Optional[int] = None,
                      num_classes: int = 0, transform: Optional[Callable] = None) -> EvalLoader:
    """The eval loader of one rank: ``cfg.val`` (default: the first training folder), split ``cfg.val_split``
    (or ``cfg.hf_val_split`` of ``cfg.hf_dataset``), EvalTransform at ``image_size``."""
    workers = cfg.workers if workers is None else workers
    readers = max(1, workers)
    if transform is None:
        transform = EvalTransform(cfg, image_size)
    if cfg.hf_dataset and not cfg.val:
        split = split or cfg.hf_val_split
        src = HFSource.from_config(cfg, split)
        total = len(src)

        addresses: Callable[[int, int], Iterator[Address]] = _hf_addresses

        make_fetch: Callable[[], Fetch] = _Same(src)
        k, multi, describe = src.num_classes, src.multi_label, f"{cfg.hf_dataset} [{split}]"
        check_sums = False
    else:
        root = cfg.val or (cfg.train[0] if cfg.train else None)
        if root is None:
            raise DataError("no validation data: set data.val (or data.train) to a shard folder, or data.hf_dataset")
        split = split or cfg.val_split
        remote = remote_options(cfg)
        s = load_split(root, split, allow_pipe=cfg.allow_pipe, remote=remote)
        _check_splits([s], cfg, world_size, rank, "data.val")
        total = s.samples

        addresses = functools.partial(eval_addresses, s)

        make_fetch = functools.partial(DatasetReaders, [s], remote)
        k, multi, describe = s.num_classes, s.multi_label, f"{root} [{split}]"
        check_sums = cfg.verify_checksums and s.checksums
    if num_classes and num_classes < k:
        raise DataError(f"the model has {num_classes} classes but {describe} has {k}")
    k = num_classes or k
    ranges = eval_ranges(total, world_size * readers)
    by_rank = [ranges[r * readers:(r + 1) * readers] for r in range(world_size)]
    return EvalLoader(ranges_by_rank=by_rank, rank=rank, addresses=addresses, make_fetch=make_fetch,
                      workers=workers, batch_size=micro_batch_size, transform=transform, image_size=image_size,
                      num_classes=k, multi_label=multi, verify_checksums=check_sums, worker_start=cfg.worker_start)
