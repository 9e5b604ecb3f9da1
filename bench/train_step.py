"""Pretraining-step images/s on CPU: our DeepSpeed step against timm's efficientnetv2_s in a plain PyTorch loop.

One step, for every variant, on the same in-memory batch (the loader is not measured), same thread count:

    ours        create_model('efficientnetv2_s') inside pipeline.engine.Engine (DeepSpeed ZeRO-2, one rank, fp32,
                RMSpropTF from pipeline.optim), as the trainer runs it: set_lr, forward, soft-target
                cross-entropy (pipeline.losses.soft_cross_entropy), engine.backward, engine.step, then the
                EMA update (pipeline.ema.ModelEMA, weights and BN statistics)
    ours-plain  our model in a plain loop: forward, the same loss, backward, the same optimizer, our EMA.
                Separates what DeepSpeed costs (ours / ours-plain) from what the model costs (ours-plain / timm)
    timm        timm.create_model('efficientnetv2_s') in a plain loop: the same loss, the same optimizer class
                and parameter groups, timm's ModelEmaV3

Same regularisation everywhere (dropout 0.2, drop path 0.2), BN eps 1e-5 (timm's), 1000 classes, soft targets
with label smoothing 0.1. Steps are interleaved in a rotating order so machine noise hits every variant alike;
the median step time of each is reported (wall clock, split into its phases: forward + loss, backward,
optimizer step, EMA; and the process CPU time, the stable measure on a shared machine), and the ratio
ours / timm (the issue asks for the figure; our goal is <= 1.05).

    python bench/train_step.py                                  # S at 128 px, batch 16, 8 steps each
    python bench/train_step.py --batch 8 --reps 6 --profile     # + torch.profiler top ops of each variant
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

PHASES = ("forward", "backward", "step", "ema")


class Variant:
    """A training step split into timed phases; ``run(step)`` returns the seconds of each phase."""

    def __init__(self, name: str, forward, backward, step, ema):
        self.name = name
        self._fns = (forward, backward, step, ema)

    def run(self, step: int) -> dict[str, float]:
        """Wall seconds per phase, and the process CPU seconds of the whole step under 'cpu'."""
        out = {}
        state = {"step": step}
        c0 = time.process_time()
        for phase, fn in zip(PHASES, self._fns):
            t0 = time.perf_counter()
            fn(state)
            out[phase] = time.perf_counter() - t0
        out["cpu"] = time.process_time() - c0
        return out


def build_variants(args, images: torch.Tensor, targets: torch.Tensor) -> list[Variant]:
    import timm
    from timm.utils import ModelEmaV3

    from pipeline.config import OptimConfig, TrainConfig
    from pipeline.ema import ModelEMA
    from pipeline.engine import Engine
    from pipeline.losses import soft_cross_entropy
    from pipeline.models import create_model
    from pipeline.optim import build_optimizer, lr_schedule, set_lr

    batch = images.shape[0]
    optim_cfg = OptimConfig(name="rmsprop_tf", lr_per_256=0.016, weight_decay=1e-5, warmup_steps=5)
    train_cfg = TrainConfig(global_batch_size=batch, micro_batch_size=batch, zero_stage=args.zero_stage,
                            precision="fp32", collective_timeout_s=600)
    lr_fn = lr_schedule(optim_cfg, global_batch_size=batch, total_steps=1000, steps_per_epoch=100.0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = images.contiguous(memory_format=fmt)

    def ours_model():
        # as the trainer builds it: channels_last is the model's option (NHWC activations, contiguous
        # parameters, which the DeepSpeed engine needs), not a layout of the parameters
        torch.manual_seed(0)
        return create_model("efficientnetv2_s", num_classes=1000, drop_rate=0.2, drop_path_rate=0.2,
                            bn_eps=1e-5, channels_last=args.channels_last).train()

    variants = []
    if "ours" in args.variants:
        engine = Engine.build(ours_model(), train_cfg, optim_cfg)
        ema = ModelEMA(engine.module, decay=0.9999, gathered_parameters=engine.gathered_parameters)
        box = {}

        def fwd(s):
            engine.set_lr(lr_fn(s["step"]))
            box["loss"] = soft_cross_entropy(engine(x), targets)

        variants.append(Variant("ours", fwd, lambda s: engine.backward(box["loss"]), lambda s: engine.step(),
                                lambda s: ema.update(s["step"])))

    def plain(name, model, make_ema, ema_update):
        opt = build_optimizer(optim_cfg, model, batch)  # our param groups: no weight decay on BN / biases
        ema = make_ema(model)
        box = {}

        def fwd(s):
            set_lr(opt, lr_fn(s["step"]))
            box["loss"] = soft_cross_entropy(model(x), targets)

        def bwd(s):
            opt.zero_grad(set_to_none=True)
            box["loss"].backward()

        return Variant(name, fwd, bwd, lambda s: opt.step(), lambda s: ema_update(ema, model, s["step"]))

    if "ours-plain" in args.variants:
        variants.append(plain("ours-plain", ours_model(), lambda m: ModelEMA(m, decay=0.9999),
                              lambda e, m, step: e.update(step)))
    if "timm" in args.variants:
        torch.manual_seed(0)
        tm = timm.create_model("efficientnetv2_s", pretrained=False, num_classes=1000, drop_rate=0.2,
                               drop_path_rate=0.2).to(memory_format=fmt).train()
        variants.append(plain("timm", tm, lambda m: ModelEmaV3(m, decay=0.9999),
                              lambda e, m, step: e.update(m, step)))
    return variants


def profile(variants: list[Variant], steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for v in variants:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                v.run(10_000 + i)
        print(f"\n--- torch.profiler, {v.name}, {steps} steps, top {top} ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=8, help="timed steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: on a shared, oversubscribed machine two OpenMP threads spend "
                        "most of their time waiting for each other, and the figures become noise)")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="NHWC activations and input: our model's "
                   "channels_last option, timm's model moved to channels_last (default NCHW: faster on this CPU; "
                   "the GPU bench uses channels_last)")
    p.add_argument("--variants", nargs="+", default=["ours", "ours-plain", "timm"],
                   choices=["ours", "ours-plain", "timm"])
    p.add_argument("--profile", action="store_true", help="after timing, profile a few steps of each variant")
    p.add_argument("--profile-steps", type=int, default=2)
    args = p.parse_args(argv)

    from pipeline.data.mixing import one_hot_targets

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, s = args.batch, args.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    labels = torch.randint(1000, (b,), generator=g)
    targets = one_hot_targets(labels, 1000, smoothing=0.1)

    variants = build_variants(args, images, targets)
    torch.set_num_threads(args.threads)  # in case a library changed it while building
    print(f"EfficientNetV2-S train step @ {s}px, batch {b}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {'channels_last' if args.channels_last else 'NCHW'}, ZeRO-{args.zero_stage} "
          f"(1 rank, fp32) for ours; {args.reps} timed steps each after {args.warmup} warm-up, interleaved")

    times: dict[str, list[dict]] = {v.name: [] for v in variants}
    step = 0
    for rep in range(args.warmup + args.reps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate who goes first
            t = v.run(step)
            if rep >= args.warmup:
                times[v.name].append(t)
        step += 1

    wall, cpu = {}, {}
    print(f"{'variant':<11} {'step ms':>9} {'images/s':>9} {'CPU ms':>9}   " + "  ".join(f"{ph:>9}" for ph in PHASES)
          + "   (medians; phases in wall ms)")
    for name, rows in times.items():
        wall[name] = statistics.median(sum(r[ph] for ph in PHASES) for r in rows)
        cpu[name] = statistics.median(r["cpu"] for r in rows)
        phases = "  ".join(f"{statistics.median(r[ph] for r in rows) * 1e3:9.1f}" for ph in PHASES)
        print(f"{name:<11} {wall[name] * 1e3:9.1f} {b / wall[name]:9.2f} {cpu[name] * 1e3:9.1f}   {phases}")
    pairs = (("ours", "timm", "ours against timm"), ("ours", "ours-plain", "what the DeepSpeed engine adds"),
             ("ours-plain", "timm", "our model + EMA against timm's"))
    for a, c, what in pairs:
        if a in wall and c in wall:
            print(f"ratio {a}/{c} step time ({what}; > 1 = {a} slower): wall {wall[a] / wall[c]:.3f}  "
                  f"CPU {cpu[a] / cpu[c]:.3f}")
    if args.profile:
        profile(variants, args.profile_steps, top=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
