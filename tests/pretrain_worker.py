"""Runs one or more pretraining runs in one process (1 rank, or each rank of a torchrun launch).

Launched by tests/test_pretrain.py: one torchrun launch runs several configurations one after another, which
saves DeepSpeed's start-up per run. After each run, rank 0 writes the logits of the trained model (raw and
EMA, eval mode, BN statistics averaged) on a fixed input, for the export round-trip test.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/pretrain_worker.py SPEC.json

SPEC.json: {"config": "configs/pretrain/tiny_cpu.yaml", "runs": [{"overrides": [...], "probe": "FILE.pt"}, ...]}
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import distributed  # noqa: E402
from pipeline.bn import average_bn_stats  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.pretrain import Pretrain  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402

warnings.filterwarnings("ignore")


def probe_input(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(4, 3, size, size, generator=g) * 2 - 1


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    for run in spec["runs"]:
        cfg = load_config(spec["config"], run["overrides"])
        trainer = Trainer(cfg, Pretrain())
        summary = trainer.train()
        if run.get("probe") and not summary["preempted"]:
            average_bn_stats(trainer.model)
            trainer.backend.eval()
            x = probe_input(cfg.data.eval_image_size)
            dev = trainer.backend.device
            with torch.no_grad():
                raw = trainer.backend(x.to(dev)).float().cpu()
                ema = None
                if trainer.ema is not None:
                    with trainer.ema.swapped():
                        ema = trainer.backend(x.to(dev)).float().cpu()
            if trainer.is_main:
                torch.save({"raw": raw, "ema": ema, "input": x}, run["probe"])
    distributed.destroy()
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
