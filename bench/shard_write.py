"""Shard writing speed: images/s per worker process on realistic JPEGs, against a plain-decode baseline.

Rates are reported per CPU-second as well as per wall-clock second: on a shared machine the CPU time is the
stable measure of what one worker process costs.

The inputs are random crops of real photographs (shards.photos: 500x375, quality 90, like ImageNet files), in an
imagefolder tree. Every write decodes each image once (to catch truncated files), so the baseline measured in
the same run is a bare PIL decode of the same files; the ratio says what the rest costs (reading, re-encoding,
the small copy, tar writing, fsync).

    python bench/shard_write.py                 # ~1-2 minutes on 2 cores
    python bench/shard_write.py --images 500 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from shards.photos import make_photo_folder  # noqa: E402
from shards.plan import PlanOptions  # noqa: E402
from shards.sources import SourceOptions, open_source  # noqa: E402
from shards.writer import WriteOptions, write  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (the writer's pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_rate(files: list[Path], repeat: int) -> tuple[float, float]:
    """(wall, CPU) images/s of Image.open + load on the files' bytes: the floor of any checking writer."""
    blobs = [f.read_bytes() for f in files]
    wall = cpu = 0.0
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        for b in blobs:
            Image.open(io.BytesIO(b)).load()
        wall = max(wall, len(blobs) / (time.perf_counter() - start))
        cpu = max(cpu, len(blobs) / (cpu_seconds() - start_cpu))
    return wall, cpu


def write_rate(src: Path, work: Path, repeat: int, workers: int, **image_opts) -> tuple[float, float, dict]:
    """Best (wall, CPU) images/s over `repeat` full writes (listing, reading, reducing, tar, fsync), info.json."""
    wall = cpu = 0.0
    info = {}
    for _ in range(repeat):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        with contextlib.redirect_stderr(io.StringIO()):  # the writer's own summary lines
            listing = open_source("imagefolder", str(src), SourceOptions())
            info = write(listing, out, WriteOptions(plan=PlanOptions(shard_size=100), workers=workers,
                                                    progress=False, **image_opts))
        n = sum(s["samples"] for s in info["splits"].values())
        wall = max(wall, n / (time.perf_counter() - start))
        cpu = max(cpu, n / (cpu_seconds() - start_cpu))
    return wall, cpu, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="images per source set")
    p.add_argument("--repeat", type=int, default=2, help="runs per case; the best is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with tempfile.TemporaryDirectory(prefix="shard_write_") as tmp:
        tmp = Path(tmp)
        print(f"making {args.images} photo JPEGs at 500x375 and at 1000x750, quality 90 ...", file=sys.stderr)
        sets = {
            "500x375": make_photo_folder(tmp / "src500", 10, args.images // 10, (500, 375), 90, seed=0),
            "1000x750": make_photo_folder(tmp / "src1000", 10, args.images // 10, (1000, 750), 90, seed=1),
        }
        cases = [
            ("500x375", "--max-side 512 (kept as is)", {"max_side": 512}),
            ("500x375", "--max-side 512 --small-copy 256", {"max_side": 512, "small_copy": 256}),
            ("500x375", "--max-side 384 (all re-encoded)", {"max_side": 384}),
            ("1000x750", "--max-side 512 (all downscaled)", {"max_side": 512}),
            ("1000x750", "--max-side 512 --small-copy 256", {"max_side": 512, "small_copy": 256}),
        ]
        baselines = {}
        for name, src in sets.items():
            files = sorted(src.rglob("*.jpg"))
            mean_kib = sum(f.stat().st_size for f in files) / len(files) / 1024
            baselines[name] = decode_rate(files, args.repeat)
            print(f"baseline {name}: PIL decode {baselines[name][1]:.0f} images per CPU-second "
                  f"({baselines[name][0]:.0f}/s wall), {mean_kib:.1f} KiB/image")
        print()
        print("| source | options | workers | images/s (wall) | images per CPU-second | vs decode | KiB/sample "
              "| small copy |")
        print("|---|---|---|---|---|---|---|---|")
        for name, label, opts in cases:
            for workers in args.workers:
                wall, cpu, info = write_rate(sets[name], tmp, args.repeat, workers, **opts)
                split = info["splits"]["train"]
                small = info["small_copy"]
                extra = f"+{100 * small['extra_bytes'] / (split['bytes'] - small['extra_bytes']):.0f}% bytes" \
                    if small else "-"
                print(f"| {name} | {label} | {workers} | {wall:.0f} | {cpu:.0f} | {cpu / baselines[name][1]:.2f}x | "
                      f"{split['bytes'] / split['samples'] / 1024:.1f} | {extra} |", flush=True)
        print(f"\n(machine: {os.cpu_count()} CPU cores. Images per CPU-second is the rate of one worker process "
              "on a core of its own, which a shared machine's wall clock hides; 'vs decode' divides it by the "
              "bare PIL decode rate of the same files, also per CPU-second.)")

if __name__ == "__main__":
    main()
