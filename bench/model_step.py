"""Training-step time of our EfficientNetV2-S against timm's efficientnetv2_s on the same input (CPU).

One step = forward + cross-entropy + backward + SGD step. Both models get the same batch, thread count,
memory format and regularisation (dropout, drop path); steps alternate ours / timm / ours / ... so machine
noise hits both alike. Prints the median time of each and the ratio ours / timm (goal <= 1.05).

    python bench/model_step.py --sizes 128 224 --batch 8 --reps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build(which: str, channels_last: bool, drop_path: float) -> torch.nn.Module:
    if which == "ours":
        from pipeline.models import create_model
        # timm's efficientnetv2_s uses BN eps 1e-5; the eps does not change the cost, but keep them identical.
        model = create_model("efficientnetv2_s", drop_path_rate=drop_path, bn_eps=1e-5)
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
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10, help="timed steps per model and size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--drop-path", type=float, default=0.2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {w: build(w, args.channels_last, args.drop_path) for w in ("ours", "timm")}
    from pipeline.models import count_params

    n_ours, n_timm = (count_params(models[w]) for w in ("ours", "timm"))
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, drop_path {args.drop_path}; "
          f"params ours {n_ours:,} timm {n_timm:,}")
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (args.batch,))
        steps = {w: step_fn(m, x, y) for w, m in models.items()}
        for _ in range(args.warmup):
            for s in steps.values():
                s()
        times: dict[str, list[float]] = {w: [] for w in steps}
        for i in range(args.reps):
            # Alternate which model goes first so neither always runs on a warmer cache.
            order = ("ours", "timm") if i % 2 == 0 else ("timm", "ours")
            for w in order:
                times[w].append(steps[w]())
        med = {w: statistics.median(t) for w, t in times.items()}
        print(f"{size:>4} px: ours {med['ours'] * 1e3:8.1f} ms  timm {med['timm'] * 1e3:8.1f} ms  "
              f"ratio ours/timm {med['ours'] / med['timm']:.3f}  "
              f"(min {min(times['ours']) * 1e3:.1f} / {min(times['timm']) * 1e3:.1f} ms, {args.reps} reps)")


if __name__ == "__main__":
    main()
