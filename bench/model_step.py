"""Training-step time of our EfficientNetV2-S against timm's efficientnetv2_s on the same input (CPU), or of
two weight layouts of our model (``--compare weight-layout``).

One step = forward + cross-entropy + backward + SGD step. Both models get the same batch, thread count,
memory format and regularisation (dropout, drop path); steps alternate A / B / A / ... so machine noise hits
both alike. Prints the median time of each and the ratio A / B.

``--compare timm`` (default): ours / timm (goal <= 1.05).

``--compare weight-layout``: what the parameter layout costs when the activations run NHWC. Both are our model
with a channels_last input; 'weights NCHW' is ``create_model(..., channels_last=True)`` as the project ships it
(contiguous parameters, which DeepSpeed needs; the forward converts the input), 'weights NHWC' is the same
model moved to ``memory_format=torch.channels_last`` (timm-style; ZeRO 1-3 would flatten it back). The ratio
> 1 is the cost of keeping the weights contiguous (each conv reorders its weight per call, and each weight
gradient is copied back into the parameter's layout).

    python bench/model_step.py --sizes 128 224 --batch 8 --reps 10
    python bench/model_step.py --compare weight-layout --sizes 128 224 --batch 8 --reps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build(which: str, channels_last: bool, drop_path: float) -> torch.nn.Module:
    """'ours', 'timm' (model converted to channels_last when asked), or for the layout comparison 'weights NCHW'
    (our channels_last option) and 'weights NHWC' (the same, parameters moved to channels_last)."""
    if which in ("ours", "weights NCHW", "weights NHWC"):
        from pipeline.models import create_model
        torch.manual_seed(0)  # the two layout variants start from the same weights
        # timm's efficientnetv2_s uses BN eps 1e-5; the eps does not change the cost, but keep them identical.
        model = create_model("efficientnetv2_s", drop_path_rate=drop_path, bn_eps=1e-5, channels_last=channels_last)
        if which == "weights NHWC":
            model = model.to(memory_format=torch.channels_last)
    else:
        import timm
        model = timm.create_model("efficientnetv2_s", pretrained=False, drop_rate=0.2, drop_path_rate=drop_path)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    return model.train()


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> float:
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=["timm", "weight-layout"], default="timm")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10, help="timed steps per model and size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--channels-last", action="store_true", help="(--compare timm) channels_last models and input")
    p.add_argument("--drop-path", type=float, default=0.2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.compare == "weight-layout":
        names = ("weights NCHW", "weights NHWC")
        channels_last = True  # both run NHWC activations; only the parameters' layout differs
    else:
        names = ("ours", "timm")
        channels_last = args.channels_last
    models = {w: build(w, channels_last, args.drop_path) for w in names}
    from pipeline.models import count_params

    a, b = names
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, "
          f"{'channels_last' if channels_last else 'NCHW'} input, drop_path {args.drop_path}; "
          + ", ".join(f"{w}: {count_params(m):,} params" for w, m in models.items()))
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (args.batch,))
        steps = {w: step_fn(m, x, y) for w, m in models.items()}
        for _ in range(args.warmup):
            for s in steps.values():
                s()
        times: dict[str, list[float]] = {w: [] for w in steps}
        for i in range(args.reps):
            # Alternate which model goes first so neither always runs on a warmer cache.
            for w in (names if i % 2 == 0 else names[::-1]):
                times[w].append(steps[w]())
        med = {w: statistics.median(t) for w, t in times.items()}
        print(f"{size:>4} px: {a} {med[a] * 1e3:8.1f} ms  {b} {med[b] * 1e3:8.1f} ms  "
              f"ratio {a}/{b} {med[a] / med[b]:.3f}  "
              f"(min {min(times[a]) * 1e3:.1f} / {min(times[b]) * 1e3:.1f} ms, {args.reps} reps)")


if __name__ == "__main__":
    main()
