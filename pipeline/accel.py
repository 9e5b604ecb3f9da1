"""The accelerate backend: DDP (or one process) through ``accelerate``, behind the trainer's backend protocol.

The only module that imports accelerate. ``accelerate launch -m pipeline.finetune`` (or torchrun, or one plain
process) starts the processes; :class:`AccelerateBackend` starts accelerate's process group, prepares the
model and our optimizer, and gives the trainer what :class:`pipeline.backend.Backend` names: forward, backward
and step with explicit accumulation, the learning rate, the micro-batch size, save and load of its state
(``save_state`` / ``load_state`` into the checkpoint folder).

Accumulation is counted here, not by accelerate's ``accumulate()``: the count changes with a stage's
micro-batch size, which accelerate fixes at construction. Every micro-batch but the last of an optimizer step
runs forward and backward under DDP's ``no_sync`` (:meth:`AccelerateBackend.micro_batch`), so gradients are
all-reduced once per step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import ContextManager, Iterable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from pipeline.backend import grad_norm, resolve_precision
from pipeline.checkpoint import ResumePoint
from pipeline.config import ConfigError, OptimConfig, TrainConfig
from pipeline.optim import accumulation_steps, build_optimizer, set_lr

_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}


class AccelerateBackend:
    """accelerate's Accelerator with our optimizer, explicit accumulation and checkpoint folders."""

    kind = "accelerate"
    zero_stage = None

    def __init__(self, train: TrainConfig, optim: OptimConfig):
        cuda = torch.cuda.is_available()
        self.precision = resolve_precision(train.precision, "cuda" if cuda else "cpu")
        if self.precision not in _MIXED_PRECISION:
            raise ConfigError(f"train.precision: '{train.precision}' is not supported by the accelerate backend; use "
                              "auto / fp32 / bf16 (bf16 autocast with fp32 weights)")
        self.train_cfg, self.optim_cfg = train, optim
        # cpu=True on a machine without GPUs: accelerate then runs the launched processes as MULTI_CPU on gloo
        # (without it, every process of `accelerate launch --multi_gpu` / torchrun would train alone).
        self.acc = Accelerator(cpu=not cuda, mixed_precision=_MIXED_PRECISION[self.precision])
        self.rank, self.world_size = self.acc.process_index, self.acc.num_processes
        self._model: Optional[nn.Module] = None
        self._micro_batch_size = train.micro_batch_size
        self._micro_done = 0  # micro-batches done in the current optimizer step
        self._grad_norm: Optional[torch.Tensor] = None
        self._applied = True

    def prepare(self, model: nn.Module, micro_batch_size: int) -> "AccelerateBackend":
        """Our optimizer on ``model`` and both through ``accelerator.prepare`` (DDP with several processes)."""
        optimizer = build_optimizer(self.optim_cfg, model, self.train_cfg.global_batch_size)
        self._model, self.optimizer = self.acc.prepare(model, optimizer)
        # the plain module: stage changes, EMA, evaluation and export work on it (no DDP / compile wrapper)
        self.module = self.acc.unwrap_model(self._model, keep_torch_compile=False)
        self.set_micro_batch_size(micro_batch_size)
        return self

    # ------------------------------------------------------------------------------------------------ facts

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def micro_batch_size(self) -> int:
        return self._micro_batch_size

    @property
    def grad_accum_steps(self) -> int:
        return self._accum

    def train(self, mode: bool = True) -> "AccelerateBackend":
        self._model.train(mode)
        return self

    def eval(self) -> "AccelerateBackend":
        return self.train(False)

    # ------------------------------------------------------------------------------------------------ a step

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The prepared model's forward (autocast when mixed precision is on)."""
        return self._model(images)

    __call__ = forward

    def is_gradient_accumulation_boundary(self) -> bool:
        return self._micro_done == self._accum - 1

    def micro_batch(self) -> ContextManager:
        """Around one micro-batch's forward and backward: DDP's no_sync except on the step's last one."""
        if self.is_gradient_accumulation_boundary() or self.world_size == 1:
            return contextlib.nullcontext()
        return self.acc.no_sync(self._model)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, scaled by the accumulation steps. The previous step's
        gradients are dropped here, at the first micro-batch, not after the optimizer step: they stay readable
        until then."""
        if self._micro_done == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self._grad_norm = None
        self.acc.backward(loss / self._accum)

    def step(self) -> bool:
        """End of a micro-batch: on the step's last one clip, step the optimizer and return True."""
        if not self.is_gradient_accumulation_boundary():
            self._micro_done += 1
            return False
        clip = self.optim_cfg.clip_grad_norm
        if clip > 0:
            self._grad_norm = self.acc.clip_grad_norm_(self._model.parameters(), clip)
        else:  # measured every step: a step whose gradient is not finite is skipped (see step_applied)
            self._grad_norm = grad_norm(self._model.parameters())
        # the norm of the all-reduced gradient: every process decides the same
        self._applied = self._grad_norm is None or bool(torch.isfinite(self._grad_norm))
        if self._applied:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self._micro_done = 0
        return True

    def step_applied(self) -> bool:
        """Whether the last optimizer step updated the weights (False: skipped, its gradient was not finite)."""
        return self._applied

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def grad_norm(self) -> Optional[float]:
        """Global L2 norm of the last optimizer step's gradient, before clipping (None before any)."""
        if self._grad_norm is None:
            self._grad_norm = grad_norm(self._model.parameters())
        return None if self._grad_norm is None else float(self._grad_norm)

    def set_micro_batch_size(self, micro_batch_size: int, micro_key: str = "progressive.stage_micro_batch") -> int:
        """Per-rank micro-batch of the next steps, keeping the global batch; returns the accumulation steps."""
        if self._micro_done != 0:
            raise RuntimeError(f"set_micro_batch_size in the middle of an optimizer step ({self._micro_done} of "
                               f"{self._accum} micro-batches done); call it between steps")
        self._accum = accumulation_steps(self.train_cfg.global_batch_size, micro_batch_size, self.world_size,
                                         micro_key=micro_key)
        self._micro_batch_size = micro_batch_size
        return self._accum

    def gathered_parameters(self, params: Iterable[nn.Parameter], modifier_rank: Optional[int] = None
                            ) -> ContextManager:
        """Parameters are whole on every process (DDP): nothing to gather."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------ state

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """accelerate's ``save_state`` into ``directory/tag`` (every process; the main one writes the model and
        optimizer)."""
        self.acc.save_state(str(Path(directory) / tag))

    def load_checkpoint(self, point: ResumePoint) -> None:
        """DDP states are whole: they load on any number of processes as they are."""
        self.acc.load_state(str(point.path))
        self._micro_done = 0

    def resume_message(self, point: ResumePoint) -> str:
        return point.message
