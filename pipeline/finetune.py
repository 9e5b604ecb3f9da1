"""Fine-tuning on accelerate: init weights -> new (seeded) head -> train -> top-1 / top-5 -> export.

    accelerate launch -m pipeline.finetune --config configs/finetune/in1k_xl.yaml init=runs/pretrain_xl/export

The only module that imports accelerate. Everything that does not need it (init resolution, head seeding,
class checks, evaluation) lives in pipeline.finetune_lib; data, stages, optimizer, EMA and checkpoints are
the pretraining components, each given its own config section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline import finetune_lib as fl
from pipeline.config import Config, ConfigError, frozen_settings, load_config, save_resolved, to_dict
from pipeline.losses import soft_cross_entropy
from pipeline.optim import accumulation_steps, set_lr

INIT_EXPORT_DIR = "init_export"  # consolidated DeepSpeed init, written once per run
EXPORT_DIR = "export"


def _user_errors() -> tuple[type, ...]:
    from pipeline.data.shards import DataError
    from pipeline.export import ExportError

    return ConfigError, fl.FinetuneError, DataError, ExportError


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.finetune",
                                 description="Fine-tune an EfficientNetV2 export / checkpoint with accelerate")
    ap.add_argument("--config", required=True, help="run file, e.g. configs/finetune/in1k_s.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. init=runs/pretrain_s/export")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        Finetune(cfg).run()
    except _user_errors() as e:
        # One line per job, not one per rank: every rank hits the same input error.
        if _launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _launch_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate, srun) announced it; no process group needed."""
    from pipeline.distributed import DistributedError, detect_env

    try:
        return detect_env().rank
    except DistributedError:
        return 0


class Finetune:
    """One fine-tuning run; ``run()`` trains (or resumes), evaluates, writes metrics.json and the export."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        fl.check_finetune_config(cfg.finetune)
        self.run_dir = Path(cfg.train.run_dir)
        torch.manual_seed(cfg.train.seed)  # the new head's initialisation is part of the run's seed
        # Cheap checks first, on every rank alike, so that bad input fails before any process group exists.
        self.init_src = fl.classify_init(cfg.init)
        self.data = fl.describe_train_data(cfg.data)
        self.num_classes = fl.resolve_num_classes(cfg.model.num_classes, self.data.num_classes, self.data.describe)
        self.init = (fl.load_init(self.init_src, weights=cfg.finetune.init_weights)
                     if self.init_src.kind != "deepspeed" else None)
        if self.init is not None:
            self.model = fl.build_model(self.init, cfg.model, self.data.classes, head_seed=cfg.finetune.head_seed,
                                        log=self._log_early)

    @staticmethod
    def _log_early(msg: str) -> None:
        if _launch_rank() == 0:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from pipeline.checkpoint import CheckpointManager, PreemptionHandler
        from pipeline.optim import build_optimizer, lr_schedule
        from pipeline.progressive import StageSchedule, resolve_total_steps

        cfg, t = self.cfg, self.cfg.train
        cuda = torch.cuda.is_available()
        if t.precision == "auto":
            precision = "bf16" if cuda else "no"
        elif t.precision == "fp32":
            precision = "no"
        elif t.precision == "bf16":
            precision = "bf16"
        else:
            raise ConfigError(f"train.precision: '{t.precision}' is not supported by fine-tuning; use auto / fp32 / "
                              "bf16 (bf16 autocast with fp32 weights)")
        # Accumulation is done here with no_sync (see _train_step): the count can change with the stage's
        # micro-batch size, which accelerate fixes at construction.
        # cpu=True on a machine without GPUs: accelerate then runs the launched processes as MULTI_CPU on gloo
        # (without it, every process of `accelerate launch --multi_gpu` / torchrun would train alone).
        # model.compile: accelerate compiles the model in prepare() (None leaves `accelerate launch
        # --dynamo_backend` in charge).
        acc = Accelerator(cpu=not cuda, mixed_precision=precision, log_with="tensorboard",
                          dynamo_backend="inductor" if cfg.model.compile else None,
                          project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                              logging_dir=str(self.run_dir)))
        self.acc = acc
        self.rank, self.world = acc.process_index, acc.num_processes

        if self.init is None:  # a DeepSpeed checkpoint: consolidated once, by the main process
            self.init = self._consolidated_init()
            torch.manual_seed(t.seed)
            self.model = fl.build_model(self.init, cfg.model, self.data.classes, head_seed=cfg.finetune.head_seed,
                                        log=self.log)

        self.total_steps = resolve_total_steps(t, self.data.samples)
        self.steps_per_epoch = self.data.samples / t.global_batch_size
        self.schedule = StageSchedule.from_config(cfg.progressive, self.total_steps,
                                                  default_dropout=self.model.drop_rate)
        for stage in self.schedule:
            self._accum_steps(stage)  # fail now, not at a later stage, on a batch that does not divide
        self.lr_fn = lr_schedule(cfg.optim, global_batch_size=t.global_batch_size, total_steps=self.total_steps,
                                 steps_per_epoch=self.steps_per_epoch)

        torch.manual_seed(t.seed + 1 + self.rank)  # dropout / drop-path: a stream per rank
        optimizer = build_optimizer(cfg.optim, self.model, t.global_batch_size)
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        # the plain module: stage changes, EMA, evaluation and export work on it (no DDP / compile wrapper)
        self.net = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.ema = None
        if cfg.ema.enabled:
            from pipeline.ema import ModelEMA

            self.ema = ModelEMA(self.net, cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup)
            acc.register_for_checkpointing(self.ema)  # identical on every rank: the main process saves it

        from pipeline.data.loader import build_train_loader

        self.stage = self.schedule.stage_at(0)
        self.loader = build_train_loader(cfg.data, stage=self.stage, micro_batch_size=self._micro(self.stage),
                                         num_classes=self.num_classes, label_smoothing=t.label_smoothing,
                                         seed=t.seed, rank=self.rank, world_size=self.world)
        self.ckpt = CheckpointManager(cfg.checkpoint, self.run_dir, rank=self.rank, world_size=self.world,
                                      settings=frozen_settings(cfg), barrier=acc.wait_for_everyone)
        self.preempt = PreemptionHandler.from_config(cfg.checkpoint, rank=self.rank)
        self.start_step = self._resume()
        if acc.is_main_process:
            save_resolved(cfg, self.run_dir)
        acc.init_trackers("tb", config=fl.flat_hparams(to_dict(cfg)))

    def _micro(self, stage) -> int:
        return stage.micro_batch_size or self.cfg.train.micro_batch_size

    def _accum_steps(self, stage) -> int:
        return accumulation_steps(self.cfg.train.global_batch_size, self._micro(stage), self.world)

    def _consolidated_init(self) -> fl.InitWeights:
        """The main process turns the DeepSpeed checkpoint into an export under the run dir (kept, so a resume
        does not redo it); the others wait, then every process loads that export."""
        from accelerate.utils import broadcast_object_list

        from pipeline.export import is_export

        out = self.run_dir / INIT_EXPORT_DIR
        error = None
        if self.acc.is_main_process and not (is_export(out) and fl.export_is_of(out, self.init_src)):
            self.log(f"init: consolidating {self.init_src.path} into {out}")
            try:
                fl.consolidate_deepspeed(self.init_src, out, weights=self.cfg.finetune.init_weights)
            except fl.FinetuneError as e:
                error = str(e)
        box = broadcast_object_list([error]) if self.world > 1 else [error]
        if box[0] is not None:
            raise fl.FinetuneError(box[0])
        init = fl.load_init(fl.InitSource("export", out))
        init.source = self.init_src  # messages name what the user passed
        return init

    def _resume(self) -> int:
        point = self.ckpt.resolve_resume()
        if point is None:
            return 0
        self.acc.load_state(str(point.path))
        state = self.ckpt.load_rank_state(point)
        if state is None:  # another world size: any rank's loader state continues the epoch without repeats
            state = self.ckpt.load_all_rank_states(point)[0]
        self.loader.load_state_dict(state["loader"])
        if self.ema is not None and "ema_buffers" in state and not point.needs_universal:
            # accelerate restored the main process's EMA on every rank; the EMA of the BN statistics differs
            # per rank (each updates its statistics from its own batches after DDP's broadcast), so each rank
            # continues with its own, as the uninterrupted run does
            self.ema.load_local_buffers(state["ema_buffers"])
        self.log(point.message)
        return point.step

    def log(self, msg: str) -> None:
        if self.acc.is_main_process:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    # ------------------------------------------------------------------------------------------------ loop

    def run(self) -> dict:
        self._setup()
        acc, cfg = self.acc, self.cfg
        from tqdm.auto import tqdm

        self.log(f"fine-tuning {cfg.model.name} on {self.data.describe}: {self.num_classes} classes, "
                 f"{self.total_steps} steps x {cfg.train.global_batch_size} images, {self.world} process(es), "
                 f"precision {acc.mixed_precision}, run dir {self.run_dir}")
        self.log(self.schedule.format_table(cfg.train.global_batch_size))
        bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                   disable=not acc.is_main_process, mininterval=1.0)
        if self.start_step >= self.total_steps:
            self.log(f"the run is complete (step {self.start_step}): evaluating and exporting it again")
        self._enter_stage(self.schedule.stage_at(self.start_step), self.start_step, force=True)
        t0, done, stopped = time.perf_counter(), self.start_step, False
        try:
            for step in range(self.start_step, self.total_steps):
                stage = self.schedule.stage_at(step)
                if stage.index != self.stage.index:
                    self._enter_stage(stage, step)
                loss, lr = self._train_step(step)
                done = step + 1
                if done % cfg.train.log_every == 0 or done == self.total_steps:
                    loss = acc.reduce(loss.detach(), "mean").item()
                    ips = (done - self.start_step) * cfg.train.global_batch_size / (time.perf_counter() - t0)
                    acc.log({"train/loss": loss, "train/lr": lr, "train/images_per_s": ips,
                             "data/samples_seen": self.loader.samples_seen * self.world,
                             "stage/image_size": self.stage.image_size}, step=done)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}", refresh=False)
                    self._log_line({"step": done, "loss": loss, "lr": lr, "stage": self.stage.index,
                                    "image_size": self.stage.image_size, "images_per_s": ips})
                bar.update(1)
                if cfg.eval.every_steps > 0 and done % cfg.eval.every_steps == 0 and done < self.total_steps:
                    self._log_eval(self._evaluate(), done)
                stopped = self.preempt.should_stop()
                if stopped or self.ckpt.should_save(done, stage_boundary=self._at_boundary(done),
                                                     final=done == self.total_steps):
                    self._save(done)
                if stopped:
                    break
        finally:
            bar.close()
            self.loader.close()
        if stopped:
            self.log(f"preempted: checkpoint at step {done} saved; rerun the same command to resume")
            self.preempt.requeue()
            self.preempt.close()
            acc.end_training()
            return {}
        self.preempt.close()
        results = self._evaluate()
        self._log_eval(results, done)
        metrics = self._finish(results, done)
        acc.end_training()
        return metrics

    def _log_line(self, record: dict) -> None:
        """One line of RUN_DIR/train_log.jsonl (as the pretraining trainer writes it): a resumed run appends
        the steps after its checkpoint again, so the last line of a step is the one that counts."""
        if self.acc.is_main_process:
            with open(self.run_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _enter_stage(self, stage, step: int, force: bool = False) -> None:
        """Apply a stage: its dropout / drop-path on the model and its transforms / micro-batch in the loader."""
        if force or stage.index != self.stage.index:
            self.stage = stage
            self.accum = self._accum_steps(stage)
            self.net.set_regularization(dropout=stage.dropout, drop_path=stage.drop_path)
            self.loader.set_stage(stage, micro_batch_size=self._micro(stage))
            self.log(f"stage {stage.index}: {stage.image_size}px, RandAugment {stage.randaug:g}, mixup "
                     f"{stage.mixup:g}, cutmix {stage.cutmix:g}, dropout {stage.dropout:g}, "
                     f"{self._micro(stage)} x {self.world} x {self.accum} images per step")
            self.acc.log({"stage/index": stage.index, "stage/image_size": stage.image_size,
                          "stage/randaug": stage.randaug, "stage/mixup": stage.mixup, "stage/cutmix": stage.cutmix,
                          "stage/dropout": stage.dropout}, step=step)

    def _at_boundary(self, done: int) -> bool:
        return done < self.total_steps and self.schedule.stage_at(done).index != self.stage.index

    def _train_step(self, step: int) -> tuple[torch.Tensor, float]:
        acc = self.acc
        lr = self.lr_fn(step)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), device=acc.device)
        for i in range(self.accum):
            batch = next(self.loader)
            x = batch["image"].to(acc.device, non_blocking=True)
            y = batch["target"].to(acc.device, non_blocking=True)
            # gradients are all-reduced only on the last micro-batch of the step
            sync = contextlib.nullcontext() if i == self.accum - 1 else acc.no_sync(self.model)
            with sync:
                loss = soft_cross_entropy(self.model(x), y)
                acc.backward(loss / self.accum)
            total += loss.detach() / self.accum
        if self.cfg.optim.clip_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and (step + 1) % self.cfg.ema.every == 0:
            self.ema.update(step)
        return total, lr

    def _save(self, step: int) -> None:
        rank_state = {"loader": self.loader.state_dict()}
        if self.ema is not None:
            rank_state["ema_buffers"] = self.ema.local_buffers()
        path = self.ckpt.save(step, lambda d, tag: self.acc.save_state(str(Path(d) / tag)), rank_state)
        self.log(f"checkpoint {path}")

    # ------------------------------------------------------------------------------------------------ results

    def _evaluate(self) -> dict[str, dict[str, float]]:
        from pipeline.data.loader import build_eval_loader

        cfg, acc = self.cfg, self.acc
        micro = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        size = self.stage.image_size if cfg.eval.at_stage_size else cfg.data.eval_image_size
        loader = build_eval_loader(cfg.data, image_size=size, micro_batch_size=micro, rank=self.rank,
                                   world_size=self.world, num_classes=self.num_classes)
        if cfg.eval.max_batches > 0:
            loader = _Limited(loader, cfg.eval.max_batches)

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            return acc.reduce(t, "sum") if self.world > 1 else t

        results = {"raw": fl.evaluate(self.net, loader, acc.device, reduce_sum, acc.autocast)}
        if self.ema is not None:
            with self.ema.swapped():
                results["ema"] = fl.evaluate(self.net, loader, acc.device, reduce_sum, acc.autocast)
        return results

    def _log_eval(self, results: dict, step: int) -> None:
        self.acc.log({f"eval/{w}_{k}": v for w, r in results.items() for k, v in r.items() if k != "images"},
                     step=step)
        split = self.cfg.data.hf_val_split if self.cfg.data.hf_dataset and not self.cfg.data.val \
            else self.cfg.data.val_split
        self.log(f"step {step}, {split} split:\n{fl.result_table(results)}")

    def _finish(self, results: dict, step: int) -> dict:
        """metrics.json, the export of the fine-tuned model (the EMA weights unless configured otherwise)."""
        from pipeline.checkpoint import step_tag
        from pipeline.export import architecture_meta, save_export
        from pipeline.metrics import write_json

        cfg, acc = self.cfg, self.acc
        use_ema = self.ema is not None and cfg.finetune.export_weights == "ema"
        state = self.ema.full_state_dict() if use_ema else None  # collective: every rank calls it
        metrics = {
            "step": step, "total_steps": self.total_steps, "model": cfg.model.name, "num_classes": self.num_classes,
            "data": self.data.describe, "init": str(self.init_src.path), "init_kind": self.init_src.kind,
            "split": cfg.data.hf_val_split if cfg.data.hf_dataset and not cfg.data.val else cfg.data.val_split,
            "image_size": self.stage.image_size if cfg.eval.at_stage_size else cfg.data.eval_image_size,
            "results": results, "exported_weights": "ema" if use_ema else "raw",
        }
        if acc.is_main_process:
            if state is None:
                state = self.net.state_dict()
            meta = {"architecture": architecture_meta(self.net), "classes": self.data.classes,
                    "image_size": {"train": self.stage.image_size, "eval": cfg.data.eval_image_size},
                    "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                    "source": {"run_dir": str(self.run_dir), "tag": step_tag(step), "step": step,
                               "weights": metrics["exported_weights"], "finetuned_from": str(self.init_src.path)},
                    "metrics": results}
            out = save_export(state, meta, self.run_dir / EXPORT_DIR)
            metrics["export"] = str(out)
            write_json(self.run_dir / "metrics.json", metrics)
            self.log(f"metrics: {self.run_dir / 'metrics.json'}; export: {out}")
        acc.wait_for_everyone()
        return metrics


class _Limited:
    """The first ``n`` batches of an eval loader (eval.max_batches); the same count on every rank."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch


if __name__ == "__main__":
    from pipeline.distributed import exit_process

    exit_process(main())
