"""BatchNorm across ranks: average the running statistics, or convert to SyncBatchNorm.

Data-parallel training (DeepSpeed ZeRO included) broadcasts parameters at start-up and keeps them equal,
but every rank updates its BN running mean / var from its own batches, so the ranks drift apart. For
evaluating and saving, :func:`averaged_bn_stats` makes every rank hold the mean of all ranks' statistics
(what a checkpoint saved from rank 0 then records for everyone) and gives each rank its own back afterwards:
evaluating or saving never changes the training trajectory, so a run that saved at other steps (a
preemption) continues bit for bit like one that did not. Each rank's own statistics go into its rank file
(:func:`bn_stats_state` / :func:`load_bn_stats_state`) for an exact resume. ``train.sync_bn`` instead normalises with
the statistics of the global batch (:func:`convert_sync_bn`), which costs an all-reduce per BN layer in
every forward and needs GPUs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import distributed
from pipeline.config import ConfigError

__all__ = ["average_bn_stats", "averaged_bn_stats", "bn_stat_tensors", "bn_stats_state", "convert_sync_bn",
           "load_bn_stats_state"]


def bn_stat_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The running mean / var tensors of every BatchNorm layer (SyncBatchNorm included), in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            out.extend([m.running_mean, m.running_var])
    return out


@torch.no_grad()
def average_bn_stats(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """All-reduce mean of every BN running mean and var, so that every rank holds the same statistics.

    Collective: every rank of ``group`` must call it. ``num_batches_tracked`` is left alone (it is the same
    on every rank: every rank takes the same number of steps). One all-reduce per dtype. Returns the number
    of tensors averaged; a no-op (returns 0) without an initialised process group or with one rank.
    """
    if not distributed.is_initialized():
        return 0
    stats = bn_stat_tensors(model)
    if dist.get_world_size(group) == 1 or not stats:
        return 0
    all_reduce_mean_(stats, group)
    return len(stats)


@contextlib.contextmanager
def averaged_bn_stats(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> Iterator[None]:
    """Inside the block every rank holds the cross-rank mean of the BN statistics (:func:`average_bn_stats`);
    afterwards its own again, bit for bit. Collective: every rank of ``group`` must enter."""
    stats = bn_stat_tensors(model)
    backup = [t.detach().clone() for t in stats]
    average_bn_stats(model, group)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, b in zip(stats, backup):
                t.copy_(b)


def bn_stats_state(model: nn.Module) -> list[torch.Tensor]:
    """This rank's BN running statistics (copies, module order): what its rank file keeps for a resume."""
    return [t.detach().to("cpu", copy=True) for t in bn_stat_tensors(model)]


@torch.no_grad()
def load_bn_stats_state(model: nn.Module, state: list[torch.Tensor]) -> None:
    """Inverse of :func:`bn_stats_state` (same architecture)."""
    stats = bn_stat_tensors(model)
    if len(stats) != len(state) or any(t.shape != s.shape for t, s in zip(stats, state)):
        raise ValueError(f"saved BN statistics ({len(state)} tensors) do not fit the model ({len(stats)})")
    for t, s in zip(stats, state):
        t.copy_(s)


@torch.no_grad()
def all_reduce_mean_(tensors: list[torch.Tensor], group: Optional[dist.ProcessGroup] = None) -> None:
    """Average ``tensors`` across the ranks of ``group`` in place: one flat all-reduce per (dtype, device),
    summed in float32 even for bf16 buffers (bf16_weights mode), then written back."""
    world = dist.get_world_size(group)
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for same in by_kind.values():
        flat = torch.cat([t.reshape(-1).float() for t in same])
        distributed.all_reduce_(flat, group)
        flat.div_(world)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def convert_sync_bn(model: nn.Module, *, device_type: str, group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Replace every BatchNorm layer by SyncBatchNorm (weights and statistics kept); returns the model.

    Call before the engine / optimizer are built. torch's SyncBatchNorm has no CPU kernel: with more than
    one rank on CPU it would fail at the first training forward, so that case is refused here.
    """
    if device_type == "cpu" and distributed.is_initialized() and dist.get_world_size(group) > 1:
        raise ConfigError("train.sync_bn=true needs GPUs: torch's SyncBatchNorm has no CPU implementation. Set "
                          "train.sync_bn=false (BN statistics are then averaged across ranks before eval and save)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
