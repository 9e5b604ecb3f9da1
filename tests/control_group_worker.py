"""Which process group the trainer's control-plane collectives use: one rank of a torchrun launch.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/control_group_worker.py CONFIG OUT.json key=value ...

Builds the real Trainer, records every ``torch.distributed.all_reduce`` / ``broadcast`` / ``barrier`` with the
project module that called it, trains to the end, and writes (rank 0) what it saw.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import distributed  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.pretrain import Pretrain  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402

PIPELINE = str(Path(__file__).resolve().parent.parent / "pipeline")


def _caller() -> str:
    """The innermost frame in pipeline/ outside distributed.py: who asked for the collective."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(PIPELINE) and not frame.filename.endswith("distributed.py"):
            return f"{Path(frame.filename).name}:{frame.name}"
    return "elsewhere"


def main() -> int:
    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    calls: list[dict] = []
    trainer: Trainer

    def spy(name, original):
        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            tensor = args[0] if args and torch.is_tensor(args[0]) else None
            calls.append({"op": name, "caller": _caller(),
                          "control": group is not None and group is distributed.control_group(),
                          "device": None if tensor is None else tensor.device.type})
            return original(*args, **kwargs)
        return wrapper

    trainer = Trainer(load_config(config, overrides), Pretrain())
    for name in ("all_reduce", "broadcast", "broadcast_object_list", "barrier"):
        setattr(dist, name, spy(name, getattr(dist, name)))
    control = trainer.control_group
    summary = trainer.train()
    if dist.get_rank() == 0:
        out.write_text(json.dumps({
            "control_is_group": control is not None and control is not dist.group.WORLD,
            "control_backend": dist.get_backend(control) if control is not None else None,
            "steps": summary["step"], "calls": calls}))
    distributed.destroy()
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
