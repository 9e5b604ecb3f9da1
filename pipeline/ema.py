"""Weight EMA (TF warm-up, BN statistics included) for plain modules and DeepSpeed ZeRO 0/1/2/3 engines.

What is averaged: every parameter, and every floating-point buffer (BatchNorm running mean / var), as the
official code does (``tf.trainable_variables()`` + the moving statistics). Integer buffers
(``num_batches_tracked``) are copied. The decay of update t (0-based) is ``min(decay, (1 + t) / (10 + t))``
with the TF warm-up, else ``decay``.

Where the EMA lives:

- plain module, DDP, ZeRO 0/1/2: the module holds full, identical parameters on every rank, and so does
  the EMA (float32, on the parameters' device).
- ZeRO-3: each rank holds only its flat partition of every parameter (``param.ds_tensor``); the EMA keeps
  an EMA of that partition and stays sharded (1/N of the memory). Buffers are not partitioned by DeepSpeed
  and are averaged in full. :meth:`ModelEMA.full_state_dict` gathers a normal state dict (for evaluation and
  export), :meth:`ModelEMA.swapped` puts the EMA weights into the model for evaluation through
  ``GatheredParameters(..., modifier_rank=0)`` (passed in as ``gathered_parameters``, from
  :meth:`pipeline.engine.Engine.gathered_parameters`, so this module does not import DeepSpeed).

BN running statistics differ per rank (DeepSpeed broadcasts parameters, not buffers); so do their EMAs.
:meth:`ModelEMA.synced_buffers` averages them across ranks into new tensors; ``full_state_dict`` and ``swapped``
use it (the EMA keeps each rank's own values).

Checkpointing: :meth:`state_dict` is this rank's state, without communication. Unsharded, every rank's
is the same up to the BN-statistic EMAs (record :meth:`synced_buffers` in rank 0's state and keep each
rank's own with :meth:`local_buffers`), so rank 0's suffices. Sharded (ZeRO-3), every rank saves its
own; :meth:`load_state_dict` takes this rank's dict back, or the list of all ranks' dicts of a run with any
number of ranks (it reassembles and re-slices), or a full (unsharded) dict.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn

from pipeline import distributed
from pipeline.bn import all_reduce_mean_

__all__ = ["ModelEMA", "ema_decay", "unwrap"]

STATE_VERSION = 1
# Elements per all-gather when the sharded EMA is assembled (bounds the temporary memory to ~256 MB fp32
# per chunk and rank count).
_GATHER_CHUNK = 64 * 1024 * 1024

GatherFn = Callable[..., ContextManager]


def ema_decay(t: int, decay: float, tf_warmup: bool = True) -> float:
    """Decay of EMA update ``t`` (0-based): ``min(decay, (1 + t) / (10 + t))`` with the TF warm-up."""
    if tf_warmup:
        return min(decay, (1.0 + t) / (10.0 + t))
    return decay


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, so that the EMA's
    state-dict keys carry no wrapper prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor") and p.ds_tensor is not None


def _dist_world() -> tuple[int, int]:
    return distributed.get_rank(), distributed.get_world_size()


class ModelEMA:
    """Exponential moving average of a model's weights and BN statistics; see the module docstring.

    Args:
        model: the module being trained (``engine.module`` under DeepSpeed; the unwrapped model under DDP /
            accelerate). The EMA starts as a copy of its current weights.
        decay: the target decay (0.9999 for pretraining, 0.9996 for fine-tuning in the paper).
        tf_warmup: use ``min(decay, (1 + t) / (10 + t))``.
        gathered_parameters: ``(params, modifier_rank=...) -> context manager`` that makes ZeRO-3 parameters
            whole inside and re-partitions them (with the modifier rank's values) on exit; needed only
            for :meth:`swapped` under ZeRO-3.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, tf_warmup: bool = True,
                 gathered_parameters: Optional[GatherFn] = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay: must be within [0, 1), got {decay}")
        model = unwrap(model)
        self.model = model
        self.decay = float(decay)
        self.tf_warmup = bool(tf_warmup)
        self.num_updates = 0
        self._gathered_parameters = gathered_parameters

        # Parameters keyed by their state-dict name; named_parameters() drops tied duplicates, whose other
        # names are restored through the state-dict key list below.
        self.param_names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, p in model.named_parameters():
            self.param_names.append(name)
            self.params.append(p)
        zero3 = [_is_zero3(p) for p in self.params]
        if any(zero3) and not all(zero3):
            raise ValueError("ModelEMA: some parameters are ZeRO-3 partitioned and some are not; build the EMA "
                             "from the engine's module after deepspeed.initialize")
        self.sharded = bool(self.params) and all(zero3)

        persistent = set(model.state_dict(keep_vars=True).keys())
        self.float_buffer_names: list[str] = []
        self.float_buffers: list[torch.Tensor] = []
        self.other_buffer_names: list[str] = []
        self.other_buffers: list[torch.Tensor] = []
        for name, b in model.named_buffers():
            if name not in persistent:  # non-persistent buffers are not part of the weights
                continue
            if b.is_floating_point():
                self.float_buffer_names.append(name)
                self.float_buffers.append(b)
            else:
                self.other_buffer_names.append(name)
                self.other_buffers.append(b)

        with torch.no_grad():
            self.shadow: list[torch.Tensor] = [s.detach().clone().float() for s in self._sources()]
            self.buffer_shadow: list[torch.Tensor] = [b.detach().clone().float() for b in self.float_buffers]
            self.other_shadow: list[torch.Tensor] = [b.detach().clone() for b in self.other_buffers]

    # ------------------------------------------------------------------------------------------------------
    # update

    def _sources(self) -> list[torch.Tensor]:
        """The tensors the EMA follows: full parameters, or this rank's ZeRO-3 partitions."""
        if self.sharded:
            return [p.ds_tensor for p in self.params]
        return [p.detach() for p in self.params]

    def current_decay(self, step: Optional[int] = None) -> float:
        return ema_decay(self.num_updates if step is None else step, self.decay, self.tf_warmup)

    @torch.no_grad()
    def update(self, step: Optional[int] = None) -> float:
        """Fold the model's current weights into the EMA; call after each optimizer step. Returns the decay.

        ``step``: the optimizer step, for the warm-up (TF uses the global step); default: the number of
        updates so far. Local to the rank, no communication.
        """
        d = self.current_decay(step)
        weight = 1.0 - d
        _lerp_(self.shadow, self._sources(), weight)
        if self.float_buffers:
            _lerp_(self.buffer_shadow, self.float_buffers, weight)
        if self.other_buffers:
            torch._foreach_copy_(self.other_shadow, self.other_buffers)
        self.num_updates += 1
        return d

    # ------------------------------------------------------------------------------------------------------
    # distributed helpers

    @torch.no_grad()
    def synced_buffers(self, group=None) -> list[torch.Tensor]:
        """The EMA of the BN statistics averaged across ranks, as new tensors (collective; on one rank the
        EMA's own). The EMA itself keeps this rank's values: evaluating or saving does not change what the
        next updates produce, so a run that saved at other steps continues bit for bit like one that did not."""
        _, world = _dist_world()
        if world == 1 or not self.buffer_shadow:
            return self.buffer_shadow
        out = [b.detach().clone() for b in self.buffer_shadow]
        all_reduce_mean_(out, group)
        return out

    def local_buffers(self) -> list[torch.Tensor]:
        """This rank's own EMA of the BN statistics (copies): what its rank file keeps for an exact resume."""
        return [b.detach().to("cpu", copy=True) for b in self.buffer_shadow]

    @torch.no_grad()
    def load_local_buffers(self, buffers: Sequence[torch.Tensor]) -> None:
        """Inverse of :meth:`local_buffers`, after :meth:`load_state_dict` on the same number of ranks."""
        if len(buffers) != len(self.buffer_shadow):
            raise ValueError(f"saved EMA buffers ({len(buffers)}) do not fit the model ({len(self.buffer_shadow)})")
        for b, s in zip(self.buffer_shadow, buffers):
            b.copy_(s)

    def _gather_full(self, shards: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """Whole tensors from every rank's ZeRO-3 partitions (collective): concatenated, all-gathered in
        chunks, each rank's piece cut at the partition offsets and the padding dropped."""
        rank, world = _dist_world()
        out: list[torch.Tensor] = []
        i = 0
        while i < len(shards):
            j, n = i, 0
            while j < len(shards) and (j == i or n + shards[j].numel() <= _GATHER_CHUNK):
                n += shards[j].numel()
                j += 1
            local = torch.cat([s.reshape(-1).float() for s in shards[i:j]])
            if world > 1:
                gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
                distributed.all_gather_into_tensor(gathered, local)
                gathered = gathered.view(world, local.numel())
            else:
                gathered = local.view(1, -1)
            offset = 0
            for s, p in zip(shards[i:j], params[i:j]):
                part = s.numel()
                full = gathered[:, offset:offset + part].reshape(-1)[:p.ds_numel]
                out.append(full.view(p.ds_shape).clone())
                offset += part
            i = j
        return out

    def _local_shard(self, full: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """This rank's ZeRO-3 partition of a whole tensor (rank r holds elements [r*n, (r+1)*n), padded)."""
        rank, world = _dist_world()
        part = p.ds_tensor.numel()
        flat = full.reshape(-1).float()
        if flat.numel() != p.ds_numel:
            raise ValueError(f"EMA state: a tensor of {flat.numel()} elements for a parameter of {p.ds_numel}")
        padded = torch.zeros(part * world, dtype=flat.dtype, device=flat.device)
        padded[:flat.numel()] = flat
        return padded[rank * part:(rank + 1) * part].clone()

    # ------------------------------------------------------------------------------------------------------
    # full weights: evaluation and export

    def _state_dict_keys(self) -> list[tuple[str, str]]:
        """(state-dict key, EMA entry name) in the model's state-dict order, tied weights included."""
        by_id = {id(p): n for n, p in zip(self.param_names, self.params)}
        by_id.update({id(b): n for n, b in zip(self.float_buffer_names, self.float_buffers)})
        by_id.update({id(b): n for n, b in zip(self.other_buffer_names, self.other_buffers)})
        keys = []
        for key, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in by_id:
                keys.append((key, by_id[id(t)]))
        return keys

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = True, sync: bool = True) -> Optional[dict[str, torch.Tensor]]:
        """The EMA as an ordinary state dict of the model (float32 weights, CPU tensors).

        Collective when distributed (every rank must call it). With ``rank0_only`` the other ranks get None.
        ``sync`` averages the BN-statistic EMAs across ranks (see :meth:`synced_buffers`).
        """
        buffers = self.synced_buffers() if sync else self.buffer_shadow
        rank, _ = _dist_world()
        if self.sharded:
            full_params = self._gather_full(self.shadow, self.params)
        else:
            full_params = self.shadow
        if rank0_only and rank != 0:
            return None
        entries: dict[str, torch.Tensor] = {}
        entries.update(zip(self.param_names, full_params))
        entries.update(zip(self.float_buffer_names, buffers))
        entries.update(zip(self.other_buffer_names, self.other_shadow))
        return {key: entries[name].detach().to("cpu", copy=True) for key, name in self._state_dict_keys()}

    @contextlib.contextmanager
    def swapped(self, sync: bool = True) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights and BN statistics; afterwards its own again.

        For evaluation: ``with ema.swapped(): evaluate(engine.module)``. Collective under ZeRO-3 and when
        ``sync`` averages the BN EMAs (every rank must enter). The optimizer's master weights are untouched,
        and the model's own values are restored exactly, bit for bit.
        """
        buffers = self.synced_buffers() if sync else self.buffer_shadow
        backup_buffers = [b.detach().clone() for b in self.float_buffers]
        backup_other = [b.detach().clone() for b in self.other_buffers]
        if self.sharded:
            backup = [p.ds_tensor.detach().clone() for p in self.params]
            self._write_zero3(self.shadow)
        else:
            backup = [p.detach().clone() for p in self.params]
            with torch.no_grad():
                _copy_(list(p.data for p in self.params), self.shadow)
        with torch.no_grad():
            if self.float_buffers:
                _copy_(self.float_buffers, buffers)
            if self.other_buffers:
                torch._foreach_copy_(self.other_buffers, self.other_shadow)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                if self.sharded:
                    self._write_zero3(backup)
                else:
                    _copy_(list(p.data for p in self.params), backup)
                if self.float_buffers:
                    torch._foreach_copy_(self.float_buffers, backup_buffers)
                if self.other_buffers:
                    torch._foreach_copy_(self.other_buffers, backup_other)

    @torch.no_grad()
    def _write_zero3(self, shards: Sequence[torch.Tensor]) -> None:
        """Make ZeRO-3 parameters hold the values whose partitions are ``shards`` (collective).

        Chunked so that at most ~_GATHER_CHUNK elements per rank are gathered at a time. Writing the
        partitions in place would not do: DeepSpeed keeps small ('persistent') parameters whole between
        steps, so they go through GatheredParameters, which re-partitions from the modifier rank's values.
        """
        if self._gathered_parameters is None:
            raise RuntimeError("ModelEMA.swapped under ZeRO-3 needs gathered_parameters: build the EMA with "
                               "ModelEMA(engine.module, ..., gathered_parameters=engine.gathered_parameters)")
        rank, _ = _dist_world()
        i = 0
        while i < len(self.params):
            j, n = i, 0
            while j < len(self.params) and (j == i or n + self.params[j].ds_numel <= _GATHER_CHUNK):
                n += self.params[j].ds_numel
                j += 1
            chunk = self.params[i:j]
            full = self._gather_full(shards[i:j], chunk)
            with self._gathered_parameters(chunk, modifier_rank=0):
                if rank == 0:
                    for p, f in zip(chunk, full):
                        p.data.copy_(f.to(p.dtype))
            i = j

    # ------------------------------------------------------------------------------------------------------
    # checkpoint state

    def state_dict(self, buffers: Optional[Sequence[torch.Tensor]] = None) -> dict[str, Any]:
        """This rank's EMA state (no communication). Sharded under ZeRO-3: every rank saves its own.
        ``buffers``: the BN-statistic EMAs to record instead of this rank's (e.g. :meth:`synced_buffers`)."""
        rank, world = _dist_world()
        buffers = self.buffer_shadow if buffers is None else buffers
        return {
            "version": STATE_VERSION,
            "decay": self.decay,
            "tf_warmup": self.tf_warmup,
            "num_updates": self.num_updates,
            "sharded": self.sharded,
            "rank": rank,
            "world_size": world,
            "params": {n: t.detach().clone() for n, t in zip(self.param_names, self.shadow)},
            "buffers": {n: t.detach().clone() for n, t in zip(self.float_buffer_names, buffers)},
            "other_buffers": {n: t.detach().clone() for n, t in zip(self.other_buffer_names, self.other_shadow)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Restore from :meth:`state_dict` output.

        Accepts this rank's dict (same sharding and rank count), the list of every rank's dicts from a
        sharded save at any rank count (reassembled, then re-sliced for this run), or an unsharded dict
        (also the result of :meth:`full_state_dict` wrapped by :meth:`from_full_state_dict`).
        """
        if isinstance(state, (list, tuple)):
            state = _merge_shards(list(state))
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"EMA state version {state.get('version')!r} is not {STATE_VERSION}; "
                             "this checkpoint was written by an incompatible version of pipeline.ema")
        rank, world = _dist_world()
        params = state["params"]
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters of this model (e.g. {missing[:3]}); "
                             "was it saved for another architecture?")
        if state["sharded"]:
            if not self.sharded or state["world_size"] != world or state["rank"] != rank:
                raise ValueError(f"EMA state is rank {state['rank']}'s shard of a {state['world_size']}-rank "
                                 f"ZeRO-3 run; this is rank {rank} of {world}"
                                 f"{'' if self.sharded else ', not ZeRO-3'}. Pass the list of all ranks' "
                                 "EMA states to load_state_dict to re-shard it")
            for dst, n in zip(self.shadow, self.param_names):
                if params[n].shape != dst.shape:
                    raise ValueError(f"EMA state: {n} has shape {tuple(params[n].shape)}, "
                                     f"expected {tuple(dst.shape)}")
                dst.copy_(params[n])
        else:
            for i, n in enumerate(self.param_names):
                p = self.params[i]
                shape = tuple(p.ds_shape) if self.sharded else tuple(p.shape)
                src = params[n].to(self.shadow[i].device)
                if state.get("flat_params"):  # reassembled partitions: padded flat tensors
                    numel = int(torch.Size(shape).numel())
                    if src.numel() < numel:
                        raise ValueError(f"EMA state: {n} has {src.numel()} elements, expected {numel}")
                    src = src.reshape(-1)[:numel].view(shape)
                if tuple(src.shape) != shape:
                    raise ValueError(f"EMA state: {n} has shape {tuple(src.shape)}, expected {shape}")
                if self.sharded:
                    self.shadow[i].copy_(self._local_shard(src, p))
                else:
                    self.shadow[i].copy_(src)
        for n, dst in zip(self.float_buffer_names, self.buffer_shadow):
            dst.copy_(state["buffers"][n])
        for n, dst in zip(self.other_buffer_names, self.other_shadow):
            dst.copy_(state["other_buffers"][n])
        self.num_updates = int(state["num_updates"])

    @staticmethod
    def from_full_state_dict(full: dict[str, torch.Tensor], num_updates: int = 0) -> dict[str, Any]:
        """Wrap a plain model state dict (e.g. :meth:`full_state_dict`) as an unsharded EMA state, loadable
        at any sharding. Keys that are not tensors of the model are kept but ignored on load."""
        params = {k: v for k, v in full.items() if v.is_floating_point()}
        return {
            "version": STATE_VERSION, "decay": None, "tf_warmup": None, "num_updates": num_updates,
            "sharded": False, "rank": 0, "world_size": 1,
            "params": params, "buffers": params,
            "other_buffers": {k: v for k, v in full.items() if not v.is_floating_point()},
        }


def _merge_shards(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's sharded EMA state -> one unsharded state (flat partitions concatenated in rank order)."""
    states = sorted(states, key=lambda s: s["rank"])
    if [s["rank"] for s in states] != list(range(states[0]["world_size"])):
        raise ValueError(f"EMA shards: expected ranks 0..{states[0]['world_size'] - 1}, "
                         f"got {[s['rank'] for s in states]}; pass every rank's EMA file")
    if not states[0]["sharded"]:
        return states[0]
    merged = {name: torch.cat([s["params"][name].reshape(-1) for s in states]) for name in states[0]["params"]}
    out = dict(states[0])
    # buffers are whole on every rank; rank 0's stand for all (they were synced before saving, or nearly equal)
    out.update(sharded=False, rank=0, world_size=1, params=merged, flat_params=True)
    return out


def _lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """dst <- dst + weight * (src - dst), in float32 whatever the model's dtype."""
    if any(s.dtype != d.dtype or s.device != d.device for s, d in zip(src, dst)):
        src = [s.to(device=d.device, dtype=d.dtype) for s, d in zip(src, dst)]
    torch._foreach_lerp_(dst, src, weight)


def _copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    torch._foreach_copy_(dst, [s.to(d.dtype) for s, d in zip(src, dst)])
