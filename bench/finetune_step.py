"""Fine-tuning step time: the trainer's step on the accelerate backend against a plain PyTorch loop.

Ours is ``Trainer.train_step`` itself on :class:`pipeline.accel.AccelerateBackend` (accelerate-prepared model and
optimizer, lr written from the step, soft-target loss, no_sync gradient accumulation, the gradient norm, EMA
update of weights and BN statistics), what ``accelerate launch -m pipeline.finetune`` runs; the baseline is
forward + the same loss + backward + the same optimizer step, nothing else. A third variant is ours without
the EMA, to separate the EMA's cost from accelerate's. All get the same batches (fed from memory, so the loader
is not measured), the same optimizer (RMSProp-TF) and seed; the variants alternate step by step so machine
noise hits them alike. Prints the median step time of each and its ratio to the plain loop.

    python bench/finetune_step.py --model efficientnetv2_s --image-size 128 --batch 8 --reps 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class _Batches:
    """Stands in for the training loader: the same few in-memory batches, round robin."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnetv2_s")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()

    from pipeline.accel import AccelerateBackend
    from pipeline.config import load_config
    from pipeline.data.mixing import one_hot_targets
    from pipeline.ema import ModelEMA
    from pipeline.losses import soft_cross_entropy
    from pipeline.metrics import StageAccounting, Throughput
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer
    from pipeline.progressive import Stage
    from pipeline.trainer import Counters, Trainer

    cfg = load_config(None, [f"model.name={args.model}", "optim.name=rmsprop_tf", "optim.lr_per_256=0.0005",
                             f"train.global_batch_size={args.batch * args.accum}",
                             f"train.micro_batch_size={args.batch}", "ema.decay=0.9996"])
    g = torch.Generator().manual_seed(0)
    k, s = args.classes, args.image_size
    batches = []
    for _ in range(4):
        labels = torch.randint(k, (args.batch,), generator=g)
        target = one_hot_targets(labels, k, smoothing=0.1)
        batches.append({"image": torch.randn(args.batch, 3, s, s, generator=g), "target": target})

    # baseline: a plain loop
    torch.manual_seed(0)
    base = create_model(args.model, num_classes=k).train()
    base_opt = build_optimizer(cfg.optim, base, cfg.train.global_batch_size)
    feed = _Batches(batches)

    def base_step():
        for _ in range(args.accum):
            b = next(feed)
            loss = soft_cross_entropy(base(b["image"]), b["target"]) / args.accum
            loss.backward()
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)

    # ours: the real step method on a trainer holding what its __init__ would give it
    torch.manual_seed(0)
    tr = Trainer.__new__(Trainer)
    tr.cfg, tr.world_size, tr.counters, tr._grid_pending = cfg, 1, Counters(), False
    tr.accounting, tr.throughput = StageAccounting(), Throughput()
    tr.accounting.start(0, s)
    tr.backend = AccelerateBackend(cfg.train, cfg.optim).prepare(create_model(args.model, num_classes=k).train(),
                                                                  args.batch)
    tr.ema = ema = ModelEMA(tr.backend.module, cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup)
    tr.loader = _Batches(batches)
    stage = Stage(index=0, start_step=0, end_step=10**9, image_size=s)

    def ours(with_ema: bool, step: int) -> None:
        tr.ema = ema if with_ema else None
        tr.train_step(stage, 1e-3)

    variants = (("plain", base_step), ("ours, no EMA", lambda: ours(False, rep)), ("ours", lambda: ours(True, rep)))
    times = {n: [] for n, _ in variants}
    for rep in range(args.reps + 1):  # the first round warms up all
        for name, fn in variants:
            t0 = time.perf_counter()
            fn()
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    imgs = args.batch * args.accum
    print(f"{args.model} @ {s}px, {imgs} images per step ({args.batch} x {args.accum}), {args.reps} steps each, "
          f"{torch.get_num_threads()} threads")
    for n in times:
        print(f"  {n:<13} median {med[n] * 1000:8.1f} ms/step  {imgs / med[n]:7.2f} images/s  "
              f"ratio to plain {med[n] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
