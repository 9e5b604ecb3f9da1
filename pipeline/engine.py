"""The DeepSpeed engine: its config generated from ours, training steps, checkpoints, universal conversion.

This is the only module that imports DeepSpeed. Everything DeepSpeed needs comes from the typed config
(one source of truth): batch sizes and accumulation from ``train``, clipping from ``optim``, the ZeRO stage
and precision from ``train``; the ``deepspeed:`` section of a run config is deep-merged on top for anything
else (offload, ZeRO++, bucket sizes ...).

The optimizer is ours (:func:`pipeline.optim.build_optimizer`, passed as a client optimizer) and so is the
learning rate: the trainer calls :meth:`Engine.set_lr` with ``lr_at(step)`` before each optimizer step; no
DeepSpeed scheduler exists.

Gradient accumulation is driven explicitly. DeepSpeed decides the accumulation boundary from its
micro-step counter modulo ``gradient_accumulation_steps``, which goes wrong the moment the accumulation
changes between progressive-learning stages (after 8 micro-steps at 4 per step, a new value of 3 would
put the next boundary after one micro-batch). So :class:`Engine` counts the micro-batches of the current
optimizer step itself and tells DeepSpeed before every backward whether it is the boundary
(``set_gradient_accumulation_boundary``); DeepSpeed's ``gradient_accumulation_steps`` (which scales the
loss in ``backward``) and micro-batch size are changed live with its public setters
(:meth:`Engine.set_micro_batch_size`), always at a step boundary, keeping the global batch.

One optimizer step, with any accumulation::

    for _ in range(engine.grad_accum_steps):
        loss = criterion(engine(images), targets)
        engine.backward(loss)
        stepped = engine.step()          # True after the last micro-batch: the optimizer stepped

Precision: 'auto' is bf16 autocast on GPU (DeepSpeed's ``torch_autocast`` section: weights, BatchNorm
and optimizer in fp32, matmuls / convolutions in bf16, gradients reduced in fp32) and fp32 on CPU;
'bf16' forces autocast; 'bf16_weights' is DeepSpeed's ``bf16`` mode (bf16 weights and BN statistics, fp32 master
copy in the optimizer; inputs are cast to bf16 by :meth:`Engine.forward`).

Memory format: DeepSpeed gets the model's parameters contiguous (:func:`contiguous_parameters`); NHWC
convolutions come from channels_last activations (EfficientNetV2's ``channels_last`` option), not weights.

Checkpoints: :meth:`Engine.save` / :meth:`Engine.load` wrap DeepSpeed's, with the
``universal_checkpoint_info`` that :func:`convert_to_universal` needs to re-shard a checkpoint for another
number of ranks. :func:`consolidate_fp32_state_dict` turns any checkpoint into one fp32 state dict.

Command line (rank 0 of a finished run, or by hand)::

    python -m pipeline.engine to-universal RUN/checkpoints step-00000500 [--out RUN/checkpoints/step-00000500_universal]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping, Optional

import torch
from torch import nn

from pipeline import distributed
from pipeline.backend import grad_norm, resolve_precision
from pipeline.checkpoint import ResumePoint
from pipeline.config import ConfigError, OptimConfig, TrainConfig, check_deepspeed_passthrough
from pipeline.optim import accumulation_steps, build_optimizer, set_lr

log = logging.getLogger(__name__)

__all__ = [
    "Engine", "accumulation_steps", "build_ds_config", "consolidate_fp32_state_dict", "contiguous_parameters",
    "convert_to_universal", "is_universal_checkpoint", "saved_world_size", "saved_zero_stage",
]

UNIVERSAL_CHECKPOINT_INFO = {"universal_checkpoint_version": 0.2}
# DeepSpeed prints a progress line every steps_per_print steps; our metrics module does the logging.
_NEVER = 10 ** 15
# Gradient elements per ZeRO reduction bucket (see build_ds_config).
DEFAULT_REDUCE_BUCKET = 25_000_000


def _deepspeed():
    """Import DeepSpeed lazily: importing it costs seconds and probes the accelerator, which tools that only
    build configs (tests, config printing) do not need."""
    import deepspeed  # noqa: PLC0415 - deepspeed: probes the accelerator on import

    return deepspeed


# ----------------------------------------------------------------------------------------------------------
# config


def _deep_merge(base: dict, extra: Mapping, path: str = "deepspeed") -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{path}.{key}")
        else:
            out[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
    return out


def build_ds_config(train: TrainConfig, optim: OptimConfig, passthrough: Optional[Mapping[str, Any]] = None, *,
                    micro_batch_size: int, world_size: int, device_type: str,
                    load_universal: bool = False) -> dict:
    """The DeepSpeed config dict for this run.

    Args:
        train, optim: their config sections (batch sizes, ZeRO stage, precision; clipping).
        passthrough: the run config's ``deepspeed:`` section, deep-merged last (it may not set the keys above).
        micro_batch_size: per-rank micro-batch of the current stage (train.micro_batch_size or the stage's).
        world_size: number of data-parallel ranks.
        device_type: 'cuda' or 'cpu' (decides what precision 'auto' means).
        load_universal: the engine will load a universal checkpoint (a run resumed on another rank count).
    """
    passthrough = dict(passthrough or {})
    check_deepspeed_passthrough(passthrough, train.zero_stage)  # a raw dict here, not necessarily a Config's
    if optim.name == "lamb" and train.zero_stage > 0:
        raise ConfigError("optim.name=lamb with train.zero_stage>0: LAMB scales each weight tensor by its own "
                          "trust ratio, but ZeRO hands the optimizer one flat partition per param group, which "
                          "would silently change the algorithm. Use train.zero_stage=0, or optim.name=adamw / "
                          "rmsprop_tf")
    gas = accumulation_steps(train.global_batch_size, micro_batch_size, world_size)

    cfg: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(optim.clip_grad_norm),
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "dump_state": False,
        # our optimizers (RMSpropTF, Lamb, torch AdamW) are not on DeepSpeed's tested list; ZeRO only
        # partitions and reduces around them, which works for any torch optimizer
        "zero_allow_untested_optimizer": True,
        # with optimizer offload DeepSpeed would insist on its own CPU Adam; ours run on CPU too
        "zero_force_ds_cpu_optimizer": False,
    }
    if train.zero_stage > 0:
        # DeepSpeed's default bucket (5e8 elements) is sized for LLM layers: with fp32 gradients it is a 1.9 GiB
        # buffer (ZeRO-3 keeps it allocated, ZeRO-1/2 allocate one or two per backward), more than all model
        # states of EfficientNetV2-S (bench/zero_memory.py). 2.5e7 elements = 95 MiB still reduces a whole
        # S / M gradient partition in a few calls.
        cfg["zero_optimization"]["reduce_bucket_size"] = DEFAULT_REDUCE_BUCKET
    precision = resolve_precision(train.precision, device_type)
    if precision == "bf16":
        # autocast-style mixed precision: weights, BN and optimizer in fp32. An empty
        # lower_precision_safe_modules keeps gradient reduction in fp32 (DeepSpeed's default list would
        # reduce conv / linear gradients in bf16); set it through the deepspeed: section to trade that.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif precision == "bf16_weights":
        cfg["bf16"] = {"enabled": True}
        # DeepSpeed casts parameters only; BatchNorm needs its running statistics in the weights' dtype
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return _deep_merge(cfg, passthrough)


# ----------------------------------------------------------------------------------------------------------
# engine


def contiguous_parameters(model: nn.Module) -> int:
    """Give every parameter of ``model`` the default contiguous layout, in place; returns how many changed.

    DeepSpeed broadcasts every parameter at start-up as ``p.data.view(torch.uint8)``, which needs a unit
    stride in the last dimension: a channels_last conv weight (e.g. a timm model moved with
    ``.to(memory_format=torch.channels_last)``) fails there with "self.stride(-1) must be 1 to view Float as
    Byte" (ZeRO-3's partitioning broadcasts the same way). Little is lost: ZeRO 1 and 2 re-create every
    parameter as a contiguous view of their flat buffer during initialize, and ZeRO-3 gathers into contiguous
    views, so there a parameter layout would not survive anyway (only stage 0 keeps the module's tensors); and
    NHWC convolution kernels follow from a channels_last input (torch picks NHWC when the input OR the weight
    is channels_last). The Parameter objects stay the same, so an optimizer built on them still holds them.
    One log line (rank 0) says what was changed.
    """
    changed: dict[str, int] = {}
    with torch.no_grad():
        for p in model.parameters():
            if p.is_contiguous():
                continue
            layout = ("channels_last" if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                      else "strided")
            p.data = p.data.contiguous()
            changed[layout] = changed.get(layout, 0) + 1
    if changed and distributed.get_rank() == 0:
        what = ", ".join(f"{n} {layout}" for layout, n in sorted(changed.items()))
        log.warning("made %d parameter(s) contiguous for DeepSpeed (%s); activations stay NHWC when the "
                    "input is channels_last (EfficientNetV2: model.channels_last)", sum(changed.values()), what)
    return sum(changed.values())


class Engine:
    """A DeepSpeed engine with our config, explicit accumulation, lr setting, checkpoints.

    Build it with :meth:`Engine.build` (typical) or from an existing optimizer and config dict. The model
    is available as :attr:`module` (ZeRO-3: partitioned parameters; use :meth:`gathered_parameters`).
    """

    kind = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, *,
                 timeout_s: int = 1800):
        deepspeed = _deepspeed()
        distributed.init_distributed(timeout_s=timeout_s, single_process_group=True)
        self.config = ds_config
        if ds_config.get("bf16", {}).get("enabled"):
            self.precision = "bf16_weights"
        else:
            self.precision = "bf16" if ds_config.get("torch_autocast", {}).get("enabled") else "fp32"
        contiguous_parameters(model)
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                 dist_init_required=False)
        self._micro_done = 0  # micro-batches done in the current optimizer step
        # bf16 weights: DeepSpeed casts the module, not its inputs
        self._input_dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else None
        self._grad_norm: Optional[torch.Tensor | float] = None
        self._applied = True

    @classmethod
    def build(cls, model: nn.Module, train: TrainConfig, optim: OptimConfig,
              passthrough: Optional[Mapping[str, Any]] = None, *, micro_batch_size: Optional[int] = None,
              load_universal: bool = False, resume: Optional[ResumePoint] = None) -> "Engine":
        """Optimizer (ours, :func:`pipeline.optim.build_optimizer`), DeepSpeed config and engine in one call.

        ``micro_batch_size``: the first stage's per-rank micro-batch (default train.micro_batch_size).
        ``resume``: the checkpoint the run will load with :meth:`load_resume_point`; one written by another
        number of ranks with ZeRO 1-3 needs an engine that loads universal checkpoints (decided here).
        """
        world = distributed.init_distributed(timeout_s=train.collective_timeout_s,
                                             single_process_group=True).world_size
        load_universal = load_universal or needs_universal(resume)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        ds_config = build_ds_config(train, optim, passthrough, micro_batch_size=micro_batch_size or
                                    train.micro_batch_size, world_size=world, device_type=device_type,
                                    load_universal=load_universal)
        optimizer = build_optimizer(optim, model, train.global_batch_size)
        return cls(model, optimizer, ds_config, timeout_s=train.collective_timeout_s)

    # ------------------------------------------------------------------------------------------------------
    # properties

    @property
    def module(self) -> nn.Module:
        return self._ds.module

    @property
    def ds_engine(self):
        """The DeepSpeed engine itself, for what this wrapper does not cover."""
        return self._ds

    @property
    def optimizer(self):
        """The optimizer DeepSpeed steps (ZeRO's wrapper around ours); its param_groups carry our groups."""
        return self._ds.optimizer

    @property
    def device(self) -> torch.device:
        return self._ds.device

    @property
    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    @property
    def world_size(self) -> int:
        return int(self._ds.dp_world_size)

    @property
    def rank(self) -> int:
        return distributed.get_rank()

    @property
    def micro_batch_size(self) -> int:
        return int(self._ds.train_micro_batch_size_per_gpu())

    @property
    def grad_accum_steps(self) -> int:
        return int(self._ds.gradient_accumulation_steps())

    @property
    def global_batch_size(self) -> int:
        return int(self._ds.train_batch_size())

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by :meth:`load`)."""
        return int(self._ds.global_steps)

    def train(self, mode: bool = True) -> "Engine":
        self._ds.train(mode)
        return self

    def eval(self) -> "Engine":
        self._ds.eval()
        return self

    # ------------------------------------------------------------------------------------------------------
    # a training step

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The model's forward through DeepSpeed (ZeRO-3 gathering, autocast when configured). With bf16
        weights, floating-point tensor arguments are cast to bf16 first."""
        if self._input_dtype is not None:
            cast = self._cast_input
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return self._ds(*args, **kwargs)

    def _cast_input(self, x):
        if torch.is_tensor(x) and x.is_floating_point():
            return x.to(self._input_dtype)
        return x

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next backward is the last micro-batch of the current optimizer step."""
        return self._micro_done == self.grad_accum_steps - 1

    def micro_batch(self) -> ContextManager:
        """Around one micro-batch (the backend protocol): DeepSpeed reduces at the boundary by itself."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of one micro-batch's mean loss; DeepSpeed divides it by the accumulation steps."""
        self._ds.set_gradient_accumulation_boundary(self.is_gradient_accumulation_boundary())
        return self._ds.backward(loss)

    def step(self) -> bool:
        """End of a micro-batch: returns True when this was the last one and the optimizer stepped."""
        boundary = self.is_gradient_accumulation_boundary()
        own_norm = None
        if boundary and self.zero_stage == 0:
            # ZeRO 1-3 (and bf16 weights) compute the global norm in their optimizer step; plain stage 0 does
            # not, so measure it here, after DeepSpeed's all-reduce in the boundary backward
            own_norm = grad_norm(self._ds.module.parameters())
            if own_norm is not None and not self._ds.bfloat16_enabled() and not bool(torch.isfinite(own_norm)):
                # ZeRO 1-3 and bf16 weights skip a step whose gradient is not finite (DeepSpeed's overflow
                # check); a plain stage-0 optimizer would write NaN into every weight, so it is skipped here
                self._ds.zero_grad()
                self._micro_done, self._grad_norm, self._applied = 0, own_norm, False
                return True
        self._ds.step()
        if boundary:
            self._micro_done = 0
            norm = self._ds.get_global_grad_norm()
            # kept as DeepSpeed returns it (a device tensor on GPU): no host sync until someone asks
            self._grad_norm = norm if norm is not None else own_norm
            self._applied = bool(self._ds.was_step_applied())
        else:
            self._micro_done += 1
        return boundary

    def step_applied(self) -> bool:
        """Whether the last optimizer step updated the weights; False when it was skipped because its gradient
        was not finite (the same answer on every rank: the norm is of the reduced gradient)."""
        return self._applied

    def set_lr(self, lr: float) -> None:
        """Learning rate of the next optimizer step (every param group)."""
        set_lr(self._ds.optimizer, lr)

    def get_lr(self) -> float:
        return float(self._ds.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> Optional[float]:
        """Global L2 norm of the gradient of the last optimizer step, before clipping (None before any)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def set_micro_batch_size(self, micro_batch_size: int, micro_key: str = "progressive.stage_micro_batch") -> int:
        """Change the per-rank micro-batch at a step boundary, keeping the global batch; returns the new
        accumulation steps. Refuses (naming ``micro_key``) when the global batch does not divide."""
        if self._micro_done != 0:
            raise RuntimeError(f"set_micro_batch_size in the middle of an optimizer step ({self._micro_done} of "
                               f"{self.grad_accum_steps} micro-batches done); call it between steps")
        global_batch = self.global_batch_size
        gas = accumulation_steps(global_batch, micro_batch_size, self.world_size, micro_key=micro_key)
        if micro_batch_size == self.micro_batch_size:
            return gas
        # DeepSpeed's two public setters: the first keeps the accumulation (changing the global batch), the
        # second restores the global batch by changing the accumulation
        self._ds.set_train_micro_batch_size(micro_batch_size)
        self._ds.set_train_batch_size(global_batch)
        # ZeRO 1/2 keep their own copy of the accumulation count (it selects the offload accumulation path)
        if hasattr(self._ds.optimizer, "gradient_accumulation_steps"):
            self._ds.optimizer.gradient_accumulation_steps = gas
        assert self.grad_accum_steps == gas and self.global_batch_size == global_batch
        return gas

    # ------------------------------------------------------------------------------------------------------
    # ZeRO-3 access

    def gathered_parameters(self, params: Iterable[nn.Parameter], modifier_rank: Optional[int] = None
                            ) -> ContextManager:
        """Inside: ZeRO-3 parameters are whole on every rank; with ``modifier_rank`` that rank's changes are
        broadcast and re-partitioned on exit. A no-op context for other stages."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return _deepspeed().zero.GatheredParameters(list(params), modifier_rank=modifier_rank)

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def save(self, save_dir: str | os.PathLike, tag: str, client_state: Optional[dict] = None) -> None:
        """DeepSpeed save_checkpoint on every rank (collective) into ``save_dir/tag``.

        ``client_state`` is stored from rank 0 only (DeepSpeed's behaviour); per-rank state needs its own
        files. ``universal_checkpoint_info`` is added so that :func:`convert_to_universal` works.
        """
        state = dict(client_state or {})
        state.setdefault("universal_checkpoint_info", dict(UNIVERSAL_CHECKPOINT_INFO))
        ok = self._ds.save_checkpoint(str(save_dir), tag=tag, client_state=state, save_latest=False)
        if ok is False:
            raise RuntimeError(f"DeepSpeed could not save the checkpoint {Path(save_dir) / tag}")

    def load(self, load_dir: str | os.PathLike, tag: str, *, load_optimizer_states: bool = True,
             load_module_only: bool = False) -> dict:
        """Load ``load_dir/tag`` (every rank; collective); returns the client_state (without DeepSpeed's keys).

        A ZeRO checkpoint saved by another number of ranks is refused with the command that converts it; a
        universal checkpoint needs an engine built with ``load_universal=True``.
        """
        path = Path(load_dir) / tag
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder {path} does not exist")
        universal = is_universal_checkpoint(path)
        if universal and not self._ds.load_universal_checkpoint():
            raise ConfigError(f"{path} is a universal checkpoint: build the engine with load_universal=True "
                              "(DeepSpeed config checkpoint.load_universal)")
        if not universal and self._ds.load_universal_checkpoint():
            raise ConfigError(f"{path} is not a universal checkpoint but the engine was built with "
                              f"load_universal=True; convert it first: {_convert_command(load_dir, tag)}")
        saved = saved_world_size(load_dir, tag)
        if not universal and saved is not None and saved != self.world_size and load_optimizer_states \
                and not load_module_only:
            raise ConfigError(f"checkpoint {path} was saved by {saved} ranks with ZeRO and this run has "
                              f"{self.world_size}; convert it to a universal checkpoint "
                              f"({_convert_command(load_dir, tag)}) and load that with load_universal=True")
        load_path, client_state = self._ds.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=False, load_module_only=load_module_only)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path} (see its log above)")
        self._micro_done = 0
        return dict(client_state or {})

    def save_checkpoint(self, directory: str | os.PathLike, tag: str) -> None:
        """The backend protocol's save: :meth:`save` with no client state."""
        self.save(directory, tag)

    def load_checkpoint(self, point: ResumePoint) -> None:
        """Load a checkpoint of the run (the backend protocol's load): as it is when the world size is the
        same or the checkpoint is ZeRO-0 (whole states); else converted to a universal checkpoint first
        (rank 0 converts, once; pruned with the checkpoint) and loaded re-sharded for this world size."""
        if needs_universal(point):
            convert_to_universal(point.directory, point.tag, point.universal_path)
            self.load(point.universal_path.parent, point.universal_path.name)
        else:
            self.load(point.directory, point.tag)

    def resume_message(self, point: ResumePoint) -> str:
        """What loading ``point`` will do, for the console."""
        if not point.world_size_changed:
            return point.message
        s, n = point.saved_world_size, point.world_size
        ranks = f"a {s}-rank checkpoint on {n} rank{'s' if n != 1 else ''}"
        if needs_universal(point):
            return (f"resuming {ranks}: converting to a universal checkpoint in {point.universal_path} (per-rank "
                    "RNG and loader states are re-derived from the step and the samples seen)")
        return (f"resuming from {point.path} (step {point.step}): a {s}-rank ZeRO-0 checkpoint on {n} rank(s); "
                "its states are whole, so it loads as it is")


def needs_universal(point: Optional[ResumePoint]) -> bool:
    """A resume point that only a universal checkpoint can load here: another world size wrote it with ZeRO
    1-3 (a ZeRO-0 checkpoint holds whole states and loads on any number of ranks as it is)."""
    return bool(point is not None and point.world_size_changed and saved_zero_stage(point.directory, point.tag) > 0)


# ----------------------------------------------------------------------------------------------------------
# checkpoint files: world size, universal conversion, consolidation


def saved_zero_stage(ckpt_dir: str | os.PathLike, tag: str) -> int:
    """ZeRO stage of a checkpoint from its file names: 3 (per-rank model files), 2 (ZeRO-1 and 2 write the
    same files), or 0 (no ZeRO optimizer files)."""
    path = Path(ckpt_dir) / tag
    # DeepSpeed prefixes the file names with "bf16_" in bf16 mode
    if glob.glob(str(path / "*zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        return 3 if glob.glob(str(path / "*zero_pp_rank_*_mp_rank_*_model_states.pt")) else 2
    return 0


def saved_world_size(ckpt_dir: str | os.PathLike, tag: str) -> Optional[int]:
    """Number of data-parallel ranks that wrote a checkpoint's partitioned optimizer state (one file each;
    ZeRO 1-3, and stage 0 with bf16 weights); None when the optimizer state is whole (fp32 / autocast stage
    0), which loads on any number of ranks."""
    path = Path(ckpt_dir) / tag
    files = glob.glob(str(path / "*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def is_universal_checkpoint(path: str | os.PathLike) -> bool:
    """A folder written by ds_to_universal (it has a ``zero/`` folder of per-parameter files)."""
    return (Path(path) / "zero").is_dir()


def _convert_command(ckpt_dir, tag) -> str:
    return f"python -m pipeline.engine to-universal {ckpt_dir} {tag}"


def convert_to_universal(ckpt_dir: str | os.PathLike, tag: str, out_dir: str | os.PathLike, *,
                         workers: int = 4, timeout_s: Optional[int] = None) -> Path:
    """Convert the ZeRO checkpoint ``ckpt_dir/tag`` into a universal checkpoint in ``out_dir``.

    Load it with an engine built with ``load_universal=True``: ``engine.load(out_dir.parent, out_dir.name)``.
    Runs DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``) in a subprocess, into a
    temporary folder renamed at the end, so an interrupted conversion is never mistaken for a finished one;
    an existing finished conversion is reused. With a process group, rank 0 converts and the others wait.
    """
    src, out = Path(ckpt_dir) / tag, Path(out_dir)
    distributed.on_rank0(lambda: _convert(src, out, workers, timeout_s))
    return out


# SLURM signals every process of a job step: its preemption warning (SIGUSR1) and SIGTERM would kill the
# converter (their default action) and fail the resume, while the trainer handles them once the checkpoint is
# loaded. The converter starts with both blocked (the mask survives fork and exec), ignores them (an ignored
# disposition survives its pool workers' fork too), then unblocks them: one sent at any moment is discarded.
_PREEMPTION_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}
_CONVERTER = (
    "import runpy, signal, sys\n"
    "for sig in (signal.SIGUSR1, signal.SIGTERM):\n"
    "    signal.signal(sig, signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGUSR1, signal.SIGTERM))\n"
    "sys.argv[0] = 'ds_to_universal'\n"
    "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__', alter_sys=True)\n")


def _run_converter(cmd: list[str], timeout_s: Optional[int]) -> subprocess.CompletedProcess:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _PREEMPTION_SIGNALS)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _convert(src: Path, out: Path, workers: int, timeout_s: Optional[int]) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src} does not exist")
    if is_universal_checkpoint(out):
        log.info("universal checkpoint %s exists; reusing it", out)
        return
    if saved_world_size(src.parent, src.name) is None:
        raise ConfigError(f"{src} is a ZeRO stage-0 checkpoint: its optimizer state is whole and it loads on any "
                          "number of ranks as it is; no universal conversion is needed")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = ["--input_folder", str(src), "--output_folder", str(tmp), "--num_extract_workers", str(workers),
            "--num_merge_workers", str(max(1, workers // 2))]
    log.info("converting %s to a universal checkpoint: python -m deepspeed.checkpoint.ds_to_universal %s",
             src, " ".join(args))
    proc = _run_converter([sys.executable, "-c", _CONVERTER, *args], timeout_s)
    if proc.returncode != 0 or not is_universal_checkpoint(tmp):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        shutil.rmtree(tmp, ignore_errors=True)
        hint = ""
        if "universal_checkpoint_info" in tail:
            hint = (" The checkpoint lacks universal_checkpoint_info in its client state (saved by another "
                    "tool?); pass --inject_missing_state to ds_to_universal by hand.")
        raise RuntimeError(f"universal conversion of {src} failed (exit {proc.returncode}).{hint}\n{tail}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def consolidate_fp32_state_dict(ckpt_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the whole model (parameters from the fp32 master copy, and buffers) from a
    checkpoint of any ZeRO stage; no process group needed. Keys are the module's own (no wrapper prefix)."""
    path = Path(ckpt_dir) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if saved_zero_stage(ckpt_dir, tag) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415 - deepspeed

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress on stdout
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path} has no mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    module = {k: (v.float() if v.is_floating_point() else v) for k, v in state["module"].items()}
    _use_fp32_master(module, state["module"], state.get("optimizer"))
    return module


def _use_fp32_master(out: dict, saved: dict, optimizer_state) -> None:
    """Stage 0 with bf16 weights: the module holds bf16 copies; put the optimizer's fp32 master weights in.

    DeepSpeed stores them per param group without names, so each is matched to the module tensor of the
    same shape whose bf16 value it rounds to."""
    groups = optimizer_state.get("fp32_groups") if isinstance(optimizer_state, dict) else None
    if not groups:
        return
    free = {k for k, v in saved.items() if v.dtype == torch.bfloat16}
    for master in (t for g in groups for t in g):
        for key in sorted(free):
            if saved[key].shape == master.shape and torch.equal(saved[key], master.to(torch.bfloat16)):
                out[key] = master.float().clone()
                free.discard(key)
                break


# ----------------------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.engine",
                                     description="DeepSpeed checkpoint tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("to-universal", help="convert a ZeRO checkpoint for loading on another number of ranks")
    p.add_argument("ckpt_dir", help="the folder holding the tag folders, e.g. RUN/checkpoints")
    p.add_argument("tag", help="checkpoint tag, e.g. step-00000500")
    p.add_argument("--out", help="output folder (default: CKPT_DIR/TAG_universal)")
    p.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.cmd == "to-universal":
        out = Path(args.out) if args.out else Path(args.ckpt_dir) / f"{args.tag}_universal"
        try:
            convert_to_universal(args.ckpt_dir, args.tag, out, workers=args.workers)
        except (ConfigError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
