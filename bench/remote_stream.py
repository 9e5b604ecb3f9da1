"""Shards streamed from nginx on loopback against local disk, with and without an injected 10 ms round trip.

Shards: the toolkit's own (`python -m shards write demo pretrain`, 384-px images re-encoded at quality 90, 100
samples per shard by default). Sources, all reading the same shards:

    local        the shard folder on local disk (the baseline)
    nginx        http://127.0.0.1:PORT/ (nginx from Debian, started here with its own config)
    nginx+proxy  the same through the tests' TCP proxy in its own process (what the proxy itself costs)
    +10ms        the proxy holds every request for --latency-ms before forwarding it (one round trip to a far
                 away store; tc netem is not available on the machines this runs on)

Part 1, the reading layer alone (one process, no workers, no decoding): every sample of every shard through the
shard reader (tar members, the retrying HTTP stream); samples/s of wall time and per CPU second of this process
(thread CPU time, which a busy machine does not inflate). Part 2, the whole training loader (decode, crop,
RandAugment, batching) with 0..N workers from local disk and from the +latency source: the number of workers at
which the latency is hidden.

    python bench/remote_stream.py                                  # ~3 minutes on 2 cores
    python bench/remote_stream.py --images 2000 --repeats 3 --batches 30 --workers 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per process, as the loader's workers use
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.loader import build_train_loader  # noqa: E402
from pipeline.data.shards import DatasetReaders, load_split  # noqa: E402
from pipeline.progressive import Stage  # noqa: E402
from remote_servers import Nginx, wait_port  # noqa: E402
from shards import remote  # noqa: E402


def write_shards(out: Path, images: int, per_shard: int, size: int) -> Path:
    classes = 50
    subprocess.run([sys.executable, "-m", "shards", "write", "demo", "pretrain", str(out), "--classes",
                    str(classes), "--per-class", str(max(1, images // classes)), "--val-per-class", "1",
                    "--image-size", str(size), "--shard-size", str(per_shard), "--no-progress", "--workers", "2"],
                   check=True, cwd=REPO, capture_output=True)
    return out


def start_proxy(upstream: int, latency_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests/remote_servers.py"), "proxy", str(upstream),
                             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    wait_port(port, proc, 30, "proxy")
    return proc, port


def read_all(root: str) -> tuple[int, int, float, float]:
    """(samples, bytes, wall s, CPU s) of reading every training sample once, in order, in this process."""
    split = load_split(root, "train")
    before = remote.counters_snapshot()
    readers = DatasetReaders([split], remote.RemoteOptions())
    n = nbytes = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    for j in range(split.num_shards):
        for m in range(split.counts[j]):
            s = readers.readers[0].get(j, j, m)
            n += 1
            nbytes += sum(len(v) for k, v in s.items() if not k.startswith("__"))
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    readers.close()
    assert remote.counters_delta(before)["failures"] == 0
    return n, nbytes, wall, cpu


def loader_rate(root: str, workers: int, batches: int, size: int) -> float:
    cfg = DataConfig(train=[root], workers=workers, shuffle_buffer=256)
    st = Stage(index=0, start_step=0, end_step=10**9, image_size=size, randaug=5.0, mixup=0.0, cutmix=0.0,
               dropout=0.0, drop_path=None, micro_batch_size=32)
    ld = build_train_loader(cfg, stage=st, micro_batch_size=32, num_classes=0, label_smoothing=0.1, seed=0)
    try:
        next(ld)  # workers started, first shards open
        t0 = time.perf_counter()
        for _ in range(batches):
            next(ld)
        return batches * 32 / (time.perf_counter() - t0)
    finally:
        ld.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--image-size", type=int, default=384, help="longer side of the generated images")
    ap.add_argument("--latency-ms", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--batches", type=int, default=20, help="batches of 32 per loader measurement")
    ap.add_argument("--train-size", type=int, default=128, help="training crop size of part 2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose

    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        tmp = Path(tmp)
        shards = write_shards(tmp / "data" / "shards", args.images, args.per_shard, args.image_size)
        nginx = Nginx(tmp / "data", tmp / "nginx").start()
        procs = []
        try:
            plain, plain_port = start_proxy(nginx.port, 0)
            slow, slow_port = start_proxy(nginx.port, args.latency_ms)
            procs += [plain, slow]
            sources = {"local": str(shards), "nginx": f"{nginx.url}/shards/",
                       "nginx+proxy": f"http://127.0.0.1:{plain_port}/shards/",
                       f"+{args.latency_ms:g}ms": f"http://127.0.0.1:{slow_port}/shards/"}
            split = load_split(str(shards), "train")
            mb = sum(os.path.getsize(u) for u in split.urls) / 1e6
            print(f"{split.samples} samples in {split.num_shards} shards ({args.per_shard} per shard, "
                  f"{mb / split.num_shards:.2f} MB per shard, {mb * 1e3 / split.samples:.0f} KB per sample); "
                  f"load average {os.getloadavg()[0]:.1f}")
            print("\npart 1: reading layer, one process (median of %d)" % args.repeats)
            print("| source | samples/s (wall) | samples/s per CPU second | MB/s (wall) | vs local (wall) |")
            print("|---|---:|---:|---:|---:|")
            base = None
            for name, root in sources.items():
                runs = [read_all(root) for _ in range(args.repeats)]
                n, nbytes = runs[0][0], runs[0][1]
                wall = statistics.median(r[2] for r in runs)
                cpu = statistics.median(r[3] for r in runs)
                base = base or n / wall
                print(f"| {name} | {n / wall:,.0f} | {n / cpu:,.0f} | {nbytes / wall / 1e6:,.0f} | "
                      f"{n / wall / base:.2f} |")
            print(f"\npart 2: training loader ({args.train_size} px, RandAugment 5, batch 32), samples/s, "
                  f"{args.batches} batches after the first")
            slow_name = f"+{args.latency_ms:g}ms"
            print(f"| workers | local | nginx | {slow_name} | nginx / local | {slow_name} / local |")
            print("|---:|---:|---:|---:|---:|---:|")
            for w in args.workers:
                rates = {name: [] for name in ("local", "nginx", slow_name)}
                for _ in range(args.repeats):  # interleaved: a change in the machine's load hits all three
                    for name in rates:
                        rates[name].append(loader_rate(sources[name], w, args.batches, args.train_size))
                a, b, c = (statistics.median(rates[name]) for name in rates)
                print(f"| {w} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {b / a:.2f} | {c / a:.2f} |")
            print(f"\nproxy processes' CPU over the run: {cpu_seconds(plain.pid):.1f} s (no latency), "
                  f"{cpu_seconds(slow.pid):.1f} s (+latency); load average {os.getloadavg()[0]:.1f}")
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=30)
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
