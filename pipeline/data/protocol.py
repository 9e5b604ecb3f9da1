"""The typed reader -> loader protocol: sample addresses, plans and streams, and the batch records readers send.

A *source* of training data (shard folders, a datasets folder, later remote folders) is a :class:`Source`: a
:class:`Plan` that names, for every reader and epoch, the sample addresses it delivers (no file access), a
factory of :class:`Fetch` callables that turn an address into the sample's members, and the facts the loader
checks (class count, label maps, identity for resume). A new source implements :class:`Plan`,
:class:`SampleStream` and :class:`Fetch` and returns a :class:`Source`; the loader needs nothing else from it.

Readers (one per DataLoader worker, or one in-process) send :class:`ReaderBatch` records: the :class:`Batch` (or
:class:`EvalBatch`) the consumer gets and a :class:`ReaderReport` the loader keeps (which reader, its position,
samples consumed, bad samples); a reader that cannot go on sends a :class:`ReaderFailure`. The records cross the
worker boundary by pickling, and DataLoader's ``pin_memory`` calls their ``pin_memory()`` (it would leave an
unknown object unpinned).

Batches read like the dicts they replace (``batch["image"]``, ``"labels" in batch``, ``dict(batch)``) as well as by
attribute, so code written for the dict shape keeps working.

From the schedule the loader takes a :class:`Stage` (image size, RandAugment, mixing, micro-batch size), defined
here so that the data layer does not import :mod:`pipeline.progressive`, which reads the data's ``info.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterator,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Union,
    runtime_checkable,
)

if TYPE_CHECKING:
    import numpy as np
    import torch


class Address(NamedTuple):
    """One sample, named without reading it.

    Shards: ``instance`` counts the shards a reader has opened for the dataset (a shard may come back in a later
    pass), ``member`` is the sample's position inside its tar, ``occurrence`` tells repeats of a sample within an
    epoch apart (the pass, or the draw when resampling), so a repeated sample gets a fresh augmentation. A
    datasets folder is one dataset of one shard: ``member`` is the row.
    """

    dataset: int
    instance: int
    shard: int
    member: int
    occurrence: int


@dataclass
class Missing:
    """A sample that could not be read: its address stays in the stream, the batch counts it as bad."""

    key: str
    url: str
    reason: str


Sample = dict
"""A sample's members: ``{"__key__": str, "__url__": str, "jpg": bytes, "cls": bytes, ...}``."""

Content = Union[Sample, Missing]


# ------------------------------------------------------------------------------------- plan protocol


@runtime_checkable
class Fetch(Protocol):
    """Reads samples in one reader, in stream order: ``address -> sample | Missing``; ``close()`` at the end."""

    def __call__(self, address: Address) -> Content: ...

    def close(self) -> None: ...


@runtime_checkable
class SampleStream(Protocol):
    """One reader's samples of one epoch, ``quota`` of them, in delivery order (ShuffleStream, IndexStream)."""

    quota: int
    delivered: int
    """Samples delivered so far: the reader's position."""

    @property
    def remaining(self) -> int: ...

    def next(self, load: bool = True) -> tuple[Address, Optional[Content]]:
        """The next (address, content); content None with ``load=False``. StopIteration at the end."""

    def skip(self, n: int) -> None:
        """Move past ``n`` samples without decoding them (fast-forward on resume)."""

    def peek_contents(self) -> Iterator[tuple[Address, Content]]:
        """Samples not delivered yet that are already at hand: replacements when a whole batch fails."""


@runtime_checkable
class Plan(Protocol):
    """What every reader delivers in every epoch, a pure function of counts and seeds (TrainPlan, HFPlan)."""

    def quota(self, epoch: int) -> int:
        """Samples every reader delivers in ``epoch`` (the same on all readers of all ranks)."""

    def stream(self, epoch: int, rank: int, worker: int, fetch: Optional[Fetch] = None) -> SampleStream:
        """The stream of one reader; without ``fetch`` it yields addresses only."""

    def delivered(self, epoch: int, rank: int, worker: int, count: int) -> Iterator[Address]:
        """The first ``count`` addresses the reader delivered (no file access)."""

    def global_index(self, address: Address) -> tuple[int, int]:
        """(dataset, index of the sample within that dataset)."""


class PlanFactory(Protocol):
    """Builds the plan for a layout; ``exclude`` (per dataset a mask over its global index) leaves samples an
    earlier layout delivered out of the epoch, ``segment`` numbers the layouts within the epoch."""

    def __call__(self, world_size: int, workers: int, exclude: Optional[Sequence[Optional[np.ndarray]]] = None,
                 segment: int = 0) -> Plan: ...


@dataclass
class Source:
    """What the loader needs about the data, whatever stores it."""

    kind: str
    """"shards" | "hf" (for messages)."""
    plan: Plan
    """The plan of the current layout."""
    make_plan: PlanFactory
    make_fetch: Callable[[], Fetch]
    """Called in the reader (after pickling, in a worker): its own Fetch."""
    num_classes: int
    label_maps: list[Optional[np.ndarray]]
    """Per dataset: its class index -> the loader's class index (None: the same)."""
    multi_label: list[bool]
    identity: dict
    """What must not change on resume (compared with the checkpoint's)."""
    describe: str
    dataset_samples: int
    classes: tuple = ()
    dataset_sizes: list[int] = field(default_factory=list)
    draws_with_replacement: bool = False
    """Readers draw with replacement (resampled shards): a new layout starts fresh draws, nothing is excluded."""


# ------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Stage:
    """One progressive-learning stage: the steps it covers and the values that hold during it.

    :mod:`pipeline.progressive` builds the stage table (and re-exports the class: ``pipeline.progressive.Stage``);
    the training loader takes the current stage (image_size, randaug, mixup, cutmix, micro_batch_size). The
    defaults make a plain stage: ``Stage(index=0, start_step=0, end_step=1, image_size=224)`` has no RandAugment,
    no mixing, no dropout, the model's drop-path and train.micro_batch_size.
    """

    index: int
    start_step: int
    """First step of the stage (inclusive)."""
    end_step: int
    """First step after the stage (exclusive)."""
    image_size: int
    randaug: float = 0.0
    """RandAugment magnitude on the 0-10 scale (above 10: stronger than nominal); 0 disables RandAugment."""
    mixup: float = 0.0
    """Mixup alpha (0 disables)."""
    cutmix: float = 0.0
    """CutMix alpha (0 disables)."""
    dropout: float = 0.0
    """Dropout before the classifier."""
    drop_path: Optional[float] = None
    """Stochastic-depth rate, or None: the model's own drop_path_rate holds."""
    micro_batch_size: Optional[int] = None
    """Per-rank micro-batch size for this stage, or None: train.micro_batch_size."""

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


# ------------------------------------------------------------------------------------------- batches


class _ByName:
    """``record["name"]``, ``"name" in record``, ``record.keys()`` and ``dict(record)`` over the set fields."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, name: str) -> Any:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in self.keys() else default


@dataclass
class Batch(_ByName):
    """A training micro-batch of one rank."""

    image: torch.Tensor
    """(B, C, H, W) float32, normalised (mixed when the stage mixes)."""
    target: torch.Tensor
    """(B, K) soft targets summing to 1."""
    key: list[str]
    """Sample keys (a bad sample's slot holds the key of the good sample that replaced it)."""

    def pin_memory(self) -> "Batch":
        return replace(self, image=self.image.pin_memory(), target=self.target.pin_memory())


@dataclass
class EvalBatch(_ByName):
    """An eval batch, always full size: padding has label -1 and valid False."""

    image: torch.Tensor
    """(B, C, S, S)."""
    valid: torch.Tensor
    """(B,) bool: a real, readable sample."""
    label: torch.Tensor
    """(B,) long, the (first) label; -1 on padding and unreadable samples."""
    key: list[str]
    labels: Optional[torch.Tensor] = None
    """(B, K) bool multi-hot, for multi-label data only (absent from ``keys()`` otherwise)."""

    def pin_memory(self) -> "EvalBatch":
        return replace(self, image=self.image.pin_memory(), valid=self.valid.pin_memory(),
                       label=self.label.pin_memory(),
                       labels=None if self.labels is None else self.labels.pin_memory())


@dataclass(frozen=True)
class ReaderReport:
    """What a reader tells the loader about a batch besides its contents."""

    reader: int
    """The rank's reader (worker) that made the batch."""
    position: int
    """Samples that reader has delivered in the epoch, this batch included."""
    samples: int
    """Samples the batch consumed, bad ones included."""
    bad: int
    """Of those, the samples that could not be read or decoded (replaced inside a training batch)."""
    bad_examples: tuple[Missing, ...] = ()
    """The first few bad samples, for the error message."""
    remote: tuple[tuple[str, float], ...] = ()
    """Remote-storage counters of the reader since its previous report (shards.remote.COUNTERS deltas)."""


@dataclass
class ReaderBatch:
    """A reader's record: the batch for the consumer and the report for the loader."""

    batch: Union[Batch, EvalBatch]
    report: ReaderReport

    def pin_memory(self) -> "ReaderBatch":
        return ReaderBatch(self.batch.pin_memory(), self.report)


@dataclass(frozen=True)
class ReaderFailure:
    """A reader stopped on a data error; the loader raises it as a DataError in the training process."""

    message: str
