"""Hugging Face ``datasets`` as a loader source: samples in the shard dict shape, split and shuffled by index.

A dataset saved with ``save_to_disk`` (a folder), a folder of data files ``load_dataset`` understands (parquet,
arrow, imagefolder), or a hub name already in the local cache (loaded with the hub offline: nothing is
downloaded at run time) becomes a random-access list of samples ``{"__key__", "jpg", "cls"}``: ``jpg`` holds the
stored encoded image bytes as they are (JPEG or PNG; the transforms open any format PIL reads, and the crop-aware
reduced decode applies to JPEG), ``cls`` the decimal label like a shard's ``.cls`` member (multi-label columns
give ``json`` = ``{"labels": [...]}``). Random access makes the plan simple: an epoch is a (seed, epoch)
permutation of the indices cut into one contiguous range per reader, so a position is an offset into that range.
The split is one dataset of one shard: a row's address is ``Address(0, 0, 0, row, 0)`` (:func:`row_address`).
:class:`HFPlan`, :class:`IndexStream` and :class:`HFSource` implement protocol.py's Plan, SampleStream and Fetch.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .protocol import Address, Content, Fetch
from .shards import DataError, stable_seed


def row_address(row: int) -> Address:
    """The address of a row of the split."""
    return Address(0, 0, 0, int(row), 0)


def load_hf_dataset(name_or_path: str, split: str):
    """A ``datasets.Dataset`` for one split: a save_to_disk folder, a data folder, or a cached hub name."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # noqa: PLC0415 - datasets: ~0.7 s, datasets folders only; after the offline switches

    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_info.json"))
                                or os.path.isfile(os.path.join(path, "dataset_dict.json"))
                                or os.path.isfile(os.path.join(path, "state.json"))):
        obj = datasets.load_from_disk(path)
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise DataError(f"data.hf_dataset {name_or_path}: no split {split!r} (it has: {', '.join(obj)}); set "
                                "data.hf_train_split / data.hf_val_split")
            return obj[split]
        return obj
    try:
        ds = datasets.load_dataset(path, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"data.hf_dataset {name_or_path}: {e}; set data.hf_train_split / data.hf_val_split "
                            "to an existing split") from None
        raise DataError(f"data.hf_dataset {name_or_path}: cannot load ({e})") from None
    except Exception as e:  # not cached, not a folder: datasets raises several kinds
        raise DataError(
            f"data.hf_dataset {name_or_path}: not a folder written by Dataset.save_to_disk, not a data folder, and "
            f"not in the local Hugging Face cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "Downloads are off at run time: fetch it beforehand on a machine with internet "
            "(datasets.load_dataset(NAME).save_to_disk(FOLDER)) and point data.hf_dataset at FOLDER") from None
    return ds


def _column_error(what: str, column: str, names: Sequence[str], key: str) -> DataError:
    return DataError(f"data.hf_dataset {what}: no column {column!r} (columns: {', '.join(names)}); set {key}")


class HFSource:
    """Random access to one split of a datasets dataset, as sample dicts; picklable (arrow is memory-mapped)."""

    def __init__(self, dataset, *, image_column: str = "image", label_column: str = "label", name: str = "hf"):
        import datasets  # noqa: PLC0415 - datasets: ~0.7 s to import; runs on shards never need it

        names = list(dataset.column_names)
        if image_column not in names:
            raise _column_error(name, image_column, names, "data.hf_image_column")
        if label_column not in names:
            raise _column_error(name, label_column, names, "data.hf_label_column")
        feat = dataset.features
        if isinstance(feat[image_column], datasets.Image):
            # keep the stored bytes: no decode and re-encode here, the transforms decode once
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([image_column, label_column])
        self.image_column, self.label_column, self.name = image_column, label_column, name
        label_feat = feat[label_column]
        inner = getattr(label_feat, "feature", None)  # Sequence / List of ClassLabel: multi-label
        self.multi_label = inner is not None
        cl = inner if inner is not None else label_feat
        if isinstance(cl, datasets.ClassLabel):
            self.num_classes = int(cl.num_classes)
            self.classes = tuple({"index": i, "wnid": n, "name": n} for i, n in enumerate(cl.names))
        else:
            # plain integer labels: the class count is the largest label + 1 (one pass over the column)
            col = self.dataset[label_column]
            flat = [x for v in col for x in (v if isinstance(v, list) else [v])]
            if not flat or not all(isinstance(x, (int, np.integer)) for x in flat):
                kind = type(flat[0]).__name__ if flat else "nothing"
                raise DataError(f"data.hf_dataset {name}: column {label_column!r} holds {kind}, not integer class "
                                "labels; set data.hf_label_column to a ClassLabel / integer column")
            self.num_classes = int(max(flat)) + 1
            self.classes = ()
        self._fingerprint = f"{getattr(dataset, '_fingerprint', '')}:{len(dataset)}:{image_column}:{label_column}"

    @classmethod
    def from_config(cls, cfg, split: str) -> "HFSource":
        ds = load_hf_dataset(cfg.hf_dataset, split)
        return cls(ds, image_column=cfg.hf_image_column, label_column=cfg.hf_label_column,
                   name=f"{cfg.hf_dataset} [{split}]")

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        return self._fingerprint

    def sample(self, index: int) -> dict:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if isinstance(image, dict):
            data = image.get("bytes")
            if data is None and image.get("path"):
                with open(image["path"], "rb") as f:
                    data = f.read()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        elif hasattr(image, "save"):  # a decoded PIL image (a non-Image feature holding one): encode losslessly
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        else:
            data = None
        out: dict[str, Any] = {"__key__": f"{self.name}#{index}", "__url__": self.name}
        if data is not None:
            out["jpg"] = data
        label = row[self.label_column]
        if isinstance(label, list):
            out["json"] = json.dumps({"labels": [int(x) for x in label]}).encode()
            if label:
                out["cls"] = str(int(label[0])).encode()
        elif label is not None:
            out["cls"] = str(int(label)).encode()
        return out

    def __call__(self, address: Address) -> Content:
        return self.sample(address.member)

    def close(self) -> None:
        pass


class IndexStream:
    """A reader's share of an epoch: indices in permutation order; the same interface as ShuffleStream."""

    def __init__(self, indices: np.ndarray, fetch: Optional[Fetch] = None):
        self.indices = indices
        self.quota = len(indices)
        self.fetch = fetch
        self.delivered = 0

    @property
    def remaining(self) -> int:
        return self.quota - self.delivered

    def next(self, load: bool = True) -> tuple[Address, Optional[Content]]:
        if self.delivered >= self.quota:
            raise StopIteration
        address = row_address(self.indices[self.delivered])
        self.delivered += 1
        return address, (self.fetch(address) if (load and self.fetch is not None) else None)

    def skip(self, n: int) -> None:
        self.delivered = min(self.quota, self.delivered + n)

    def peek_contents(self) -> Iterator[tuple[Address, Content]]:
        for j in range(self.delivered, min(self.quota, self.delivered + 64)):
            address = row_address(self.indices[j])
            yield address, self.fetch(address)


class HFPlan:
    """Train plan over indices: a (seed, epoch) permutation, minus excluded indices, cut into equal ranges."""

    def __init__(self, size: int, *, seed: int, world_size: int, workers: int,
                 exclude: Optional[Sequence[Optional[np.ndarray]]] = None, segment: int = 0):
        self.size = int(size)
        self.seed, self.world_size, self.workers = int(seed), int(world_size), max(1, int(workers))
        self.readers = self.world_size * self.workers
        self.exclude = exclude[0] if exclude else None
        self.segment = segment
        self._order_cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order_cache:
            rng = np.random.default_rng(stable_seed("hf-order", self.seed, epoch))
            order = rng.permutation(self.size)
            if self.exclude is not None:
                order = order[~self.exclude[order]]
            self._order_cache = {epoch: order}
        return self._order_cache[epoch]

    def quota(self, epoch: int) -> int:
        return len(self.order(epoch)) // self.readers

    def stream(self, epoch: int, rank: int, worker: int, fetch: Optional[Fetch] = None) -> IndexStream:
        q = self.quota(epoch)
        slot = rank * self.workers + worker
        return IndexStream(self.order(epoch)[slot * q:(slot + 1) * q], fetch)

    def delivered(self, epoch: int, rank: int, worker: int, count: int) -> Iterator[Address]:
        s = self.stream(epoch, rank, worker)
        for _ in range(min(count, s.quota)):
            yield s.next(load=False)[0]

    @staticmethod
    def global_index(address: Address) -> tuple[int, int]:
        return 0, address.member
