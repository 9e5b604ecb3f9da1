"""Realistic JPEGs for benchmarks: random crops of the two photographs that scikit-learn ships (no download).

Drawn images compress far better and decode faster than photographs, so they flatter any decode benchmark;
crops of real photos at ImageNet's typical 500x375, quality 90, behave like ImageNet files.
"""

from __future__ import annotations

import importlib.util
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    # The files of sklearn.datasets.load_sample_images(), opened directly: importing scikit-learn itself
    # (scipy and all) takes seconds.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("shards.photos needs scikit-learn (pip install scikit-learn): it uses the two "
                          "photographs bundled with it")
    folder = Path(spec.origin).parent / "datasets" / "images"
    photos = []
    for name in ("china.jpg", "flower.jpg"):  # 640x427 each, CC BY 2.0
        with Image.open(folder / name) as img:
            photos.append(img.convert("RGB"))
    return tuple(photos)


def make_photo_jpegs(n: int, size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0) -> list[bytes]:
    """n JPEGs of `size` (width, height): random crops (75-100% of the largest crop with that aspect), random
    flips, resized with bicubic filtering and encoded at `quality`. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    aspect = size[0] / size[1]
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        pw, ph = photo.size
        max_w = min(pw, int(ph * aspect))
        cw = int(max_w * rng.uniform(0.75, 1.0))
        ch = max(1, int(round(cw / aspect)))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def make_photo_folder(root: str | Path, num_classes: int, per_class: int, size: tuple[int, int] = (500, 375),
                      quality: int = 90, seed: int = 0) -> Path:
    """An imagefolder tree root/class_XXX/img_XXXXX.jpg of photo crops (for `write imagefolder` benchmarks)."""
    root = Path(root)
    jpegs = make_photo_jpegs(num_classes * per_class, size, quality, seed)
    for c in range(num_classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"img_{i:05d}.jpg").write_bytes(jpegs[c * per_class + i])
    return root
