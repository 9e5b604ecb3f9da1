"""Streaming data: shard lists and the resumable loader, per-sample transforms, batch mixing."""

from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader  # noqa: E402,F401
from .shards import DataError  # noqa: E402,F401
