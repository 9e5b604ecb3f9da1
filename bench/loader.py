"""Loader benchmark: training-transform images/s per worker (one core) against a plain PIL + torchvision baseline.

Both pipelines read the same webdataset tar shards of realistic JPEGs (~500x375, quality 90, random crops of the
two photographs scikit-learn ships; drawn images compress far better than photos and would flatter the decoder)
and produce the same tensors: random-resized crop, flip, RandAugment (2 ops, magnitude 10 on the 0-10 scale),
float32, normalised. Per sample both are seeded identically, so they pick the same crop boxes and the same
RandAugment ops: the comparison is like for like.

    baseline        webdataset reading; PIL full decode (Image.open(...).convert('RGB')) + torchvision v2
                    RandomResizedCrop / RandomHorizontalFlip / RandAugment(num_magnitude_bins=11, magnitude=10) /
                    ToImage / ToDtype / Normalize
    ours            our loader's tar reader (pipeline/data/tar.py) + pipeline.data.transforms.TrainTransform:
                    crop-aware reduced decode (stored jpg_small copy, DCT scaling) with the default decoder
                    (data.decoder=auto), uint8 resize, RandAugment on PIL, one-pass normalise
    ours-no-small   the same on shards without jpg_small copies (DCT scaling alone)
    ours-tv         the same with data.decoder=torchvision (torchvision full decodes, PIL draft for scaling)
    ours-full       the same with reduced_decode off (everything but the decode savings)

Pipelines are interleaved (every repeat times each one once, in rotating order); times are this thread's CPU
time and the best repeat is reported (the least disturbed one on a shared machine; --wall for wall-clock time).
Two views: reading the tar shards + transform (end to end), and the transform alone on samples already in
memory. Then the share of crops per decode path, ms per image by phase for ours and the baseline, the decoders
side by side (ms per 500x375 decode, full and DCT-scaled), and the extra storage of the small copies.

    python bench/loader.py                       # ~4 minutes on an idle core, more on a busy machine
    python bench/loader.py --images 128 --repeats 3 --sizes 128
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.decode import (  # noqa: E402
    SampleImage,
    available_decoders,
    crop_resize,
    describe_decoder,
    pil_to_tensor,
    resolve_decoder,
    tensor_to_pil,
)
from pipeline.data.shards import split_member_name  # noqa: E402
from pipeline.data.tar import TarStream  # noqa: E402
from pipeline.data.transforms import TrainTransform  # noqa: E402

SMALL_SIDE = 256
MAGNITUDE = 10
# CPU time of this thread, not wall time: the figures then hold on a machine shared with other jobs (each
# pipeline runs single-threaded, so its CPU time is its cost; --wall switches to wall-clock time).
CLOCK = time.thread_time


# ---------------------------------------------------------------------------------------------------- data

def make_photo_jpegs(n: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(jpg, jpg_small) pairs: random crops of the sklearn photographs at 500x375, quality 90, and the small copy
    the shard toolkit writes (``python -m shards write ... --small-copy 256``).

    Uses the toolkit (shards.photos, shards.images) when present, else an equivalent local generator.
    """
    try:
        from shards.images import reduce_image
        from shards.photos import make_photo_jpegs as toolkit_photos
    except ImportError:
        toolkit_photos = reduce_image = None
    if toolkit_photos is not None:
        return [(jpg, reduce_image(jpg, 512, 90, SMALL_SIDE).small) for jpg in toolkit_photos(n, seed=seed)]
    from sklearn.datasets import load_sample_images

    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        size = (500, 375)
        aspect = size[0] / size[1]
        pw, ph = photo.size
        cw = rng.uniform(0.75, 1.0) * min(pw, ph * aspect)
        ch = cw / aspect
        x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
        img = photo.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        out.append((data, _small_copy(data)))
    return out


def _small_copy(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = SMALL_SIDE / max(img.size)
    small = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                       Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(pairs, folder: Path, with_small: bool, per_shard: int) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(0, len(pairs), per_shard):
        path = folder / f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i, (jpg, small) in enumerate(pairs[s:s + per_shard], start=s):
                sample = {"__key__": f"img{i:06d}", "jpg": jpg, "cls": str(i % 10).encode(),
                          "json": b'{"labels": [%d]}' % (i % 10)}
                if with_small:
                    sample["jpg_small"] = small
                sink.write(sample)
        urls.append(str(path))
    return urls


def read_shards(urls):
    """The baseline's reader: webdataset (Python's tarfile underneath)."""
    import webdataset as wds

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False)


def read_shards_ours(urls):
    """Our loader's reading: pipeline/data/tar.py, members grouped into samples by key as ShardReader does."""
    for url in urls:
        with TarStream.open(url) as tar:
            sample = None
            while (m := tar.next()) is not None:
                key, ext = split_member_name(m.name)
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                sample[ext] = tar.read()
            if sample is not None:
                yield sample


# ---------------------------------------------------------------------------------------------------- pipelines

def baseline_transform(cfg: DataConfig, size: int):
    from torchvision.transforms import v2

    tf = v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(cfg.crop_area), ratio=tuple(cfg.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.RandAugment(num_ops=cfg.randaug_ops, magnitude=MAGNITUDE, num_magnitude_bins=11,
                       fill=[int(round(255 * m)) for m in cfg.mean]),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(cfg.mean, cfg.std),
    ])

    def run(sample):
        return tf(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    return run


def time_pass(source, fn, reader=read_shards) -> float:
    """images/s of one pass; ``source`` is a list of shard URLs (read with ``reader``) or of samples."""
    samples = reader(source) if isinstance(source[0], str) else source
    n = 0
    t0 = CLOCK()
    for i, sample in enumerate(samples):
        # The same crop / flip / RandAugment draws for every pipeline. (torch.manual_seed costs ~70 us with a
        # CUDA build of torch, the CPU generator's own manual_seed ~1 us.)
        torch.default_generator.manual_seed(i)
        out = fn(sample)
        assert out.dtype == torch.float32
        n += 1
    return n / (CLOCK() - t0)


# ---------------------------------------------------------------------------------------------------- breakdown

class Timer:
    def __init__(self):
        self.total = Counter()

    def __call__(self, name, fn, *args):
        t0 = CLOCK()
        out = fn(*args)
        self.total[name] += CLOCK() - t0
        return out


def _read_time(urls, reader) -> float:
    """Seconds per sample to read the shards (no decoding)."""
    t0 = CLOCK()
    n = sum(1 for _ in reader(urls))
    return (CLOCK() - t0) / n


def breakdown_ours(samples, cfg: DataConfig, size: int) -> tuple[Counter, Counter]:
    tf = TrainTransform(cfg, size, MAGNITUDE)
    t, plans = Timer(), Counter()
    for i, s in enumerate(samples):
        torch.default_generator.manual_seed(i)
        image = t("header + crop box", SampleImage, s)
        box = t("header + crop box", tf.crop_box, image)
        plan = t("header + crop box", image.plan, box, tf.out_size, True)
        plans[f"{plan.source} 1/{plan.scale}"] += 1
        pixels, scale = t("decode", image.decode_plan, plan, tf.decoder)
        x = t("crop + resize (uint8)", crop_resize, pixels, box, plan.sx / scale, plan.sy / scale, tf.out_size)
        flip = bool(torch.rand(()) < tf.hflip)
        pil = t("to PIL + flip", tensor_to_pil, x, flip)
        pil = t("RandAugment", tf.randaug, pil)
        x = t("from PIL", pil_to_tensor, pil)
        t("normalise", tf.normalize, x)
    return t.total, plans


def plan_mix(samples, cfg: DataConfig, size: int) -> Counter:
    """How often each decode source is chosen (same seeds as the timed passes)."""
    tf = TrainTransform(cfg, size, MAGNITUDE)
    plans = Counter()
    for i, s in enumerate(samples):
        torch.default_generator.manual_seed(i)
        image = SampleImage(s)
        plan = image.plan(tf.crop_box(image), tf.out_size, True)
        plans[f"{plan.source} 1/{plan.scale}"] += 1
    return plans


def breakdown_baseline(samples, cfg: DataConfig, size: int) -> Counter:
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=tuple(cfg.crop_area), ratio=tuple(cfg.crop_ratio), antialias=True)
    flip = v2.RandomHorizontalFlip(cfg.hflip)
    ra = v2.RandAugment(num_ops=cfg.randaug_ops, magnitude=MAGNITUDE, num_magnitude_bins=11)
    tail = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])
    t = Timer()
    for i, s in enumerate(samples):
        torch.default_generator.manual_seed(i)
        img = t("decode", lambda b: Image.open(io.BytesIO(b)).convert("RGB"), s["jpg"])
        img = t("crop + resize (PIL)", crop, img)
        img = t("flip", flip, img)
        img = t("RandAugment", ra, img)
        t("to tensor + normalise", tail, img)
    return t.total


def decoder_table(pairs, repeats: int = 3) -> dict:
    """ms per decode of the 500x375 originals, by decoder and DCT scale (the case for using only 1/2, 1/4,
    1/8), and of the jpg_small copies; PyTurboJPEG's lossless crop + decode too when it is installed."""
    import simplejpeg
    from torchvision.io import ImageReadMode, decode_jpeg

    jpgs = [a for a, _ in pairs[:64]]
    smalls = [b for _, b in pairs[:64]]

    def pil(data, k=1):
        im = Image.open(io.BytesIO(data))
        if k > 1:
            im.draft("RGB", (im.size[0] // k, im.size[1] // k))
        return im.convert("RGB")

    def sj(data, m=8):
        w, h = 500, 375
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w * m // 8), min_height=-(-h * m // 8))

    cases = {
        "PIL full": (jpgs, pil), "PIL draft 1/2": (jpgs, lambda d: pil(d, 2)),
        "PIL draft 1/4": (jpgs, lambda d: pil(d, 4)), "PIL draft 1/8": (jpgs, lambda d: pil(d, 8)),
        "torchvision full": (jpgs, lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8),
                                                          mode=ImageReadMode.RGB)),
        "simplejpeg full": (jpgs, simplejpeg.decode_jpeg),
    }
    for m in (7, 6, 5, 4, 3, 2, 1):
        cases[f"simplejpeg {m}/8"] = (jpgs, lambda d, m=m: sj(d, m))
    cases["PIL jpg_small"] = (smalls, pil)
    cases["simplejpeg jpg_small"] = (smalls, simplejpeg.decode_jpeg)
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        tj = TurboJPEG()
        cases["PyTurboJPEG full"] = (jpgs, lambda d: tj.decode(d, pixel_format=TJPF_RGB))
        # a 192x192 crop in the middle: lossless crop transform, then decode of the cropped JPEG
        cases["PyTurboJPEG crop 192 + decode"] = (
            jpgs, lambda d: tj.decode(tj.crop(d, 144, 96, 192, 192), pixel_format=TJPF_RGB))
    except Exception:  # not installed (Debian's libturbojpeg0 + PyTurboJPEG < 2): skipped
        pass
    out = {}
    for name, (data, fn) in cases.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = CLOCK()
            for d in data:
                fn(d)
            best = min(best, CLOCK() - t0)
        out[name] = 1e3 * best / len(data)
    return out


def randaug_backends(samples, cfg: DataConfig, size: int, repeats: int = 3) -> dict:
    """ms per image of torchvision's RandAugment (2 ops, magnitude 10) on a PIL image vs a uint8 tensor:
    why ours hands the resized crop to PIL for RandAugment and takes it back."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=2, magnitude=MAGNITUDE, num_magnitude_bins=11)
    tf = TrainTransform(cfg, size, 0)
    tensors = []
    for i, s in enumerate(samples[:64]):
        torch.default_generator.manual_seed(i)
        tensors.append(tf.augment_uint8(s))
    pils = [tensor_to_pil(x) for x in tensors]
    contiguous = [x.contiguous() for x in tensors]
    out = {}
    for name, images in (("PIL", pils), ("uint8 tensor", contiguous)):
        best = float("inf")
        for _ in range(repeats):
            torch.default_generator.manual_seed(0)
            t0 = CLOCK()
            for im in images:
                ra(im)
            best = min(best, CLOCK() - t0)
        out[name] = 1e3 * best / len(images)
    t0 = CLOCK()
    for x in tensors:
        pil_to_tensor(tensor_to_pil(x))
    out["round trip tensor -> PIL -> tensor"] = 1e3 * (CLOCK() - t0) / len(tensors)
    return out


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="JPEGs in the shards (default 256)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7, help="timed passes per pipeline and size (best reported)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    p.add_argument("--workdir", default=None, help="where to write the shards (default: a temporary folder)")
    p.add_argument("--wall", action="store_true", help="time with the wall clock instead of thread CPU time")
    args = p.parse_args(argv)
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter

    torch.set_num_threads(1)  # one loader worker = one core
    cfg = DataConfig()
    print(f"decoder: {describe_decoder(resolve_decoder(cfg.decoder))} (installed: {', '.join(available_decoders())})")
    print(f"torch {torch.__version__}, one thread, {os.cpu_count()} cores visible, "
          f"{'wall-clock' if args.wall else 'thread CPU'} time; "
          f"{args.images} JPEGs in {args.shards} shards, {args.repeats} interleaved repeats")
    pairs = make_photo_jpegs(args.images)
    jpg_bytes = sum(len(a) for a, _ in pairs)
    small_bytes = sum(len(b) for _, b in pairs)
    sizes_px = Counter(Image.open(io.BytesIO(a)).size for a, _ in pairs)
    small_px = Counter(Image.open(io.BytesIO(b)).size for _, b in pairs)
    print(f"images: {dict(sizes_px)}, small copies {dict(small_px)}; mean jpg {jpg_bytes / len(pairs) / 1024:.1f} KiB, "
          f"jpg_small {small_bytes / len(pairs) / 1024:.1f} KiB "
          f"(+{100 * small_bytes / jpg_bytes:.1f}% storage for the small copies)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        per_shard = max(1, len(pairs) // args.shards)
        with_small = write_shards(pairs, root / "with_small", True, per_shard)
        no_small = write_shards(pairs, root / "no_small", False, per_shard)
        shard_bytes = {name: sum(os.path.getsize(u) for u in urls)
                       for name, urls in (("with_small", with_small), ("no_small", no_small))}
        print(f"shards: {shard_bytes['no_small'] / 2**20:.2f} MiB without small copies, "
              f"{shard_bytes['with_small'] / 2**20:.2f} MiB with "
              f"(+{100 * (shard_bytes['with_small'] / shard_bytes['no_small'] - 1):.1f}%)")
        samples = list(read_shards(with_small))
        samples_no_small = list(read_shards(no_small))

        results = {}
        for size in args.sizes:
            ours = TrainTransform(cfg, size, MAGNITUDE)
            pipes = {  # name: (shards, samples in memory, transform, shard reader)
                "baseline": (no_small, samples_no_small, baseline_transform(cfg, size), read_shards),
                "ours": (with_small, samples, ours, read_shards_ours),
                "ours-no-small": (no_small, samples_no_small, ours, read_shards_ours),
                "ours-tv": (with_small, samples, TrainTransform(DataConfig(decoder="torchvision"), size, MAGNITUDE),
                            read_shards_ours),
                "ours-full": (with_small, samples, TrainTransform(DataConfig(reduced_decode=False), size, MAGNITUDE),
                              read_shards_ours),
            }
            for _, mem, fn, _ in pipes.values():  # warm-up: imports, allocator, caches
                for s in mem[:16]:
                    fn(s)
            rates = {(name, where): [] for name in pipes for where in ("shards", "memory")}
            names = list(pipes)
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    urls, mem, fn, reader = pipes[name]
                    rates[(name, "shards")].append(time_pass(urls, fn, reader))
                    rates[(name, "memory")].append(time_pass(mem, fn))
            results[size] = {k: max(v) for k, v in rates.items()}  # best repeat = least disturbed

        others = ("ours", "ours-no-small", "ours-tv", "ours-full")
        for where, title in (("shards", "read from the tar shards + transform (end to end)"),
                             ("memory", "transform only (samples already in memory)")):
            print(f"\nimages/s per worker (one core), {title}; best of {args.repeats} interleaved repeats")
            print(f"{'size':>5}  {'baseline':>9}" + "".join(f"  {n:>13}  {'ratio':>6}" for n in others))
            for size, r in results.items():
                b = r[("baseline", where)]
                print(f"{size:>5}  {b:>9.0f}" + "".join(f"  {r[(n, where)]:>13.0f}  {r[(n, where)] / b:>5.2f}x"
                                                      for n in others))

        read_ours = min(_read_time(with_small, read_shards_ours) for _ in range(3))
        read_wds = min(_read_time(no_small, read_shards) for _ in range(3))
        print(f"\nreading the shards, ms per sample: ours (pipeline/data/tar.py) {1e3 * read_ours:.3f} on shards "
              f"with jpg_small, webdataset {1e3 * read_wds:.3f} on shards without")
        print("where the time goes (ms per image, ours on shards with jpg_small | baseline; plus the reading above)")
        for size in args.sizes:
            ours, plans = breakdown_ours(samples, cfg, size)
            base = breakdown_baseline(samples, cfg, size)
            n = len(samples)
            mix = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(plans.items()))
            draft_plans = plan_mix(samples_no_small, cfg, size)
            mix_draft = ", ".join(f"{k} {100 * v / n:.0f}%" for k, v in sorted(draft_plans.items()))
            print(f"  {size}px  decode sources with jpg_small: {mix}; without: {mix_draft}")
            print("    ours:     " + ", ".join(f"{k} {1e3 * v / n:.3f}" for k, v in ours.items())
                  + f"  = {1e3 * sum(ours.values()) / n:.3f}")
            print("    baseline: " + ", ".join(f"{k} {1e3 * v / n:.3f}" for k, v in base.items())
                  + f"  = {1e3 * sum(base.values()) / n:.3f}")
        print("\ndecoders, ms per image (500x375 q90 originals unless named; best of 3, thread CPU time)")
        for name, ms in decoder_table(pairs).items():
            print(f"  {name:<32} {ms:.3f}")
        print("\nRandAugment (torchvision, 2 ops, magnitude 10) by image type, ms per image")
        for size in args.sizes:
            r = randaug_backends(samples, cfg, size)
            print(f"  {size}px  " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
