"""GPU training throughput: our EfficientNetV2 S / L / XL against timm's, at every progressive-stage image size.

One GPU, a plain PyTorch loop (no DeepSpeed: the GPU machines this runs on may not have it, and one GPU has
nothing to shard): bf16 autocast, channels_last, forward + soft-target cross-entropy + backward + our RMSpropTF
(pipeline.optim) step, synthetic data. Our model (pipeline.models.create_model) and timm's
``efficientnetv2_{s,l,xl}`` get the same batch, optimizer and regularisation; eager and torch.compile.

channels_last means NHWC activations (a channels_last input) for every implementation; the parameters'
layout differs. ``ours`` is the model as the project trains it: ``create_model(..., channels_last=True)``
keeps its parameters contiguous (DeepSpeed broadcasts parameters as byte views, which NHWC weights refuse,
and ZeRO 1-3 flatten them anyway) and cuDNN runs NHWC because the input is. ``ours-nhwc-weights`` is the same
model with its parameters moved to channels_last too, as timm users do (``timm`` here): the ratio
ours / ours-nhwc-weights is what the contiguous weights cost on a GPU (eager, ``--layout-models``).

Image sizes: the stages of the paper preset (pipeline.progressive.model_presets + StageSchedule), e.g. S
128 / 185 / 242 / 300, L and XL 128 / 212 / 296 / 380. Batch per case: the batch of the reference's RTX 3090
anchor (S 128 @ 300, L 32 @ 384, XL 16 @ 384; reference section 6) scaled by (anchor size / size)^2 for the
same activation memory, rounded down to a multiple of 8, at most 256, times ``--batch-scale``. At the anchor
sizes this is the anchor's own batch, so the figures compare directly with the anchor's images/s.

Every group of cases (model x implementation x compile) runs in its own subprocess with a deadline, and every
case inside it has its own alarm, so one slow compile or a hang cannot eat the whole budget; a case that
times out or runs out of memory is recorded as such and the rest go on. Results: ``OUT/gpu_bench.json`` and a
markdown table ``OUT/gpu_bench.md`` (images/s, ms per step, peak memory, ours / timm).

    bash bench/gpu.sh                                     # the whole plan, ~6-8 minutes on one H100 / H200
    python bench/gpu_bench.py --dry-run                   # print the plan (cases, batches), run nothing
    python bench/gpu_bench.py --device cpu --models test --sizes 32 48 --reps 2 --warmup 1 --out /tmp/gb
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Reference section 6: timm on an RTX 3090, AMP, channels_last, synthetic data, training images/s.
ANCHOR = {"s": (300, 128, 488.0), "m": (384, 48, 173.0), "l": (384, 32, 97.6), "xl": (384, 16, 62.2)}
MODEL_NAMES = {"s": "efficientnetv2_s", "m": "efficientnetv2_m", "l": "efficientnetv2_l", "xl": "efficientnetv2_xl",
               "test": "efficientnetv2_test"}
MAX_BATCH = 256
IMPLS = ("ours", "timm", "ours-nhwc-weights")


# ------------------------------------------------------------------------------------------------- the plan


def stage_sizes(variant: str) -> list[int]:
    """Image sizes of the paper preset's stages for a variant (the tiny test model: 32 / 48 / 64)."""
    from pipeline.config import ProgressiveConfig
    from pipeline.progressive import StageSchedule, model_presets

    if variant == "test":
        return [32, 48, 64]
    cfg = ProgressiveConfig(**model_presets(variant, "paper"))
    schedule = StageSchedule.from_config(cfg, total_steps=cfg.num_stages)
    return [s.image_size for s in schedule]


def batch_for(variant: str, size: int, scale: float) -> int:
    base_size, base_batch, _ = ANCHOR.get(variant, (64, 32, 0.0))
    b = base_batch * (base_size / size) ** 2
    b = min(MAX_BATCH, max(8, int(b) // 8 * 8))
    return max(1, int(b * scale))


def build_plan(args) -> list[dict]:
    """Groups of cases: eager ours / timm first (cheap, always wanted), then the eager weight-layout variant
    (--layout-models, first and last stage size), then compiled ones in --compile-models order."""
    groups = []

    def add(v: str, impl: str, compiled: bool, ends: bool = False) -> None:
        sizes = args.sizes or stage_sizes(v)
        if not args.sizes and (ends or (compiled and args.compile_sizes == "ends")):
            sizes = [sizes[0], sizes[-1]]
        cases = [{"model": v, "impl": impl, "compile": compiled, "size": s,
                  "batch": args.batch or batch_for(v, s, args.batch_scale)} for s in sizes]
        timeout = args.compile_timeout if compiled else args.case_timeout
        groups.append({"name": f"{v}-{impl}-{'compile' if compiled else 'eager'}", "cases": cases,
                       "case_timeout": timeout})

    main_impls = [i for i in args.impls if i != "ours-nhwc-weights"]
    for v in args.models:
        for impl in main_impls:
            add(v, impl, False)
    if "ours-nhwc-weights" in args.impls:
        for v in args.layout_models:
            add(v, "ours-nhwc-weights", False, ends=True)  # the first and last stage size
    if args.compile:
        for v in args.compile_models:
            for impl in main_impls:
                add(v, impl, True)
    return groups


# ------------------------------------------------------------------------------------------------- a case


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def build_model(case: dict, num_classes: int, dev):
    """The case's model on ``dev``, NHWC activations: ours as the trainer builds it (contiguous parameters),
    ours-nhwc-weights and timm with their parameters moved to channels_last as well."""
    import torch

    name = MODEL_NAMES[case["model"]]
    if case["impl"] in ("ours", "ours-nhwc-weights"):
        from pipeline.models import create_model

        # BN eps 1e-5 like timm's efficientnetv2_*: no effect on speed, but the two models stay identical
        model = create_model(name, num_classes=num_classes, drop_rate=0.2, drop_path_rate=0.2, bn_eps=1e-5,
                             channels_last=True)
        if case["impl"] == "ours":
            return model.to(dev)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=0.2,
                                  drop_path_rate=0.2)
    return model.to(dev, memory_format=torch.channels_last)


def run_case(case: dict, args) -> dict:
    import torch

    from pipeline.config import OptimConfig
    from pipeline.losses import soft_cross_entropy
    from pipeline.models import count_params
    from pipeline.optim import build_optimizer

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = build_model(case, args.num_classes, dev).train()
    params = count_params(model)
    opt = build_optimizer(OptimConfig(name="rmsprop_tf", lr_per_256=0.016), model, case["batch"])
    step_model = torch.compile(model, dynamic=False) if case["compile"] else model
    b, s = case["batch"], case["size"]
    x = torch.randn(b, 3, s, s, device=dev).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(args.num_classes, (b,), device=dev)
    targets = torch.nn.functional.one_hot(labels, args.num_classes).float()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with amp:
            logits = step_model(x)
        loss = soft_cross_entropy(logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0  # includes the compile, cuDNN autotuning, allocator growth
    for _ in range(args.warmup - 1):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - t0) / args.reps
    out = dict(case, status="ok", images_per_s=b / seconds, ms_per_step=seconds * 1e3, first_step_s=first,
               params=params, loss=float(loss.detach()))
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def worker(args) -> int:
    """Runs one group's cases in order, appending one JSON line per case to --results."""
    import torch

    group = json.loads(args.group)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU; use --device cpu for a dry run of the logic")
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels (both impls)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    signal.signal(signal.SIGALRM, _alarm)
    for case in group["cases"]:
        signal.alarm(int(group["case_timeout"]))
        try:
            res = run_case(case, args)
        except Exception as e:  # one broken case must not stop the others
            if _caused_by(e, CaseTimeout):  # torch.compile wraps exceptions raised inside it
                res = dict(case, status=f"timeout ({group['case_timeout']}s)")
            elif _caused_by(e, torch.OutOfMemoryError):
                res = dict(case, status="out of memory")
            else:
                first = str(e).splitlines()[0][:200] if str(e) else ""
                res = dict(case, status=f"error: {type(e).__name__}: {first}")
        finally:
            signal.alarm(0)
        with open(args.results, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(_case_line(res), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if case["compile"]:
            torch._dynamo.reset()  # drop the compiled graphs of this size before the next one
    return 0


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _case_line(r: dict) -> str:
    mode = "compile" if r["compile"] else "eager"
    head = f"{r['model']:>4} {r['impl']:<17} {mode:<7} {r['size']:>4}px bs {r['batch']:>3}"
    if r["status"] != "ok":
        return f"{head}: {r['status']}"
    mem = f", peak {r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else ""
    return (f"{head}: {r['images_per_s']:9.1f} images/s ({r['ms_per_step']:.1f} ms/step, first step "
            f"{r['first_step_s']:.1f}s{mem})")


# ------------------------------------------------------------------------------------------------- driver


def run_plan(args, groups: list[dict], results: list[dict]) -> None:
    """Runs the groups, appending every case's result to ``results`` as it is known (so an interrupted plan
    still leaves what it measured)."""
    out = Path(args.out)
    results_file = out / "gpu_bench.jsonl"
    results_file.unlink(missing_ok=True)
    deadline = time.monotonic() + args.budget
    for g in groups:
        left = deadline - time.monotonic()
        want = g["case_timeout"] * len(g["cases"]) + 30  # + process start and imports
        if left < min(want, g["case_timeout"] + 30):
            results += [dict(c, status="skipped (time budget)") for c in g["cases"]]
            print(f"== {g['name']}: skipped, {left:.0f}s of the budget left", flush=True)
            continue
        print(f"== {g['name']}: {len(g['cases'])} case(s), deadline {min(want, left):.0f}s", flush=True)
        before = _read_lines(results_file)
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--worker", "--group", json.dumps(g),
               "--results", str(results_file), "--device", args.device, "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--num-classes", str(args.num_classes), "--precision", args.precision]
        # own process group: a timeout also ends inductor's compile workers
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        try:
            rc = proc.wait(min(want, left))
            status = None if rc == 0 else f"worker exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout (group deadline)"
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            results += _read_lines(results_file)[len(before):]
            raise
        done = _read_lines(results_file)[len(before):]
        results += done
        for c in g["cases"][len(done):]:
            results.append(dict(c, status=status or "not run"))


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# GPU training throughput ({meta['device_name']})", "",
             f"torch {meta['torch']}, timm {meta['timm']}, "
             f"{'bf16 autocast' if meta['precision'] == 'bf16' else 'fp32 (no autocast)'}, channels_last, batch per "
             f"case as shown, {meta['reps']} timed steps after {meta['warmup']} warm-up, synthetic data, "
             f"{meta['num_classes']} classes, RMSpropTF (pipeline.optim). Command: `{meta['command']}`", "",
             "ours: contiguous parameters as trained (NHWC activations from the input); ours-nhwc-weights: "
             "the same model with its parameters channels_last too (timm-style).", "",
             "| model | size | batch | compile | ours images/s | timm images/s | ours / timm (> 1: ours faster) | "
             "ours ms/step | ours peak GB | timm peak GB | ours-nhwc-weights images/s | "
             "ours / ours-nhwc-weights (< 1: contiguous weights cost) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keyed: dict[tuple, dict] = {}
    for r in results:
        keyed.setdefault((r["model"], r["size"], r["batch"], r["compile"]), {})[r["impl"]] = r

    def val(r, key, fmt):
        if r is None:
            return "-"
        return fmt.format(r[key]) if r["status"] == "ok" and key in r else (r["status"] if key == "images_per_s"
                                                                            else "-")

    order = {"s": 0, "m": 1, "l": 2, "xl": 3, "test": 4}
    for (m, s, b, c), d in sorted(keyed.items(), key=lambda kv: (kv[0][3], order.get(kv[0][0], 9), kv[0][1])):
        o, t, w = d.get("ours"), d.get("timm"), d.get("ours-nhwc-weights")

        def ratio(x, y):
            ok = x and y and x["status"] == y["status"] == "ok"
            return f"{x['images_per_s'] / y['images_per_s']:.3f}" if ok else "-"

        lines.append(f"| {m.upper()} | {s} | {b} | {'on' if c else 'off'} | {val(o, 'images_per_s', '{:.1f}')} | "
                     f"{val(t, 'images_per_s', '{:.1f}')} | {ratio(o, t)} | {val(o, 'ms_per_step', '{:.1f}')} | "
                     f"{val(o, 'peak_mem_gb', '{:.1f}')} | {val(t, 'peak_mem_gb', '{:.1f}')} | "
                     f"{val(w, 'images_per_s', '{:.1f}')} | {ratio(o, w)} |")
    lines += ["", "Anchor (reference section 6: timm, RTX 3090, AMP, channels_last): "
              + ", ".join(f"{k.upper()}@{v[0]} bs{v[1]} {v[2]:g} images/s" for k, v in ANCHOR.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a tiny check of the logic)")
    p.add_argument("--models", nargs="+", default=["s", "l", "xl"], choices=list(MODEL_NAMES))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                   help="ours-nhwc-weights: our model with channels_last parameters, eager, --layout-models only")
    p.add_argument("--layout-models", nargs="+", default=["s", "xl"], choices=list(MODEL_NAMES),
                   help="models that also run as ours-nhwc-weights at the first and last stage size (the "
                   "weight-layout cost)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: the paper stages)")
    p.add_argument("--batch", type=int, default=0, help="one batch for every case (default: scaled anchor batch)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply the default batches (memory allows "
                   "2-4 on 80-141 GB GPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-models", nargs="+", default=["s", "xl"], choices=list(MODEL_NAMES),
                   help="models also run under torch.compile (compiling costs ~1 minute per size)")
    p.add_argument("--compile-sizes", choices=["ends", "all"], default="ends",
                   help="compiled cases at the first and last stage size only, or at every stage size")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--case-timeout", type=int, default=60, help="seconds per eager case")
    p.add_argument("--compile-timeout", type=int, default=150, help="seconds per compiled case")
    p.add_argument("--budget", type=int, default=450, help="seconds for the whole plan; later groups are "
                   "skipped when it runs out")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench/results/gpu"))
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if "timm" in args.impls and "test" in set(args.models) | set(args.compile_models if args.compile else []):
        p.error("timm has no efficientnetv2_test: pass --impls ours with --models test")

    groups = build_plan(args)
    n = sum(len(g["cases"]) for g in groups)
    print(f"plan: {len(groups)} groups, {n} cases, budget {args.budget}s, device {args.device}")
    for g in groups:
        print(f"  {g['name']:<18} " + ", ".join(f"{c['size']}px bs{c['batch']}" for c in g["cases"])
              + f"  (per case <= {g['case_timeout']}s)")
    if args.dry_run:
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU (torch.cuda.is_available() is False); "
                         "run on a GPU machine, or check the logic with --device cpu --models test --impls ours")

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        if "timm" in args.impls:
            raise SystemExit("timm is not installed: pip install timm, or pass --impls ours") from None
        timm_version = "-"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: list[dict] = []
    # gpu.sh's last-guard `timeout` sends SIGTERM: unwind, stop the worker, and still write the report
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    interrupted = None
    try:
        run_plan(args, groups, results)
    except (KeyboardInterrupt, SystemExit) as e:
        interrupted = e
        seen = {(r["model"], r["impl"], r["compile"], r["size"]) for r in results}
        results += [dict(c, status="not run (interrupted)") for g in groups for c in g["cases"]
                    if (c["model"], c["impl"], c["compile"], c["size"]) not in seen]
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available()
                   else f"CPU, {os.cpu_count()} cores")
    meta = {"device_name": device_name, "torch": torch.__version__, "timm": timm_version, "precision": args.precision,
            "reps": args.reps, "warmup": args.warmup, "num_classes": args.num_classes,
            "command": "python bench/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": time.perf_counter() - t0}
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    md = markdown(results, meta)
    (out / "gpu_bench.md").write_text(md)
    print("\n" + md)
    print(f"total {meta['seconds']:.0f}s; wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    if interrupted is not None:
        print("interrupted: the report holds the cases finished before the signal", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
