"""Fine-tuning step time: pipeline.finetune's step against a plain PyTorch loop on the same model and batches.

Ours is ``Finetune._train_step`` itself (accelerate-prepared model and optimizer, lr written from the step,
soft-target loss, no_sync gradient accumulation, EMA update of weights and BN statistics); the baseline is
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

    from accelerate import Accelerator

    from pipeline.data.mixing import one_hot_targets
    from pipeline.losses import soft_cross_entropy
    from pipeline.config import load_config
    from pipeline.ema import ModelEMA
    from pipeline.finetune import Finetune
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer

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

    # ours: the real step method on an object holding what _setup would give it
    torch.manual_seed(0)
    ft = Finetune.__new__(Finetune)
    ft.cfg = cfg
    ft.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    model = create_model(args.model, num_classes=k).train()
    ft.model, ft.optimizer = ft.acc.prepare(model, build_optimizer(cfg.optim, model, cfg.train.global_batch_size))
    ft.net = ft.acc.unwrap_model(ft.model)
    ft.ema = ModelEMA(ft.net, cfg.ema.decay, tf_warmup=cfg.ema.tf_warmup)
    ft.accum = args.accum
    ft.lr_fn = lambda step: 1e-3
    ft.loader = _Batches(batches)

    ema = ft.ema

    def ours(with_ema: bool, step: int) -> None:
        ft.ema = ema if with_ema else None
        ft._train_step(step)

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
