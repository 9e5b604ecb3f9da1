"""What the trainer needs from a training backend, and what both backends share.

Two backends implement :class:`Backend`: :class:`pipeline.engine.Engine` (DeepSpeed ZeRO 0-3, what
``python -m pipeline.pretrain`` and ``sbatch slurm/pretrain_*.sh`` run) and
:class:`pipeline.accel.AccelerateBackend` (DDP through accelerate, what ``accelerate launch -m
pipeline.finetune`` runs). The trainer (:mod:`pipeline.trainer`) drives either the same way::

    backend.set_lr(lr_at(step))
    for _ in range(backend.grad_accum_steps):
        with backend.micro_batch():
            loss = criterion(backend.forward(images), targets)
            backend.backward(loss)
        backend.step()                      # True after the last micro-batch: the optimizer stepped
"""

from __future__ import annotations

import os
from typing import ContextManager, Iterable, Optional, Protocol

import torch
from torch import nn

from pipeline.checkpoint import ResumePoint


class Backend(Protocol):
    kind: str
    """'deepspeed' or 'accelerate'."""
    precision: str
    """'fp32', 'bf16' (autocast, fp32 weights) or 'bf16_weights' (see :func:`resolve_precision`)."""
    zero_stage: Optional[int]
    """DeepSpeed's ZeRO stage; None for backends without one."""
    world_size: int

    @property
    def module(self) -> nn.Module:
        """The plain model (no wrapper): stage changes, the EMA, BN statistics and exports work on it."""

    @property
    def device(self) -> torch.device: ...

    @property
    def grad_accum_steps(self) -> int: ...

    def train(self, mode: bool = True): ...

    def eval(self): ...

    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def micro_batch(self) -> ContextManager:
        """Context around one micro-batch's forward and backward (DDP: no_sync except on the last)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool: ...

    def step_applied(self) -> bool:
        """Whether the last optimizer step updated the weights; False when it was skipped because the (reduced)
        gradient was not finite. Every rank gets the same answer."""

    def set_lr(self, lr: float) -> None: ...

    def set_micro_batch_size(self, micro_batch_size: int) -> int:
        """Change the per-rank micro-batch at a step boundary; returns the new accumulation steps."""

    def grad_norm(self) -> Optional[float]: ...

    def gathered_parameters(self, params: Iterable[nn.Parameter], modifier_rank: Optional[int] = None
                            ) -> ContextManager:
        """Parameters whole inside (ZeRO-3 gathers them); what the EMA needs."""

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """Write model and optimizer state into ``directory/tag`` (every rank calls it)."""

    def load_checkpoint(self, point: ResumePoint) -> None:
        """Load a resume point's model and optimizer state, whatever world size wrote it (every rank)."""

    def resume_message(self, point: ResumePoint) -> str:
        """What loading ``point`` will do, for the console."""


def resolve_precision(precision: str, device_type: str) -> str:
    """``train.precision`` as the backends read it: 'auto' is bf16 autocast on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return str(precision)


def grad_norm(params: Iterable[nn.Parameter]) -> Optional[torch.Tensor]:
    """Global L2 norm of the parameters' gradients (a device tensor: no host sync); None without gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
