"""The training loop of pretraining and fine-tuning: stages, steps, EMA, evaluation, checkpoints, preemption.

One :class:`Trainer` runs over a backend (:class:`pipeline.backend.Backend`): DeepSpeed for pretraining
(``python -m pipeline.pretrain``), accelerate for fine-tuning (``accelerate launch -m pipeline.finetune``). What
differs between the two is a :class:`Recipe`: where the model comes from (a fresh model, or an init with a new
head), which backend, and what is written at the end (an export and metrics.json for fine-tuning).

Per optimizer step: the stage comes from the step alone (``schedule.stage_at(step)``); on a change the loader
switches transforms / micro-batch, the model its dropout (and drop-path), the backend its accumulation, and the
stage is logged. Then ``grad_accum_steps`` micro-batches forward / backward, one optimizer step at
``lr_at(step)``, an EMA update every ``ema.every`` steps. Evaluation every ``eval.every_steps`` and at the end; a
checkpoint every ``checkpoint.every_steps``, at every stage boundary, at the end, and when a preemption signal
arrives.

Faults: a step whose (reduced) gradient is not finite updates nothing (the backend skips the optimizer step, the
BN statistics are put back, no EMA update) and is counted; ``train.max_nonfinite_steps`` of them in a row stop
the run with a :class:`TrainingError`. A collective that fails because another rank died or stopped answering
(every process group times out after ``train.collective_timeout_s``) ends the run with one TrainingError line too.

Checkpoint contents (``RUN/checkpoints/step-N``): the backend's files (DeepSpeed's model / optimizer shards, or
accelerate's state), and per rank ``rank-0000R.pt`` with the RNG states and the registered parts: ``trainer``
(step, samples seen), ``loader`` (position), ``bn`` (this rank's BN statistics), ``ema`` (rank 0's, or this
rank's shard under ZeRO-3), ``ema_buffers`` (this rank's EMA of its BN statistics); ``COMPLETE.json`` last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from pipeline import distributed
from pipeline.backend import Backend
from pipeline.bn import averaged_bn_stats, bn_stat_tensors, bn_stats_state, convert_sync_bn, load_bn_stats_state
from pipeline.checkpoint import CheckpointManager, ResumePoint, latest
from pipeline.config import Config, ConfigError, frozen_settings, save_resolved
from pipeline.data.decode import describe_decoder, resolve_decoder
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.workers import prestart as prestart_workers
from pipeline.ema import ModelEMA
from pipeline.engine import Engine  # DeepSpeed itself is imported when an engine is built
from pipeline.export import RUN_META
from pipeline.losses import soft_cross_entropy
from pipeline.metrics import MetricsLogger, StageAccounting, Throughput, evaluate_topk, gpu_memory_gb, write_json
from pipeline.optim import accumulation_steps, lr_schedule
from pipeline.preemption import PreemptionHandler
from pipeline.progressive import Stage, StageSchedule, resolve_total_steps
from pipeline.runlock import RunLock
from pipeline.testhooks import TestHooks
from pipeline.watchdog import Watchdog

log = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1


class TrainingError(ConfigError):
    """The run cannot go on: too many non-finite steps in a row, or a collective that failed because another rank
    died or stopped answering. The message names the step, the stage or rank, and the checkpoint to resume
    from; a ConfigError, so that the entry points print it as one ``error:`` line (exit 2)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own streams (dropout, stochastic depth) after the shared initialisation."""
    return seed * 100_003 + 1 + rank


class Recipe:
    """What a kind of run adds to the loop. Subclasses: :class:`pipeline.pretrain.Pretrain` and
    :class:`pipeline.finetune.Finetune`."""

    backend = "deepspeed"
    """'deepspeed' or 'accelerate'."""

    def check(self, cfg: Config) -> None:
        """Cheap checks of the run's input on every rank, before any process group exists."""

    def build_model(self, trainer: "Trainer") -> nn.Module:
        """The model to train (called once, every rank, under the run's seed)."""
        raise NotImplementedError

    def default_dropout(self, cfg: Config, model: nn.Module) -> Optional[float]:
        """Dropout of a run without progressive learning (None: the stage table's maximum)."""
        return cfg.model.drop_rate

    def finish(self, trainer: "Trainer", results: dict) -> dict:
        """After the final evaluation (every rank); returns what the run adds to its summary."""
        return {}


# ---------------------------------------------------------------------------------------------- state parts


@dataclasses.dataclass
class Counters:
    """The trainer's own checkpoint part: optimizer steps done and images consumed by them (global)."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0
    """Steps skipped because their gradient was not finite, in all; and in a row up to the last step."""
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return {"version": TRAINER_STATE_VERSION, "step": self.step, "samples_seen": self.samples_seen,
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != TRAINER_STATE_VERSION:
            raise ConfigError(f"trainer state version {state.get('version')} is not {TRAINER_STATE_VERSION}; "
                              "resume with the code that wrote it")
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        # (absent from checkpoints written before non-finite steps were counted)
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))


class _LoaderPart:
    """The loader's position; the same on every rank, so after a world-size change any rank's continues the
    epoch with the samples no rank has seen yet."""

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def load_resharded(self, states: list) -> None:
        self.loader.load_state_dict(states[0])


class _BNPart:
    """This rank's BN running statistics. The model files hold their cross-rank mean; each rank trained on with
    its own, so it continues with its own. After a world-size change the mean is the only sensible start."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> list:
        return bn_stats_state(self.model)

    def load_state_dict(self, state: list) -> None:
        load_bn_stats_state(self.model, state)


class _EMAPart:
    """The EMA weights: rank 0's (every rank's are the same) or, under ZeRO-3, each rank's shard. Its EMA of
    the BN statistics is their cross-rank mean (collective: every rank calls state_dict)."""

    def __init__(self, ema: ModelEMA, is_main: bool):
        self.ema, self.is_main = ema, is_main

    @property
    def scope(self) -> str:
        return "rank" if self.ema.sharded else "main"

    def state_dict(self) -> Optional[dict]:
        buffers = self.ema.synced_buffers()  # collective: before any rank-dependent branch
        return self.ema.state_dict(buffers=buffers) if (self.ema.sharded or self.is_main) else None

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)

    def load_resharded(self, states: list) -> None:
        self.ema.load_state_dict(states)  # ZeRO-3 shards of another world size: reassembled, re-sliced


class _EMABuffersPart:
    """This rank's own EMA of its BN statistics (the EMA part holds their mean)."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def state_dict(self) -> list:
        return self.ema.local_buffers()

    def load_state_dict(self, state: list) -> None:
        self.ema.load_local_buffers(state)


# ---------------------------------------------------------------------------------------------- backends


def start_backend(kind: str,
                  cfg: Config) -> tuple[int, int, Callable[[nn.Module, int, Optional[ResumePoint]], Backend]]:
    """Start the backend's process group; returns (rank, world size, build(model, micro-batch, resume point))."""
    t = cfg.train
    if kind == "deepspeed":
        env = distributed.init_distributed(timeout_s=t.collective_timeout_s, single_process_group=True)

        def build(model: nn.Module, micro: int, point: Optional[ResumePoint]) -> Backend:
            return Engine.build(model, t, cfg.optim, cfg.deepspeed, micro_batch_size=micro, resume=point)

        return env.rank, env.world_size, build
    if kind == "accelerate":
        # pipeline.accel imports accelerate at its top: a DeepSpeed run never loads it
        from pipeline.accel import AccelerateBackend  # noqa: PLC0415 - accelerate: fine-tuning runs only

        backend = AccelerateBackend(t, cfg.optim)
        return backend.rank, backend.world_size, lambda model, micro, point: backend.prepare(model, micro)
    raise ValueError(f"unknown backend '{kind}': 'deepspeed' or 'accelerate'")


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Builds everything from a Config and a recipe; ``train()`` runs to the end or to a preemption and returns a
    summary."""

    def __init__(self, cfg: Config, recipe: Recipe):
        self.cfg, self.recipe = cfg, recipe
        t, d = cfg.train, cfg.data
        self.run_dir = Path(t.run_dir)
        recipe.check(cfg)
        self.rank, self.world_size, build_backend = start_backend(recipe.backend, cfg)
        self.is_main = self.rank == 0
        self.control_group = distributed.control_group()  # every rank, right after the process group starts
        # first, so that a preemption warning during start-up (loading, conversion) is not fatal
        self.preempt = PreemptionHandler.from_config(cfg.checkpoint, rank=self.rank)
        self.hooks = TestHooks(self.rank)
        self.watchdog: Optional[Watchdog] = None  # armed by train(): stacks printed when this rank stalls
        # One job per run dir (pipeline.runlock): rank 0 opens and locks it; an unusable or busy one fails here
        self.run_lock = RunLock(self.run_dir)
        distributed.on_rank0(self.run_lock.acquire)
        if self.is_main:
            save_resolved(cfg, self.run_dir)
        self.logger: Optional[MetricsLogger] = None

        # The loader first: the dataset size decides the epoch length and, with train.epochs, the run length.
        # It starts on a provisional stage; the real one is set before the first batch (_enter_stage).
        provisional = Stage(index=0, start_step=0, end_step=1, image_size=cfg.progressive.min_image_size)
        self.loader = build_train_loader(d, stage=provisional, micro_batch_size=t.micro_batch_size,
                                         num_classes=cfg.model.num_classes, label_smoothing=t.label_smoothing,
                                         seed=t.seed, rank=self.rank, world_size=self.world_size)
        self.num_classes = self.loader.num_classes
        if d.workers > 0:
            prestart_workers(d.worker_start)  # the workers' fork server loads torch while the engine is built
        # The validation data too (every run ends with an evaluation): a missing val shard or split fails here,
        # not at the first evaluation hours in. Cheap: the index is read, nothing is decoded.
        build_eval_loader(d, image_size=d.eval_image_size, micro_batch_size=1, rank=self.rank,
                          world_size=self.world_size, num_classes=self.num_classes)
        self.train_samples = self.loader.dataset_samples
        self.steps_per_epoch = self.train_samples / t.global_batch_size
        self.total_steps = resolve_total_steps(t, self.train_samples)

        # The same initial weights on every rank and in every run of this seed; then per-rank streams for
        # dropout / stochastic depth (restored exactly from the checkpoint's RNG states on resume).
        seed_everything(t.seed)
        model = recipe.build_model(self)
        seed_everything(rank_seed(t.seed, self.rank))
        self.schedule = StageSchedule.from_config(cfg.progressive, self.total_steps,
                                                  default_dropout=recipe.default_dropout(cfg, model))
        for stage in self.schedule:  # fail now, not at a later stage, on a batch that does not divide
            accumulation_steps(t.global_batch_size, self.micro_batch_for(stage), self.world_size)
        self.lr_fn = lr_schedule(cfg.optim, global_batch_size=t.global_batch_size, total_steps=self.total_steps,
                                 steps_per_epoch=self.steps_per_epoch)

        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, rank=self.rank, world_size=self.world_size,
                                      settings=frozen_settings(cfg))
        self.resume_point = self.ckpt.resolve_resume()
        self.counters = Counters(step=self.resume_point.step if self.resume_point else 0)
        stage = self.schedule.stage_at(self.step)
        if t.sync_bn and self.world_size > 1:
            model = convert_sync_bn(model, device_type="cuda" if torch.cuda.is_available() else "cpu")
        if cfg.model.compile:
            model.compile()  # in place: state-dict keys stay free of '_orig_mod.'
        self.backend = build_backend(model, self.micro_batch_for(stage), self.resume_point)
        # every group the backend made too: a rank that stops answering fails the others after the timeout
        distributed.time_out_every_group(t.collective_timeout_s)
        self.ckpt.ranks_info()  # where every rank runs: checkpoint markers record it, a lost rank is named by it
        self.model = self.backend.module
        self._bn_stats = bn_stat_tensors(self.model)  # restored after a skipped (non-finite) step
        self._bn_before_step = [b.clone() for b in self._bn_stats]
        self.step_applied = True  # the last step updated the weights (False: skipped, not finite)
        self.ema = (ModelEMA(self.model, cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup,
                             gathered_parameters=self.backend.gathered_parameters) if cfg.ema.enabled else None)
        self.stage: Optional[Stage] = None
        self.eval_results: dict = {}
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, total_steps=self.total_steps,
                                    start_step=self.step)
        self.accounting = StageAccounting()
        self.throughput = Throughput()
        self._eval_loaders: dict[int, Any] = {}
        self._register_parts()
        if self.resume_point is not None:
            self.print(self.backend.resume_message(self.resume_point))
            self.hooks.pause("startup")
            self.ckpt.restore(self.resume_point, self.backend.load_checkpoint)
        if self.is_main:
            # what export needs without the data: classes (with wnids) and the run's image sizes
            write_json(self.run_dir / RUN_META, {"classes": list(self.loader.classes), "num_classes": self.num_classes,
                                                 "total_steps": self.total_steps,
                                                 "train_image_size": self.schedule.stages[-1].image_size,
                                                 "eval_image_size": self.cfg.data.eval_image_size})

    # ------------------------------------------------------------------------------------------ helpers

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def samples_seen(self) -> int:
        return self.counters.samples_seen

    def micro_batch_for(self, stage: Stage) -> int:
        return stage.micro_batch_size or self.cfg.train.micro_batch_size

    def print(self, msg: str) -> None:
        """One line on the main process's console (above the progress bar once it exists)."""
        if not self.is_main:
            return
        if self.logger is not None:
            self.logger.print(msg)
        else:
            print(msg, flush=True)


    def _register_parts(self) -> None:
        c = self.ckpt
        c.register("trainer", self.counters, scope="main")
        c.register("loader", _LoaderPart(self.loader))
        if not self.cfg.train.sync_bn:
            c.register("bn", _BNPart(self.model))
        if self.ema is not None:
            part = _EMAPart(self.ema, self.is_main)
            c.register("ema", part, scope=part.scope)
            c.register("ema_buffers", _EMABuffersPart(self.ema))

    def _bn_averaged(self):
        """BN statistics averaged across ranks inside, each rank's own again after (see pipeline.bn)."""
        return contextlib.nullcontext() if self.cfg.train.sync_bn else averaged_bn_stats(self.model)

    def _write_model(self, directory: Path, tag: str) -> None:
        """The backend's files hold the cross-rank mean of the BN statistics; the ranks go on with their own."""
        with self._bn_averaged():
            self.backend.save_checkpoint(directory, tag)
        self.hooks.pause("save")

    def _save(self) -> None:
        """A checkpoint that does not change the run (see _write_model and the parts)."""
        self.ckpt.save(self.step, self._write_model,
                       extra={"stage": self.schedule.stage_at(max(self.step - 1, 0)).index,
                              "samples_seen": self.samples_seen, "backend": self.backend.kind})

    # ------------------------------------------------------------------------------------------ stages

    def _enter_stage(self, stage: Stage) -> None:
        mb = self.micro_batch_for(stage)
        if self.stage is not None:  # a change within this launch (not the first stage of a start)
            self.hooks.pause("stage")
        self.model.set_regularization(dropout=stage.dropout, drop_path=stage.drop_path)
        accum = self.backend.set_micro_batch_size(mb)
        self.loader.set_stage(stage, mb)
        self.stage = stage
        self.accounting.start(stage.index, stage.image_size)
        self.throughput.reset()
        self._grid_pending = self.cfg.train.image_grid
        line = (f"stage {stage.index + 1}/{len(self.schedule)}: steps {stage.start_step}-{stage.end_step - 1}, "
                f"image {stage.image_size}px, RandAugment {stage.randaug:g}, mixup {stage.mixup:g}, "
                f"cutmix {stage.cutmix:g}, dropout {stage.dropout:g}"
                + (f", drop-path {stage.drop_path:g}" if stage.drop_path is not None else "")
                + f", micro-batch {mb} x {accum} accumulation x {self.world_size} ranks")
        self.print(line)
        self.logger.text(self.step, "stage", line)
        self.logger.scalars(self.step, self._stage_scalars(stage))

    @staticmethod
    def _stage_scalars(stage: Stage) -> dict:
        out = {"stage/index": stage.index, "stage/image_size": stage.image_size, "stage/randaug": stage.randaug,
               "stage/mixup": stage.mixup, "stage/cutmix": stage.cutmix, "stage/dropout": stage.dropout}
        if stage.drop_path is not None:
            out["stage/drop_path"] = stage.drop_path
        return out

    # ------------------------------------------------------------------------------------------ the loop

    def _micro_step(self, batch) -> torch.Tensor:
        dev = self.backend.device
        images = batch["image"].to(dev, non_blocking=True)  # the model makes it channels_last if configured
        images = self.hooks.poison(self.step + 1, images)
        self.hooks.record_keys(self.step + 1, self.loader, batch)
        targets = batch["target"].to(dev, non_blocking=True)
        with self.backend.micro_batch():
            loss = soft_cross_entropy(self.backend.forward(images), targets)
            self.backend.backward(loss)
        self.backend.step()
        return loss.detach()

    def train_step(self, stage: Stage, lr: float) -> torch.Tensor:
        """One optimizer step at ``lr`` (``grad_accum_steps`` micro-batches), the EMA update, the counters;
        returns this rank's mean loss of the step (a device tensor: no host sync). A step whose gradient is not
        finite updates nothing: the backend skips the optimizer step, the BN statistics its forwards changed are
        put back, the EMA is not updated (``step_applied`` False; :meth:`_nonfinite_step` counts it)."""
        cfg = self.cfg
        self.backend.set_lr(lr)
        if self._bn_stats:
            torch._foreach_copy_(self._bn_before_step, self._bn_stats)
        step_loss = torch.zeros((), device=self.backend.device)
        accum = self.backend.grad_accum_steps
        images = 0
        for _ in range(accum):
            batch = next(self.loader)
            if self._grid_pending:
                self.logger.image_grid(self.step, f"train_images/stage{stage.index}", batch["image"],
                                       cfg.data.mean, cfg.data.std)
                self._grid_pending = False
            step_loss += self._micro_step(batch)
            images += batch["image"].shape[0]
        self.step_applied = self.backend.step_applied()
        if not self.step_applied:
            if self._bn_stats:
                torch._foreach_copy_(self._bn_stats, self._bn_before_step)
            self.counters.nonfinite_steps += 1
            self.counters.nonfinite_in_a_row += 1
        else:
            self.counters.nonfinite_in_a_row = 0
        if self.ema is not None and self.step % cfg.ema.every == 0 and self.step_applied:
            self.ema.update(self.step // cfg.ema.every)
        global_images = images * self.world_size
        self.counters.step += 1
        self.counters.samples_seen += global_images
        self.accounting.step(global_images)
        self.throughput.update(global_images)
        return step_loss / accum

    def train(self) -> dict:
        """Run to the end or to a preemption; returns the summary. A collective that fails (another rank died, or
        stopped answering for train.collective_timeout_s) ends the run with one TrainingError line. A rank that
        makes no progress for 3/4 of that timeout prints its stacks first (pipeline.watchdog)."""
        self.watchdog = Watchdog(0.75 * self.cfg.train.collective_timeout_s, rank=self.rank)
        try:
            return self._train()
        except (RuntimeError, TrainingError) as e:
            self.logger.close()  # the progress bar ends its line: the error gets one of its own
            if isinstance(e, TrainingError) or not distributed.is_collective_failure(e):
                raise
            raise TrainingError(self._collective_failure_message(e)) from None
        finally:
            self.watchdog.close()
            self.watchdog = None

    def _beat(self, where: str) -> None:
        if self.watchdog is not None:
            self.watchdog.beat(where)

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.print(self.schedule.format_table(t.global_batch_size))
        self.print(f"{self.train_samples:,} training samples, {self.num_classes} classes, "
                    f"{self.total_steps:,} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs), "
                    f"{self.world_size} rank(s), {self._backend_line()}, run dir {self.run_dir}")
        d = cfg.data
        self.print(f"images: {describe_decoder(resolve_decoder(d.decoder))}, crop-aware reduced decode "
                   f"{'on' if d.reduced_decode else 'off'}, {d.workers} loader worker(s) per rank")
        if self.step >= self.total_steps:
            self.print(f"the run is complete (step {self.step}): evaluating it again")
            self._enter_stage(self.schedule.stage_at(self.step))
        self.backend.train()
        loss_sum = torch.zeros((), device=self.backend.device)
        loss_count = 0
        losses: list[tuple[int, float]] = []
        preempted = False
        try:
            while self.step < self.total_steps:
                stage = self.schedule.stage_at(self.step)
                if stage != self.stage:
                    self._enter_stage(stage)
                lr = self.lr_fn(self.step)
                loss = self.train_step(stage, lr)
                self._beat(f"step {self.step}")
                if self.step_applied:  # a skipped step's loss is not finite: left out of the logged mean
                    loss_sum += loss
                    loss_count += 1

                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    losses.append((self.step, self._log_step(stage, loss_sum / loss_count, lr)))
                    loss_sum.zero_()
                    loss_count = 0
                if not self.step_applied:
                    self._nonfinite_step(stage)

                final = self.step == self.total_steps
                boundary = self.step == stage.end_step and not final
                if cfg.eval.every_steps > 0 and self.step % cfg.eval.every_steps == 0 and not final:
                    self.evaluate()
                stop = self.preempt.should_stop()
                # no periodic save inside a run of non-finite steps: it could prune the last checkpoint before it
                regular = final or self.counters.nonfinite_in_a_row == 0
                if stop or (regular and self.ckpt.should_save(self.step, stage_boundary=boundary, final=final)):
                    self._save()
                    self._beat(f"the checkpoint of step {self.step}")
                if stop:
                    self.print(f"preemption signal: checkpoint at step {self.step} saved; exiting (rerun the same "
                                "command, or let SLURM requeue the job, to resume)")
                    self.preempt.requeue()
                    preempted = True
                    break
        finally:
            self.loader.close()
            if not preempted:
                self.preempt.close()
            # after a preemption its handlers stay until the process exits: a second signal on the way out (SLURM's
            # SIGTERM after SIGUSR1, a repeated scancel) must not end it with the default action and a failure
        self.hooks.pause("exit")
        extra = {}
        if not preempted:
            results = self.evaluate()
            extra = self.recipe.finish(self, results)
        summary = self._summary(losses, preempted, extra)
        self.logger.close()
        self.run_lock.release()
        return summary

    def _nonfinite_step(self, stage: Stage) -> None:
        """After a step whose gradient was not finite (skipped, every rank alike): a warning line, or, the
        ``train.max_nonfinite_steps``-th in a row, a TrainingError naming the step and the stage."""
        c, limit = self.counters, self.cfg.train.max_nonfinite_steps
        where = f"step {self.step} (stage {stage.index + 1}/{len(self.schedule)})"
        if c.nonfinite_in_a_row < limit:
            self.print(f"{where}: the gradient is not finite (norm {self.backend.grad_norm()}): update skipped, BN "
                       f"statistics restored ({c.nonfinite_in_a_row} in a row, {c.nonfinite_steps} in all; "
                       f"train.max_nonfinite_steps={limit} in a row stop the run)")
            return
        done = latest(self.run_dir)
        kept = (f"the newest checkpoint, {self.ckpt.path(done)}, holds the weights from before them" if done is not None
                else "no checkpoint was saved before them")
        first = self.step - c.nonfinite_in_a_row + 1
        raise TrainingError(f"{where}: the gradient was not finite (NaN or inf) in {c.nonfinite_in_a_row} steps in a "
                            f"row (steps {first}-{self.step}, train.max_nonfinite_steps={limit}); each was skipped, "
                            f"and the run stops here. {kept[0].upper() + kept[1:]}: lower optim.lr_per_256, raise "
                            "optim.warmup_steps or optim.clip_grad_norm, or check the data, then rerun to resume")

    def _collective_failure_message(self, error: BaseException) -> str:
        # gloo's messages open with its source location, NCCL's run to several sentences: the first one, bare
        what = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split())).split(". ")[0][:200]
        done = latest(self.run_dir)
        resume = (f"rerun the same command to resume from {self.ckpt.path(done)}" if done is not None
                  else "no checkpoint was saved yet, a rerun starts over")
        timeout = self.cfg.train.collective_timeout_s
        return (f"rank {self.rank}: a collective operation failed after step {self.step}: {self._who_is_lost()} "
                f"(train.collective_timeout_s={timeout} s; here: {what}); {resume}")

    def _who_is_lost(self) -> str:
        """Which ranks (and hosts) stopped answering, from a roll call through the rendezvous store."""
        timeout = self.cfg.train.collective_timeout_s
        table = {r.get("rank", i): r for i, r in enumerate(self.ckpt.ranks_info())}
        answered = distributed.roll_call(wait_s=min(10.0, max(2.0, timeout / 4)), recent_s=timeout + 60)
        if answered is None:
            master = table.get(0, {}).get("host", "rank 0's host")
            return (f"the rendezvous store on {master} (rank 0) cannot be reached either: that host is lost, or "
                    "this one lost its network")
        lost = sorted(set(range(self.world_size)) - set(answered))
        if not lost:
            return "every rank still answers the roll call, so none died: a collective stalled or failed on its own"
        by_host: dict[str, list[int]] = {}
        for r in lost:
            by_host.setdefault(str(table.get(r, {}).get("host", "?")), []).append(r)
        where = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on host {host}"
                          for host, rs in by_host.items())
        whole = [h for h, rs in by_host.items() if len(rs) == sum(1 for v in table.values() if v.get("host") == h)]
        node = f" (every rank of {', '.join(whole)}: the node is lost)" if whole else ""
        return f"lost {where}{node}: {'it' if len(lost) == 1 else 'they'} died or stopped answering"

    def _backend_line(self) -> str:
        b = self.backend
        what = f"DeepSpeed ZeRO stage {b.zero_stage}" if b.zero_stage is not None else b.kind
        return f"{what}, precision {b.precision}"

    def _log_step(self, stage: Stage, loss: torch.Tensor, lr: float) -> float:
        """Log the steps since the last log line; returns the mean loss across ranks. One collective on the
        control group: the ranks' mean losses, their bad-sample counts (every rank counts its own) and their
        readers' remote-storage counters (retries, bytes, wait seconds, failures, cache hits: totals of all ranks)."""
        stats = self.loader.stats()
        remote = sorted(k for k in stats if k.startswith("remote_"))
        summed = distributed.all_reduce_sum(
            torch.tensor([float(loss), float(stats["bad_samples"]), *(float(stats[k]) for k in remote)],
                         dtype=torch.float64), self.control_group)
        mean_loss = float(summed[0]) / self.world_size
        grad_norm = self.backend.grad_norm()
        values = {"train/loss": mean_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                  "perf/images_per_s": self.throughput.rate, "data/samples_seen": self.samples_seen,
                  "data/bad_samples": int(summed[1]), "data/loader_wait_s": stats["wait_s"],
                  "data/loader_wait_fraction": stats["wait_fraction"], "train/epoch": self.step / self.steps_per_epoch,
                  "train/nonfinite_steps": self.counters.nonfinite_steps}
        values.update({f"data/{k}": float(v) for k, v in zip(remote, summed[2:].tolist())})
        values.update(self._stage_scalars(stage))
        mem = gpu_memory_gb()
        if mem is not None:
            values["perf/gpu_mem_gb"] = mem
        self.logger.scalars(self.step, values)
        self.logger.progress(self.step, stage=f"{stage.index + 1}/{len(self.schedule)}", loss=mean_loss,
                             img_s=round(self.throughput.rate, 1), lr=lr)
        if self.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "loss": mean_loss, "lr": lr, "stage": stage.index,
                                    "image_size": stage.image_size, "grad_norm": grad_norm,
                                    "nonfinite_steps": self.counters.nonfinite_steps,
                                    "images_per_s": self.throughput.rate}) + "\n")
        return mean_loss

    # ------------------------------------------------------------------------------------------ eval

    def eval_image_size(self) -> int:
        at_stage = self.cfg.eval.at_stage_size and self.stage is not None
        return self.stage.image_size if at_stage else self.cfg.data.eval_image_size

    def _eval_loader(self, size: int):
        if size not in self._eval_loaders:
            e = self.cfg.eval
            self._eval_loaders[size] = build_eval_loader(
                self.cfg.data, image_size=size, micro_batch_size=e.micro_batch_size or self.cfg.train.micro_batch_size,
                rank=self.rank, world_size=self.world_size, num_classes=self.num_classes)
        return self._eval_loaders[size]

    @torch.no_grad()
    def _run_eval(self, loader) -> dict:
        """Top-1 / top-5 of the current weights, every sample once across ranks (pipeline.metrics.evaluate_topk,
        which `python -m pipeline.evaluate` runs too)."""
        return evaluate_topk(self.backend.forward, self._beating(loader, f"an evaluation at step {self.step}"),
                             device=self.backend.device, max_batches=self.cfg.eval.max_batches,
                             group=self.control_group)

    def _beating(self, batches: Iterable, what: str) -> Iterator:
        """``batches`` with a watchdog beat per batch."""
        self._beat(f"the start of {what}")
        for i, batch in enumerate(batches, 1):
            self._beat(f"batch {i} of {what}")
            yield batch

    def evaluate(self) -> dict:
        """Raw and EMA weights on the validation data (BN statistics averaged across ranks for it)."""
        self.hooks.pause("eval")
        size = self.eval_image_size()
        loader = self._eval_loader(size)
        was_training = self.model.training
        self.backend.eval()
        t0 = time.perf_counter()
        with self._bn_averaged():
            results = {"raw": self._run_eval(loader)}
            if self.ema is not None:
                with self.ema.swapped():
                    results["ema"] = self._run_eval(loader)
        self.backend.train(was_training)
        self.eval_results = {"step": self.step, "image_size": size, **results}
        self.logger.scalars(self.step, {f"eval/{kind}_{k}": v for kind, r in results.items() for k, v in r.items()
                                        if k != "samples"})
        self.logger.flush()
        self.print(f"eval step {self.step} @{size}px ({results['raw']['samples']} images, "
                    f"{time.perf_counter() - t0:.1f}s): " + ", ".join(
                        f"{kind} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}" for kind, r in results.items()))
        return results

    # ------------------------------------------------------------------------------------------ summary

    def _summary(self, losses: list, preempted: bool, extra: dict) -> dict:
        per_stage = self.accounting.summary()
        summary = {
            "step": self.step, "total_steps": self.total_steps, "preempted": preempted,
            "samples_seen": self.samples_seen, "world_size": self.world_size,
            "backend": self.backend.kind, "zero_stage": self.backend.zero_stage,
            "stages": [{**per_stage.get(s.index, {}), **dataclasses.asdict(s)} for s in self.schedule],
            "eval": self.eval_results, "losses": losses,
            "tensorboard": str(self.run_dir / "tb"), **extra,
        }
        if self.is_main:
            write_json(self.run_dir / ("summary.json" if not preempted else "summary_preempted.json"), summary)
        return summary
