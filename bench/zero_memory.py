"""Model-state memory per rank under ZeRO 0/1/2/3, measured from the engine's tensors, against the formulas.

Builds our DeepSpeed engine (pipeline.engine) around EfficientNetV2-S with AdamW in fp32 on 2 CPU ranks,
runs one optimizer step (so the Adam moments exist) and a second backward, then, before the second step,
walks every tensor reachable from the module and DeepSpeed's (ZeRO) optimizer, de-duplicates them by
storage and sums the bytes per kind:

    params      the module's weights as this rank holds them (ZeRO-3: its partitions + persistent params)
    master      DeepSpeed's fp32 partition of the weights that the optimizer updates (ZeRO 1-3 keep it
                apart from the module's weights even in fp32 training)
    grads       gradients: partitions, flat buffers and reduction buckets
    optimizer   the optimizer's state (Adam's exp_avg and exp_avg_sq)

The ZeRO paper's formulas for fp32 Adam with N ranks and P parameters: ZeRO-0 16P (4 weights + 4 grads +
8 optimizer); ZeRO-1 divides the optimizer by N; ZeRO-2 the gradients too; ZeRO-3 the weights too.

    python bench/zero_memory.py                      # launches torchrun --nproc_per_node 2 itself
    python bench/zero_memory.py --model efficientnetv2_test --image-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MB = 1024 * 1024


def _walk(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """Collect (path, tensor) for tensors reachable from obj through lists, dicts and DeepSpeed objects."""
    import torch
    from torch import nn

    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        out.append((path, obj))
        if obj.is_leaf and obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            _walk(x, f"{path}[{i}]", out, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _walk(x, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", out, seen, depth + 1)
    elif isinstance(obj, nn.Module):
        return  # the module is walked separately, by parameter name
    elif hasattr(obj, "__dict__") and (type(obj).__module__.startswith(("deepspeed", "torch.optim", "pipeline"))):
        for k, x in vars(obj).items():
            _walk(x, f"{path}.{k}", out, seen, depth + 1)


def _kind(path: str) -> str:
    if "ipg_bucket" in path or "ipg_buffer" in path:
        return "buckets"
    if path.startswith("grad:") or "grad" in path:
        return "grads"
    if "optimizer.state[" in path or path.startswith("opt.state["):
        return "optimizer"
    if any(k in path for k in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                               "opt.optimizer.param_groups")):
        return "master"
    if path.startswith(("param:", "ds_tensor:")) or any(
            k in path for k in ("bit16_groups", "fp16_partitioned_groups", "lp_param_buffer", "persistent_parameters")):
        return "params"
    return "other"


def measure(engine) -> dict:
    """Bytes per kind held by this rank, each storage counted once."""
    out: list = []
    for name, p in engine.module.named_parameters():
        out.append((f"param:{name}", p.data))
        if getattr(p, "ds_tensor", None) is not None:
            out.append((f"ds_tensor:{name}", p.ds_tensor))
        if p.grad is not None:
            out.append((f"grad:{name}", p.grad))
    _walk(engine.optimizer, "opt", out, set())
    totals = {"params": 0, "master": 0, "grads": 0, "optimizer": 0, "buckets": 0, "other": 0}
    storages: dict = {}
    for path, t in out:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        entry = storages.setdefault((t.device, storage.data_ptr()), [storage.nbytes(), set(), path])
        entry[1].add(_kind(path))
    # a storage reached as several kinds counts once, as the first of this order (e.g. gradients that are
    # views into a reduction bucket count as the bucket)
    order = ("buckets", "optimizer", "master", "params", "grads", "other")
    for nbytes, kinds, path in storages.values():
        kind = next(k for k in order if k in kinds)
        totals[kind] += nbytes
        if os.environ.get("ZERO_MEMORY_DEBUG"):
            print(f"{kind:9s} {nbytes / MB:10.3f} MiB {path}", file=sys.stderr)
    return totals


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pipeline.config import OptimConfig, TrainConfig
    from pipeline.engine import Engine
    from pipeline.models import count_params, create_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for stage in args.stages:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=args.num_classes)
        n_params = count_params(model)
        train = TrainConfig(global_batch_size=4 * args.world, micro_batch_size=2, zero_stage=stage,
                            precision="fp32", collective_timeout_s=600)
        engine = Engine.build(model, train, OptimConfig(name="adamw"), json.loads(args.deepspeed))
        x = torch.randn(2, 3, args.image_size, args.image_size)
        y = torch.zeros(2, dtype=torch.long)
        assert engine.grad_accum_steps >= 2
        measured = {}
        first = next(engine.module.parameters())  # the stem: its gradient is computed last in backward
        for step in range(2):
            for i in range(engine.grad_accum_steps):
                hook = None
                if step == 1 and i == engine.grad_accum_steps - 1:
                    # inside the boundary backward: ZeRO-1/2 reduction buckets exist only then
                    def in_backward(grad, engine=engine, measured=measured):  # this step's engine
                        measured["backward"] = measure(engine)
                        return grad
                    hook = first.register_hook(in_backward)
                engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
                if hook is not None:
                    hook.remove()
                if step == 1 and i == 0:
                    # accumulating: gradients of the first micro-batch, not yet reduced
                    measured["accumulating"] = measure(engine)
                if step == 1 and i == engine.grad_accum_steps - 1:
                    # gradients reduced, optimizer state present, before the step
                    measured["boundary"] = measure(engine)
                engine.step()
        totals = [None] * dist.get_world_size()
        dist.all_gather_object(totals, measured)
        rows.append({"stage": stage, "params": n_params, "ranks": totals,
                     "ds_zero_config": engine.config["zero_optimization"]})
        del engine, model
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.barrier()
    # an orderly shutdown: leaving the process group to interpreter exit can abort ("terminate called
    # without an active exception") in a communication thread
    dist.destroy_process_group()


def formula(stage: int, n: int, world: int) -> dict:
    p = 4 * n
    return {
        "params": p if stage < 3 else p / world,
        "grads": p if stage < 2 else p / world,
        "optimizer": 2 * p if stage < 1 else 2 * p / world,
    }


def report(rows: list, world: int, model: str) -> str:
    n = rows[0]["params"]
    lines = [
        f"{model}: {n:,} parameters, AdamW, fp32, {world} ranks. MiB per rank (rank 0), measured from the "
        "engine's tensors; formula values in brackets. Gradients: while accumulating (after the first "
        "micro-batch's backward) / at the boundary (after the last backward's reduction).",
        "",
        "| ZeRO | weights | fp32 master | grads accumulating / boundary | optimizer | reduce buckets in backward "
        "| total at boundary | formula total | bytes / param |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        acc, m, bw = (row["ranks"][0][k] for k in ("accumulating", "boundary", "backward"))
        f = formula(row["stage"], n, world)
        total = sum(m.values()) - m["buckets"]  # model states only: buckets are a column of their own
        ftotal = sum(f.values())
        lines.append(
            f"| {row['stage']} | {m['params'] / MB:.1f} ({f['params'] / MB:.1f}) | {m['master'] / MB:.1f} | "
            f"{acc['grads'] / MB:.1f} / {m['grads'] / MB:.1f} ({f['grads'] / MB:.1f}) | "
            f"{m['optimizer'] / MB:.1f} ({f['optimizer'] / MB:.1f}) | {bw['buckets'] / MB:.1f} | "
            f"{total / MB:.1f} | {ftotal / MB:.1f} | {total / n:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnetv2_s")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--deepspeed", default="{}", help="JSON merged into the DeepSpeed config, as the run "
                        "config's deepspeed: section, e.g. '{\"zero_optimization\": {\"reduce_bucket_size\": 5e8}}'")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world),
               "--master_port", str(29700 + os.getpid() % 200), str(Path(__file__).resolve()), "--worker",
               "--out", str(out), "--model", args.model, "--num-classes", str(args.num_classes),
               "--image-size", str(args.image_size), "--world", str(args.world), "--deepspeed", args.deepspeed,
               "--stages", *map(str, args.stages)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
            return 1
        rows = json.loads(out.read_text())
    print(report(rows, args.world, args.model))
    print(f"\nDeepSpeed zero_optimization: {rows[-1]['ds_zero_config']}")
    return 0


if __name__ == "__main__":
    from pipeline.distributed import exit_process

    exit_process(main())
