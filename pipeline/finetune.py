"""Fine-tuning: init weights -> new (seeded) head -> train -> top-1 / top-5 -> export, on accelerate.

    accelerate launch -m pipeline.finetune --config configs/finetune/in1k_xl.yaml init=runs/pretrain_xl/export

The run is the trainer (:mod:`pipeline.trainer`) on the accelerate backend with the :class:`Finetune` recipe:
the model comes from an init (an export, a pretraining run's DeepSpeed checkpoint, or a timm file) with a new
classifier for the target classes, seeded from the pretrained head by wnid where both sides have wnids; at the
end the recipe writes ``metrics.json`` and an export of the fine-tuned weights. The pieces that need no
process group (init resolution, head seeding, class lists) are in :mod:`pipeline.finetune_lib`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from torch import nn

from pipeline import distributed
from pipeline import finetune_lib as fl
from pipeline.checkpoint import step_tag
from pipeline.config import Config, ConfigError, load_config
from pipeline.data.shards import DataError
from pipeline.export import ExportError, architecture_meta, is_export, save_exports, timm_export_dir
from pipeline.metrics import write_json
from pipeline.trainer import Recipe, Trainer

INIT_EXPORT_DIR = "init_export"  # consolidated DeepSpeed init, written once per run
EXPORT_DIR = "export"


class Finetune(Recipe):
    """The model from ``init`` with a new head for the training data's classes, trained with accelerate."""

    backend = "accelerate"

    def check(self, cfg: Config) -> None:
        """Everything about the input that is cheap to know, on every rank alike, so that bad input fails
        before any process group exists: what the init is, the data's classes, the architecture."""
        self.cfg = cfg
        self.init_src = fl.classify_init(cfg.init)
        self.data = fl.describe_train_data(cfg.data)
        self.num_classes = fl.resolve_num_classes(cfg.model.num_classes, self.data.num_classes, self.data.describe)
        fl.check_export_format(cfg.model, cfg.finetune.export_format)
        self.init = None
        if self.init_src.kind != "deepspeed":
            self.init = fl.load_init(self.init_src, weights=cfg.finetune.init_weights,
                                     allow_pickle=cfg.finetune.allow_pickle)
            fl.check_architecture(self.init, cfg.model)

    def build_model(self, trainer: Trainer) -> nn.Module:
        if self.init is None:  # a DeepSpeed checkpoint: consolidated once, by the main process
            out = trainer.run_dir / INIT_EXPORT_DIR
            distributed.on_rank0(lambda: self._consolidate(out, trainer.print))
            self.init = fl.load_init(fl.InitSource("export", out))
            self.init.source = self.init_src  # messages name what the user passed
        return fl.build_model(self.init, self.cfg.model, self.data.classes, head_seed=self.cfg.finetune.head_seed,
                              log=trainer.print)

    def _consolidate(self, out, log) -> None:
        """The DeepSpeed checkpoint as an export under the run dir (kept, so a resume does not redo it)."""
        if is_export(out) and fl.export_is_of(out, self.init_src):
            return
        log(f"init: consolidating {self.init_src.path} into {out}")
        fl.consolidate_deepspeed(self.init_src, out, weights=self.cfg.finetune.init_weights)

    def default_dropout(self, cfg: Config, model: nn.Module) -> Optional[float]:
        return model.drop_rate  # model.drop_rate, else the variant's own

    def finish(self, trainer: Trainer, results: dict) -> dict:
        """metrics.json and the export of the fine-tuned model (the EMA weights unless configured otherwise): in
        RUN_DIR/export (ours) and / or RUN_DIR/export_timm (timm's hub layout), per finetune.export_format."""
        cfg = self.cfg
        use_ema = trainer.ema is not None and cfg.finetune.export_weights == "ema"
        with trainer._bn_averaged():
            state = trainer.ema.full_state_dict() if use_ema else None  # collective: every rank calls it
            if state is None and trainer.is_main:
                state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        split = cfg.data.hf_val_split if cfg.data.hf_dataset and not cfg.data.val else cfg.data.val_split
        metrics = {
            "step": trainer.step, "total_steps": trainer.total_steps, "model": cfg.model.name,
            "num_classes": trainer.num_classes, "data": self.data.describe, "init": str(self.init_src.path),
            "init_kind": self.init_src.kind, "split": split, "image_size": trainer.eval_image_size(),
            "results": results, "exported_weights": "ema" if use_ema else "raw",
        }
        trainer.print(f"step {trainer.step}, {split} split:\n{fl.result_table(results)}")
        if trainer.is_main:
            meta = {"architecture": architecture_meta(trainer.model), "classes": self.data.classes,
                    "image_size": {"train": trainer.schedule.stages[-1].image_size, "eval": cfg.data.eval_image_size},
                    "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                    "eval_crop_threshold": cfg.data.eval_crop_threshold,
                    "source": {"run_dir": str(trainer.run_dir), "tag": step_tag(trainer.step), "step": trainer.step,
                               "weights": metrics["exported_weights"], "finetuned_from": str(self.init_src.path)},
                    "metrics": results}
            fmt, out = cfg.finetune.export_format, trainer.run_dir / EXPORT_DIR
            outs = save_exports(state, meta, timm_export_dir(out) if fmt == "timm" else out, fmt)
            metrics.update({"export" if k == "ours" else "export_timm": str(v) for k, v in outs.items()})
            write_json(trainer.run_dir / "metrics.json", metrics)
            trainer.print(f"metrics: {trainer.run_dir / 'metrics.json'}; export: {', '.join(map(str, outs.values()))}")
        distributed.barrier(trainer.control_group)
        return {"metrics": metrics}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.finetune",
                                 description="Fine-tune an EfficientNetV2 export / checkpoint with accelerate")
    ap.add_argument("--config", required=True, help="run file, e.g. configs/finetune/in1k_s.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. init=runs/pretrain_s/export")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        Trainer(cfg, Finetune()).train()
    except (ConfigError, fl.FinetuneError, DataError, ExportError) as e:
        # One line per job, not one per rank: every rank hits the same input error.
        if distributed.launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    distributed.exit_process(main())
