"""The pretraining loop: progressive stages, DeepSpeed steps, EMA, evaluation, checkpoints, preemption.

Per optimizer step: the stage comes from the step alone (``schedule.stage_at(step)``); on a change the loader
switches transforms / micro-batch, the model its dropout (and drop-path), the engine its accumulation, and
the stage is logged. Then ``grad_accum_steps`` micro-batches forward / backward, one optimizer step at
``lr_at(step)``, an EMA update. Evaluation every ``eval.every_steps`` and at the end; a checkpoint every
``checkpoint.every_steps``, at every stage boundary, at the end, and when a preemption signal arrives.

Checkpoint contents (``RUN/checkpoints/step-N``): DeepSpeed's model / optimizer shards; per rank
``rank-0000R.pt`` with the RNG states, the loader position, the trainer counters and the EMA (this rank's
shard under ZeRO-3; rank 0's full copy otherwise); ``COMPLETE.json`` last, with the settings hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import distributed
from pipeline.bn import averaged_bn_stats, bn_stats_state, convert_sync_bn, load_bn_stats_state
from pipeline.checkpoint import (CheckpointManager, PreemptionHandler, checkpoints_dir, latest, load_rank_file,
                                 read_marker, step_tag)
from pipeline.config import Config, ConfigError, frozen_settings, load_config, model_options, save_resolved
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.ema import ModelEMA
from pipeline.engine import (Engine, consolidate_fp32_state_dict, convert_to_universal, init_distributed,
                             saved_zero_stage)
from pipeline.export import ExportError, architecture_meta, save_export
from pipeline.losses import soft_cross_entropy
from pipeline.metrics import MetricsLogger, StageAccounting, Throughput, gpu_memory_gb, write_json
from pipeline.models import create_model
from pipeline.optim import lr_schedule
from pipeline.progressive import Stage, StageSchedule, resolve_total_steps

log = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1
RUN_META = "run.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_kwargs(cfg: Config, num_classes: int, dropout: Optional[float]) -> dict:
    return dict(num_classes=num_classes, drop_rate=dropout, drop_path_rate=cfg.model.drop_path_rate,
                **model_options(cfg.model))


class Trainer:
    """Builds everything from a Config; ``train()`` runs to the end or to a preemption and returns a summary."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t, d = cfg.train, cfg.data
        self.run_dir = Path(t.run_dir)
        self.rank, self.world_size = init_distributed(t.collective_timeout_s)
        self.is_main = self.rank == 0
        # first, so that a preemption warning during start-up (loading, conversion) is not fatal
        self.preempt = PreemptionHandler.from_config(cfg.checkpoint, rank=self.rank)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)

        # The loader first: the dataset size decides the epoch length and, with train.epochs, the run length.
        # It starts on a provisional stage; the real one is set before the first batch (_enter_stage).
        provisional = Stage(index=0, start_step=0, end_step=1, image_size=cfg.progressive.min_image_size,
                            randaug=0.0, mixup=0.0, cutmix=0.0, dropout=0.0, drop_path=None, micro_batch_size=None)
        self.loader = build_train_loader(d, stage=provisional, micro_batch_size=t.micro_batch_size,
                                         num_classes=cfg.model.num_classes, label_smoothing=t.label_smoothing,
                                         seed=t.seed, rank=self.rank, world_size=self.world_size)
        self.num_classes = self.loader.num_classes
        self.train_samples = self.loader.dataset_samples
        self.steps_per_epoch = self.train_samples / t.global_batch_size
        self.total_steps = resolve_total_steps(t, self.train_samples)
        default_dropout = cfg.model.drop_rate
        self.schedule = StageSchedule.from_config(cfg.progressive, self.total_steps, default_dropout=default_dropout)
        self.lr_fn = lr_schedule(cfg.optim, global_batch_size=t.global_batch_size, total_steps=self.total_steps,
                                 steps_per_epoch=self.steps_per_epoch)

        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, rank=self.rank, world_size=self.world_size,
                                      settings=frozen_settings(cfg))
        self.resume_point = self.ckpt.resolve_resume()
        self.step = self.resume_point.step if self.resume_point else 0
        stage = self.schedule.stage_at(self.step)

        # The same initial weights on every rank and in every run of this seed; then per-rank streams for
        # dropout / stochastic depth (restored exactly from the checkpoint's RNG states on resume).
        seed_everything(t.seed)
        model = create_model(cfg.model.name, **model_kwargs(cfg, self.num_classes, stage.dropout))
        seed_everything(t.seed * 100_003 + 1 + self.rank)
        if stage.drop_path is not None:
            model.set_regularization(drop_path=stage.drop_path)
        if t.sync_bn and self.world_size > 1:
            model = convert_sync_bn(model, device_type="cuda" if torch.cuda.is_available() else "cpu")
        if cfg.model.compile:
            model.compile()  # in place: state-dict keys stay free of '_orig_mod.'
        # Another world size: ZeRO 1-3 shards must be re-split through a universal checkpoint; a ZeRO-0
        # checkpoint holds whole states and loads on any number of ranks as it is.
        universal = bool(self.resume_point and self.resume_point.needs_universal
                         and saved_zero_stage(self.resume_point.directory, self.resume_point.tag) > 0)
        self._universal = universal
        self.engine = Engine.build(model, t, cfg.optim, cfg.deepspeed, micro_batch_size=self._micro(stage),
                                   load_universal=universal)
        self.model = self.engine.module
        self.ema = (ModelEMA(self.model, cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup,
                             gathered_parameters=self.engine.gathered_parameters) if cfg.ema.enabled else None)
        self.stage: Optional[Stage] = None
        self.samples_seen = 0  # global images consumed by optimizer steps
        self.eval_results: dict = {}
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, total_steps=self.total_steps,
                                    start_step=self.step)
        self.accounting = StageAccounting()
        self.throughput = Throughput()
        self._eval_loaders: dict[int, object] = {}
        if self.resume_point is not None:
            self._resume(self.resume_point)
        if self.is_main:
            # what export needs without the data: classes (with wnids) and the run's image sizes
            write_json(self.run_dir / RUN_META, {"classes": list(self.loader.classes), "num_classes": self.num_classes,
                                                 "total_steps": self.total_steps,
                                                 "train_image_size": self.schedule.stages[-1].image_size,
                                                 "eval_image_size": self.cfg.data.eval_image_size})

    # ------------------------------------------------------------------------------------------ helpers

    def _micro(self, stage: Stage) -> int:
        return stage.micro_batch_size or self.cfg.train.micro_batch_size

    def _print(self, msg: str) -> None:
        if self.is_main:
            self.logger.print(msg)

    # ------------------------------------------------------------------------------------------ resume

    def _resume(self, point) -> None:
        if point.needs_universal and not self._universal:
            self._print(f"resuming from {point.path} (step {point.step}): a {point.saved_world_size}-rank ZeRO-0 "
                        f"checkpoint on {self.world_size} rank(s); its states are whole, so it loads as it is")
        else:
            self._print(point.message)
        if self._universal:
            convert_to_universal(point.directory, point.tag, point.universal_path)
            self.engine.load(point.universal_path.parent, point.universal_path.name)
        else:
            self.engine.load(point.directory, point.tag)
        mine = self.ckpt.load_rank_state(point)  # restores this rank's RNG states (same world size only)
        if mine is None:  # another world size: the per-rank states are re-split below
            states = self.ckpt.load_all_rank_states(point)
        else:  # rank 0's file holds the unsharded EMA; reading only it and ours keeps a resume O(ranks)
            states = [mine if self.rank == 0 else load_rank_file(point.path, 0)]
        trainer_state = states[0]["trainer"]
        if trainer_state.get("version") != TRAINER_STATE_VERSION:
            raise ConfigError(f"{point.path}: trainer state version {trainer_state.get('version')} is not "
                              f"{TRAINER_STATE_VERSION}; resume with the code that wrote it")
        self.step = int(trainer_state["step"])
        self.samples_seen = int(trainer_state["samples_seen"])
        # Loader positions are the same on every rank; after a world-size change the loader continues the
        # epoch with the samples no rank has seen yet.
        self.loader.load_state_dict((mine or states[0])["loader"])
        if self.ema is not None:
            if self.ema.sharded:
                self.ema.load_state_dict(mine["ema"] if mine is not None else [s["ema"] for s in states])
            else:
                self.ema.load_state_dict(states[0]["ema"])
        if mine is not None:
            # The checkpoint's module holds the cross-rank mean of the BN statistics (and rank 0's EMA state
            # their mean EMA); each rank trained on with its own, so it continues with its own. After a
            # world-size change the mean is the only sensible start for every new rank.
            if "bn" in mine and not self.cfg.train.sync_bn:
                load_bn_stats_state(self.model, mine["bn"])
            if self.ema is not None and "ema_buffers" in mine:
                self.ema.load_local_buffers(mine["ema_buffers"])

    def _bn_averaged(self):
        """BN statistics averaged across ranks inside, each rank's own again after (see pipeline.bn)."""
        return contextlib.nullcontext() if self.cfg.train.sync_bn else averaged_bn_stats(self.model)

    def _save(self) -> None:
        """A checkpoint that does not change the run: the model and EMA files get the cross-rank mean of the BN
        statistics (and of their EMA), the rank files each rank's own, which the training goes on with."""
        rank_state = {
            "trainer": {"version": TRAINER_STATE_VERSION, "step": self.step, "samples_seen": self.samples_seen},
            "loader": self.loader.state_dict(),
            "bn": bn_stats_state(self.model),
        }
        if self.ema is not None:
            buffers = self.ema.synced_buffers()  # collective: before any rank-dependent branch
            if self.ema.sharded or self.is_main:
                rank_state["ema"] = self.ema.state_dict(buffers=buffers)
            rank_state["ema_buffers"] = self.ema.local_buffers()
        client = {"step": self.step, "samples_seen": self.samples_seen}
        with self._bn_averaged():
            self.ckpt.save(self.step, lambda d, tag: self.engine.save(d, tag, client), rank_state,
                           extra={"stage": self.schedule.stage_at(max(self.step - 1, 0)).index,
                                  "samples_seen": self.samples_seen})

    # ------------------------------------------------------------------------------------------ stages

    def _enter_stage(self, stage: Stage) -> None:
        mb = self._micro(stage)
        self.model.set_regularization(dropout=stage.dropout, drop_path=stage.drop_path)
        accum = self.engine.set_micro_batch_size(mb)
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
        self._print(line)
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

    def _micro_step(self, batch: dict) -> torch.Tensor:
        dev = self.engine.device
        images = batch["image"].to(dev, non_blocking=True)  # the model makes it channels_last if configured
        targets = batch["target"].to(dev, non_blocking=True)
        loss = soft_cross_entropy(self.engine(images), targets)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def train_step(self, stage: Stage, lr: float) -> torch.Tensor:
        """One optimizer step at ``lr`` (``grad_accum_steps`` micro-batches), the EMA update, the counters;
        returns this rank's mean loss of the step (a device tensor: no host sync)."""
        cfg = self.cfg
        self.engine.set_lr(lr)
        step_loss = torch.zeros((), device=self.engine.device)
        accum = self.engine.grad_accum_steps
        images = 0
        for _ in range(accum):
            batch = next(self.loader)
            if self._grid_pending:
                self.logger.image_grid(self.step, f"train_images/stage{stage.index}", batch["image"],
                                       cfg.data.mean, cfg.data.std)
                self._grid_pending = False
            step_loss += self._micro_step(batch)
            images += batch["image"].shape[0]
        if self.ema is not None and self.step % cfg.ema.every == 0:
            self.ema.update(self.step // cfg.ema.every)
        self.step += 1
        global_images = images * self.world_size
        self.samples_seen += global_images
        self.accounting.step(global_images)
        self.throughput.update(global_images)
        return step_loss / accum

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            self._print(self.schedule.format_table(t.global_batch_size))
            self._print(f"{self.train_samples:,} training samples, {self.num_classes} classes, "
                        f"{self.total_steps:,} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs), "
                        f"{self.world_size} rank(s), ZeRO stage {self.engine.zero_stage}")
        self.engine.train()
        loss_sum = torch.zeros((), device=self.engine.device)
        loss_count = 0
        losses: list[tuple[int, float]] = []
        preempted = False
        while self.step < self.total_steps:
            stage = self.schedule.stage_at(self.step)
            if stage != self.stage:
                self._enter_stage(stage)
            lr = self.lr_fn(self.step)
            loss_sum += self.train_step(stage, lr)
            loss_count += 1

            if self.step % t.log_every == 0 or self.step == self.total_steps:
                # one collective: the ranks' mean losses and their bad-sample counts (every rank counts its own)
                stats = self.loader.stats()
                summed = distributed.all_reduce_sum(
                    torch.stack([(loss_sum / loss_count).double().cpu(), torch.tensor(float(stats["bad_samples"]),
                                                                                      dtype=torch.float64)]))
                mean_loss = float(summed[0]) / self.world_size
                losses.append((self.step, mean_loss))
                self._log_step(stage, mean_loss, lr, stats, bad=int(summed[1]))
                loss_sum.zero_()
                loss_count = 0

            final = self.step == self.total_steps
            boundary = self.step == stage.end_step and not final
            if cfg.eval.every_steps > 0 and self.step % cfg.eval.every_steps == 0 and not final:
                self.evaluate()
            stop = self.preempt.should_stop()
            if stop or self.ckpt.should_save(self.step, stage_boundary=boundary, final=final):
                self._save()
            if stop:
                self._print(f"preemption signal: checkpoint at step {self.step} saved; exiting")
                self.preempt.requeue()
                preempted = True
                break

        if not preempted:
            self.evaluate()
        summary = self._summary(losses, preempted)
        self.logger.close()
        self.loader.close()
        self.preempt.close()
        return summary

    def _log_step(self, stage: Stage, loss: float, lr: float, stats: dict, bad: int) -> None:
        grad_norm = self.engine.grad_norm()
        values = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                  "perf/images_per_s": self.throughput.rate, "data/samples_seen": self.samples_seen,
                  "data/bad_samples": bad, "data/loader_wait_s": stats["wait_s"],
                  "data/loader_wait_fraction": stats["wait_fraction"], "train/epoch": self.step / self.steps_per_epoch}
        values.update(self._stage_scalars(stage))
        mem = gpu_memory_gb()
        if mem is not None:
            values["perf/gpu_mem_gb"] = mem
        self.logger.scalars(self.step, values)
        self.logger.progress(self.step, stage=f"{stage.index + 1}/{len(self.schedule)}", loss=loss,
                             img_s=round(self.throughput.rate, 1), lr=lr)
        if self.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss, "lr": lr, "stage": stage.index,
                                    "image_size": stage.image_size, "grad_norm": grad_norm,
                                    "images_per_s": self.throughput.rate}) + "\n")

    # ------------------------------------------------------------------------------------------ eval

    def _eval_loader(self, size: int):
        if size not in self._eval_loaders:
            e = self.cfg.eval
            self._eval_loaders[size] = build_eval_loader(
                self.cfg.data, image_size=size, micro_batch_size=e.micro_batch_size or self.cfg.train.micro_batch_size,
                rank=self.rank, world_size=self.world_size, num_classes=self.num_classes)
        return self._eval_loaders[size]

    @torch.no_grad()
    def _run_eval(self, loader) -> dict:
        dev = self.engine.device
        totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, precision@1 hits, samples
        max_batches = self.cfg.eval.max_batches
        multi_label = False
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break  # every rank has the same number of batches, so all stop together
            images = batch["image"].to(dev)
            logits = self.engine(images).float().cpu()
            valid = batch["valid"]
            labels = batch["label"]
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            hit = top == labels.unsqueeze(1)
            totals[0] += (hit[:, 0] & valid).sum()
            totals[1] += (hit.any(dim=1) & valid).sum()
            if "labels" in batch:  # multi-label data: the top-1 prediction is one of the image's labels
                multi_label = True
                multi = batch["labels"].bool()
                totals[2] += (multi.gather(1, top[:, :1]).squeeze(1) & valid).sum()
            totals[3] += valid.sum()
        totals = distributed.all_reduce_sum(totals)
        n = max(float(totals[3]), 1.0)
        out = {"top1": 100 * float(totals[0]) / n, "top5": 100 * float(totals[1]) / n, "samples": int(totals[3])}
        if multi_label:
            out["precision_at_1"] = 100 * float(totals[2]) / n
        return out

    def evaluate(self) -> dict:
        size = self.stage.image_size if (self.cfg.eval.at_stage_size and self.stage) else self.cfg.data.eval_image_size
        loader = self._eval_loader(size)
        was_training = self.model.training
        self.engine.eval()
        t0 = time.perf_counter()
        with self._bn_averaged():
            results = {"raw": self._run_eval(loader)}
            if self.ema is not None:
                with self.ema.swapped():
                    results["ema"] = self._run_eval(loader)
        self.engine.train(was_training)
        self.eval_results = {"step": self.step, "image_size": size, **results}
        scalars = {}
        for kind, r in results.items():
            for k, v in r.items():
                if k != "samples":
                    scalars[f"eval/{kind}_{k}"] = v
        self.logger.scalars(self.step, scalars)
        self.logger.flush()
        self._print(f"eval step {self.step} @{size}px ({results['raw']['samples']} images, "
                    f"{time.perf_counter() - t0:.1f}s): " + ", ".join(
                        f"{kind} top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}" for kind, r in results.items()))
        return self.eval_results

    # ------------------------------------------------------------------------------------------ summary

    def _summary(self, losses: list, preempted: bool) -> dict:
        per_stage = self.accounting.summary()
        summary = {
            "step": self.step, "total_steps": self.total_steps, "preempted": preempted,
            "samples_seen": self.samples_seen, "world_size": self.world_size,
            "zero_stage": self.engine.zero_stage,
            "stages": [{**per_stage.get(s.index, {}), **dataclasses.asdict(s)} for s in self.schedule],
            "eval": self.eval_results, "losses": losses,
            "tensorboard": str(self.run_dir / "tb"),
        }
        if self.is_main:
            write_json(self.run_dir / ("summary.json" if not preempted else "summary_preempted.json"), summary)
        return summary


# ---------------------------------------------------------------------------------------------- export


def export_checkpoint(run_dir: str | os.PathLike, *, step: Optional[int] = None, ema: bool = False,
                      out_dir: str | os.PathLike) -> Path:
    """Consolidate checkpoint ``step`` (default: the newest complete one) of a pretraining run into an export
    folder (see pipeline.export): fp32 weights from the ZeRO shards, or the EMA weights (reassembled from the
    per-rank shards under ZeRO-3)."""
    run = Path(run_dir)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise ExportError(f"{run}: no config.yaml; pass the run directory of a pretraining run "
                          "(train.run_dir)")
    cfg = load_config(cfg_file, base=None)
    if step is None:
        step = latest(run)
        if step is None:
            raise ExportError(f"{run}: no complete checkpoint under {checkpoints_dir(run)}")
    ckpt_dir = checkpoints_dir(run)
    tag = step_tag(step)
    marker = read_marker(ckpt_dir / tag)
    if marker is None:
        raise ExportError(f"{ckpt_dir / tag}: missing or incomplete checkpoint (no COMPLETE.json)")
    meta_file = run / RUN_META
    if not meta_file.is_file():
        raise ExportError(f"{run}: no {RUN_META} (written when a run starts); is this a pretraining run folder?")
    run_meta = json.loads(meta_file.read_text())
    num_classes = cfg.model.num_classes or run_meta["num_classes"]
    model = create_model(cfg.model.name, **model_kwargs(cfg, num_classes, None))
    raw = consolidate_fp32_state_dict(ckpt_dir, tag)
    if ema:
        states = [load_rank_file(ckpt_dir / tag, r) for r in range(int(marker.get("world_size", 1)))]
        ema_states = [s["ema"] for s in states if "ema" in s]
        if not ema_states:
            raise ExportError(f"{ckpt_dir / tag}: holds no EMA weights (ema.enabled was false); export without --ema")
        model.load_state_dict(raw, strict=True)  # the EMA reassembles against the model's shapes
        holder = ModelEMA(model, decay=cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup)
        holder.load_state_dict(ema_states if ema_states[0].get("sharded") else ema_states[0])
        state = holder.full_state_dict(rank0_only=False, sync=False)
    else:
        state = raw
    model.load_state_dict(state, strict=True)  # the export must load into create_model as it is
    meta = {
        "architecture": architecture_meta(model),
        "classes": run_meta["classes"],
        "image_size": {"train": run_meta["train_image_size"], "eval": run_meta["eval_image_size"]},
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "source": {"run_dir": str(run.resolve()), "tag": tag, "step": step, "weights": "ema" if ema else "raw"},
    }
    return save_export(state, meta, out_dir)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pipeline.pretrain --config FILE [key=value ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeline.pretrain", description="EfficientNetV2 pretraining")
    ap.add_argument("--config", required=True, help="run config, e.g. configs/pretrain/xl_in21k.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.total_steps=1000")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.detect_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary = Trainer(cfg).train()
    except (ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipeline.data.shards import DataError

        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    distributed.destroy()
    return 0 if summary else 1
