"""Pretraining: ``python -m pipeline.pretrain --config configs/pretrain/xl_in21k.yaml [key=value ...]``.

Started by torchrun, the deepspeed launcher or srun (pipeline.distributed reads whichever set the rank). The
run is the trainer (:mod:`pipeline.trainer`) on the DeepSpeed backend with a freshly initialised model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import torch
from torch import nn

from pipeline import distributed
from pipeline.config import Config, ConfigError, load_config, model_options
from pipeline.data.shards import DataError
from pipeline.engine import build_ds_config
from pipeline.export import ExportError
from pipeline.models import create_model
from pipeline.trainer import Recipe, Trainer


class Pretrain(Recipe):
    """A new model of ``model.name`` for the training data's classes, trained with DeepSpeed."""

    backend = "deepspeed"

    def check(self, cfg: Config) -> None:
        """The DeepSpeed config of every stage's micro-batch on the launch's world size: a global batch that
        does not split into ranks x micro-batches, or ZeRO options that do not fit together, fail here, on every
        rank alike, before any process group or data exists."""
        t, p = cfg.train, cfg.progressive
        world = distributed.detect_env().world_size
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        micros = p.stage_micro_batch if p.enabled else p.stage_micro_batch[-1:]  # one stage: the last entry's
        for micro in sorted(set(micros) or {t.micro_batch_size}):
            build_ds_config(t, cfg.optim, cfg.deepspeed, micro_batch_size=micro, world_size=world,
                            device_type=device_type)

    def build_model(self, trainer: Trainer) -> nn.Module:
        m = trainer.cfg.model
        return create_model(m.name, num_classes=trainer.num_classes, drop_rate=m.drop_rate,
                            drop_path_rate=m.drop_path_rate, **model_options(m))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.pretrain", description="EfficientNetV2 pretraining")
    ap.add_argument("--config", required=True, help="run config, e.g. configs/pretrain/xl_in21k.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.total_steps=1000")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.detect_env().rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary = Trainer(cfg, Pretrain()).train()
    except (ConfigError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.destroy()
    return 0 if summary else 1


if __name__ == "__main__":
    distributed.exit_process(main())
