"""Streaming-loader overhead: our resumable TrainLoader against a plain webdataset pipeline, same transform.

Both read the same tar shards of realistic JPEGs (random 500x375 crops of scikit-learn's two photographs,
quality 90, with a 256-px ``jpg_small`` copy like the shard toolkit writes) and run the same TrainTransform
at the same size, in this process on one core (workers=0), so the difference is what the streaming layer
costs per sample: address plans, tar reading, per-sample seeding of the augmentation, bad-sample bookkeeping,
batch assembly and soft targets.

    baseline  webdataset.WebDataset(urls).shuffle(buffer) -> TrainTransform -> torch.stack per batch, with
              torch's generator seeded per sample exactly as ours is (same crops, same RandAugment ops)
    ours      pipeline.data.loader.build_train_loader(..., workers=0)

Both consume the same whole shard set (every sample once), so the work is identical sample for sample.

It also prints the per-sample seeding cost and the fast-forward rate of a resume (samples skipped per second,
read from the tars but not decoded) against the decode rate.

    python bench/loader_stream.py                     # ~1 minute on one core
    python bench/loader_stream.py --images 256 --repeats 3 --size 128
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.loader import build_train_loader  # noqa: E402
from pipeline.data.shards import sample_seed, stable_seed  # noqa: E402
from pipeline.data.transforms import TrainTransform  # noqa: E402
from pipeline.progressive import Stage  # noqa: E402

CLOCK = time.thread_time  # CPU time of this thread: stable on a machine shared with other jobs


def make_shards(root: Path, n: int, per_shard: int) -> list[str]:
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(0)
    shards, idx = [], 0
    root.mkdir(parents=True, exist_ok=True)
    while idx < n:
        name = f"train-{len(shards):06d}.tar"
        count = min(per_shard, n - idx)
        with open(root / name, "wb") as f, wds.TarWriter(f) as w:
            for _ in range(count):
                p = photos[idx % len(photos)]
                wd, ht = (500, 375) if rng.random() < 0.7 else (375, 500)
                x, y = rng.randrange(p.width - wd + 1), rng.randrange(p.height - ht + 1) if p.height > ht else 0
                im = p.crop((x, y, x + wd, y + min(ht, p.height))).resize((wd, ht))
                buf, small = io.BytesIO(), io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                s = 256 / max(wd, ht)
                im.resize((round(wd * s), round(ht * s)), Image.BILINEAR).save(small, format="JPEG", quality=90)
                w.write({"__key__": f"img{idx:06d}", "jpg": buf.getvalue(), "jpg_small": small.getvalue(),
                         "cls": str(idx % 10).encode(), "json": b"{}"})
                idx += 1
        shards.append({"name": name, "samples": count, "bytes": (root / name).stat().st_size})
    info = {"format": "effnetv2-shards", "version": 1, "name": "bench", "num_classes": 10,
            "classes": [{"index": i, "wnid": f"c{i}", "name": f"c{i}"} for i in range(10)], "multi_label": False,
            "splits": {"train": {"samples": n, "shards": shards}}}
    (root / "info.json").write_text(json.dumps(info))
    return [str(root / s["name"]) for s in shards]


def run_baseline(urls, cfg, size, randaug, n, batch) -> float:
    import webdataset as wds

    transform = TrainTransform(cfg, size, randaug)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(cfg.shuffle_buffer)
    base = stable_seed("sample", 0, 0)  # what TrainLoader uses for seed 0, epoch 0
    t0, done, images = CLOCK(), 0, []
    for sample in ds:
        torch.default_generator.manual_seed(sample_seed(base, sample["__key__"]))
        images.append(transform(sample))
        if len(images) == batch:
            torch.stack(images)
            images = []
        done += 1
        if done >= n:
            break
    return done / (CLOCK() - t0)


def run_ours(cfg, size, randaug, n, batch) -> float:
    st = Stage(index=0, start_step=0, end_step=10**9, image_size=size, randaug=randaug, mixup=0.0, cutmix=0.0,
               dropout=0.0, drop_path=None, micro_batch_size=batch)
    ld = build_train_loader(cfg, stage=st, micro_batch_size=batch, workers=0)
    t0, done = CLOCK(), 0
    while done < n:
        done += len(next(ld)["key"])
    rate = done / (CLOCK() - t0)
    ld.close()
    return rate


def seeding_cost(reps: int = 20000) -> dict:
    base = stable_seed("sample", 0, 3)
    keys = [f"n01440764_{i:06d}" for i in range(reps)]
    out = {}
    for name, fn in (("key hash", lambda k: sample_seed(base, k)), ("random.seed", lambda k: random.seed(1 << 40)),
                     ("torch generator seed", lambda k: torch.default_generator.manual_seed(1 << 40)),
                     ("torch.manual_seed (not used)", lambda k: torch.manual_seed(1 << 40))):
        t0 = time.perf_counter()
        for k in keys:
            fn(k)
        out[name] = (time.perf_counter() - t0) / reps * 1e6
    return out


def fast_forward_rate(cfg, n, batch) -> tuple[float, float]:
    """(samples skipped per CPU second on resume, samples decoded per CPU second) at the end of an epoch."""
    st = Stage(index=0, start_step=0, end_step=10**9, image_size=128, randaug=10.0, mixup=0.0, cutmix=0.0,
               dropout=0.0, drop_path=None, micro_batch_size=batch)
    ld = build_train_loader(cfg, stage=st, micro_batch_size=batch, workers=0)
    per_epoch = ld.batches_per_epoch()
    t0 = CLOCK()
    for _ in range(per_epoch - 1):
        next(ld)
    decode_rate = (per_epoch - 1) * batch / (CLOCK() - t0)
    state = ld.state_dict()
    ld.close()
    res = build_train_loader(cfg, stage=st, micro_batch_size=batch, workers=0)
    res.load_state_dict(state)
    t0 = CLOCK()
    next(res)  # skips (per_epoch - 1) batches, decodes one
    skip_s = CLOCK() - t0 - batch / decode_rate
    res.close()
    return (per_epoch - 1) * batch / max(skip_s, 1e-9), decode_rate


def replay_rate(n: int = 1_000_000) -> float:
    """Addresses per second through plan + shuffle buffer with no file access (the CPU part of a resume)."""
    from pipeline.data.shards import SplitIndex, TrainPlan

    shards = 1000
    per = n // shards
    split = SplitIndex(root="/none", info_path="/none/info.json", name="synthetic", split="train", num_classes=10,
                       classes=(), multi_label=False, urls=tuple(f"/none/{i}.tar" for i in range(shards)),
                       names=tuple(f"{i}.tar" for i in range(shards)), counts=(per,) * shards,
                       offsets=tuple(i * per for i in range(shards)))
    plan = TrainPlan([split], weights=None, seed=0, world_size=1, workers=1, resampled=False, shuffle_buffer=2000)
    s = plan.stream(0, 0, 0)
    t0 = CLOCK()
    for _ in range(n - 2000):
        s.next(load=False)
    return (n - 2000) / (CLOCK() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384, help="samples per timed run (the whole shard set)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--randaug", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shards"
        args.images -= args.images % args.batch
        urls = make_shards(root, args.images, per_shard=128)
        cfg = DataConfig(train=[str(root)], workers=0, shuffle_buffer=args.buffer)
        # warm-up (imports, page cache)
        run_baseline(urls, cfg, args.size, args.randaug, 64, args.batch)
        run_ours(cfg, args.size, args.randaug, 64, args.batch)
        base, ours = [], []
        for r in range(args.repeats):
            pair = [("base", run_baseline), ("ours", None)] if r % 2 == 0 else [("ours", None), ("base", run_baseline)]
            for name, _ in pair:
                if name == "base":
                    base.append(run_baseline(urls, cfg, args.size, args.randaug, args.images, args.batch))
                else:
                    ours.append(run_ours(cfg, args.size, args.randaug, args.images, args.batch))
        b, o = statistics.median(base), statistics.median(ours)
        print(f"train transform at {args.size}px, RandAugment {args.randaug:g}, batch {args.batch}, "
              f"shuffle buffer {args.buffer}, one core, median of {args.repeats}")
        print(f"  baseline (webdataset pipeline)  {b:8.1f} images/s")
        print(f"  ours (TrainLoader, workers=0)   {o:8.1f} images/s   ratio {o / b:.3f}")
        print("per-sample seeding (microseconds):")
        for k, v in seeding_cost().items():
            print(f"  {k:30s} {v:7.2f}")
        skip, dec = fast_forward_rate(cfg, args.images, args.batch)
        print(f"resume fast-forward: {skip:,.0f} samples/s skipped (tar read, no decode) vs {dec:,.0f} decoded/s "
              f"({skip / dec:.0f}x)")
        print(f"resume replay without file access (plan + shuffle buffer, 1M samples): {replay_rate():,.0f} "
              "samples/s")


if __name__ == "__main__":
    main()
