"""The demo data: procedurally drawn shape x fill-pattern images, deterministic for a seed, learnable by a small CNN.

A class is a (shape, fill pattern) pair. Every image draws its class's shape at a random position, size and
rotation, filled with the class's pattern in two random colours, over a random gradient background with clutter
lines and pixel noise. The pretraining set uses 12 shapes, the transfer set 6 other shapes, both with the same
12 patterns: features learned in pretraining carry over, but no transfer class is a pretraining class.
Four patterns are fine versions of coarse ones (stripes / fine_stripes, checker / fine_checker, dots /
fine_dots, and speckle), only a few pixels per period at the default 160 px: at low resolution they blur into
a flat colour, so higher resolution measurably helps, which is what progressive learning needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from . import ShardError

KINDS = ("pretrain", "transfer")
SPLITS = ("train", "val")
PRETRAIN_SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star5", "cross", "ring", "diamond",
                   "ellipse", "semicircle", "trapezoid")
TRANSFER_SHAPES = ("heart", "arrow", "crescent", "star4", "lshape", "tshape")
PATTERNS = ("solid", "stripes", "fine_stripes", "checker", "fine_checker", "dots", "fine_dots", "grid", "rings",
            "gradient", "waves", "speckle")
DEFAULTS = {
    "pretrain": {"num_classes": 100, "per_class": 60, "val_per_class": 10, "image_size": 160},
    "transfer": {"num_classes": 12, "per_class": 60, "val_per_class": 20, "image_size": 160},
}


@lru_cache(maxsize=None)
def _combos(kind: str) -> tuple[tuple[str, str], ...]:
    """All (shape, pattern) classes of a set in their fixed order.

    Diagonal order: the k-th block of len(shapes) classes pairs shape s with pattern (s + k) % 12, so the first
    N classes spread evenly over shapes and patterns, and neither shape nor pattern alone names a class.
    """
    shapes = PRETRAIN_SHAPES if kind == "pretrain" else TRANSFER_SHAPES
    return tuple((shapes[s], PATTERNS[(s + k) % len(PATTERNS)]) for k in range(len(PATTERNS))
                 for s in range(len(shapes)))


def class_names(kind: str, num_classes: int | None = None) -> list[str]:
    """Names `shape-pattern` of the first num_classes classes of a demo set."""
    if kind not in KINDS:
        raise ShardError(f"unknown demo set {kind!r}; choose one of: {', '.join(KINDS)}")
    combos = _combos(kind)
    n = DEFAULTS[kind]["num_classes"] if num_classes is None else num_classes
    if not 2 <= n <= len(combos):
        raise ShardError(f"demo {kind}: --classes {n} is outside 2..{len(combos)}")
    return [f"{s}-{p}" for s, p in combos[:n]]


# ---------------------------------------------------------------------------------------------- shapes


def _regular(n: int, inner: float = 0.0) -> list[tuple[float, float]]:
    """A regular polygon (inner = 0) or a star with inner radius `inner`, radius 1, a vertex pointing up."""
    if inner:
        return [((1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / n),
                 -(1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / n)) for k in range(2 * n)]
    return [(math.sin(2 * math.pi * k / n), -math.cos(2 * math.pi * k / n)) for k in range(n)]


def _oval(rx: float, ry: float, start: float = 0.0, stop: float = 2 * math.pi, cx: float = 0.0,
          n: int = 48) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(start + (stop - start) * k / n), ry * math.sin(start + (stop - start) * k / n))
            for k in range(n + (0 if stop - start >= 2 * math.pi else 1))]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -(y + 3) / 17))
    return pts


# Each shape: polygons filled with 255 (add) then 0 (cut), in unit coordinates (radius about 1).
_SHAPES: dict[str, tuple[list, list]] = {
    "circle": ([_oval(1, 1)], []),
    "square": ([_regular(4)], []),
    "triangle": ([_regular(3)], []),
    "pentagon": ([_regular(5)], []),
    "hexagon": ([_regular(6)], []),
    "star5": ([_regular(5, 0.45)], []),
    "cross": ([[(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]], []),
    "ring": ([_oval(1, 1)], [_oval(0.55, 0.55)]),
    "diamond": ([[(1, 0), (0, 0.55), (-1, 0), (0, -0.55)]], []),
    "ellipse": ([_oval(1, 0.55)], []),
    "semicircle": ([_oval(1, 1, 0, math.pi)], []),
    "trapezoid": ([[(-1, 0.65), (1, 0.65), (0.45, -0.65), (-0.45, -0.65)]], []),
    "heart": ([_heart()], []),
    "arrow": ([[(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)]], []),
    "crescent": ([_oval(1, 1)], [_oval(0.85, 0.85, cx=0.5)]),
    "star4": ([_regular(4, 0.38)], []),
    "lshape": ([[(-0.7, -1), (-0.15, -1), (-0.15, 0.45), (0.8, 0.45), (0.8, 1), (-0.7, 1)]], []),
    "tshape": ([[(-1, -1), (1, -1), (1, -0.45), (0.28, -0.45), (0.28, 1), (-0.28, 1), (-0.28, -0.45),
                 (-1, -0.45)]], []),
}


def _shape_mask(shape: str, w: int, h: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(H, W) float coverage in [0, 1], drawn at 2x and box-filtered for smooth edges."""
    ss = 2
    img = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(angle), math.sin(angle)
    add, cut = _SHAPES[shape]
    for polys, fill in ((add, 255), (cut, 0)):
        for poly in polys:
            pts = [((cx + radius * (x * c - y * s)) * ss, (cy + radius * (x * s + y * c)) * ss) for x, y in poly]
            draw.polygon(pts, fill=fill)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------- patterns


def _square_wave(phase: np.ndarray) -> np.ndarray:
    # A square wave with edges about a pixel wide (sharpness 3 on a sine), so patterns are not jagged.
    return np.clip(0.5 + 3.0 * np.sin(phase), 0.0, 1.0)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, size: int, radius: float,
             rng: np.random.Generator) -> np.ndarray:
    """Pattern value in [0, 1] per pixel (0: first colour, 1: second) in the shape's rotated frame (u, v)."""
    tau = 2 * math.pi
    if name == "solid":
        return np.zeros_like(u)
    if name in ("stripes", "fine_stripes"):
        period = size / (8 if name == "stripes" else 28)
        return _square_wave(tau * u / period)
    if name in ("checker", "fine_checker"):
        period = size / (7 if name == "checker" else 22)
        return _square_wave(tau * u / period) * _square_wave(tau * v / period) + \
            (1 - _square_wave(tau * u / period)) * (1 - _square_wave(tau * v / period))
    if name in ("dots", "fine_dots"):
        period = size / (7 if name == "dots" else 18)
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return np.clip(0.28 * period - np.sqrt(du * du + dv * dv) + 0.5, 0.0, 1.0)
    if name == "grid":
        period = size / 7
        half_width = 0.12 * period
        du, dv = np.abs(np.mod(u, period) - period / 2), np.abs(np.mod(v, period) - period / 2)
        return np.clip(half_width - np.minimum(du, dv) + 0.5, 0.0, 1.0)
    if name == "rings":
        return _square_wave(tau * np.sqrt(u * u + v * v) / (size / 12))
    if name == "gradient":
        return np.clip(0.5 + u / (2 * radius), 0.0, 1.0)
    if name == "waves":
        return _square_wave(tau * (u + size / 30 * np.sin(tau * v / (size / 5))) / (size / 9))
    if name == "speckle":
        h, w = u.shape
        cells = (rng.random(((h + 1) // 2, (w + 1) // 2)) > 0.5).astype(np.float32)
        return np.repeat(np.repeat(cells, 2, axis=0), 2, axis=1)[:h, :w]
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------- images


def _luminance(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two background colours and two fill colours with enough contrast to see the shape and its pattern."""
    while True:
        bg_a, bg_b, fg1, fg2 = rng.random((4, 3), dtype=np.float32)
        bg_b = 0.6 * bg_a + 0.4 * bg_b  # a gentle gradient
        bg = _luminance((bg_a + bg_b) / 2)
        if (abs(_luminance(fg1) - _luminance(fg2)) >= 0.3 and abs(_luminance(fg1) - bg) >= 0.2
                and abs(_luminance(fg2) - bg) >= 0.2):
            return bg_a, bg_b, fg1, fg2


def render_image(kind: str, class_index: int, index: int, image_size: int = 160, seed: int = 0,
                 split: str = "train") -> Image.Image:
    """Draw image `index` of class `class_index` of a demo set (the same arguments give the same pixels).

    The longer side is image_size, the shorter between 0.75x and 1x of it.
    """
    shape, pattern = _combos(kind)[class_index]
    rng = np.random.default_rng([seed, KINDS.index(kind), SPLITS.index(split), class_index, index])
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    w, h = (image_size, short) if rng.random() < 0.5 else (short, image_size)
    bg_a, bg_b, fg1, fg2 = _colours(rng)

    # Broadcast coordinates: (H, 1) and (1, W); expressions in both give (H, W).
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    phi = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(phi) + yy * math.sin(phi)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = bg_a + (bg_b - bg_a) * t[..., None]  # (H, W, 3)
    for _ in range(2):  # soft blobs of light and shade
        fx, fy = rng.uniform(0.5, 2.0, 2) * 2 * math.pi / image_size
        img = img + 0.08 * np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * math.pi))[..., None]

    # Clutter: thin lines in the background colours' range, so edges alone do not give the shape away.
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 8))):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
    img = np.asarray(canvas, dtype=np.float32) / 255.0

    radius = rng.uniform(0.22, 0.42) * min(w, h)
    margin = 0.8 * radius
    cx = rng.uniform(margin, max(margin, w - margin))
    cy = rng.uniform(margin, max(margin, h - margin))
    mask = _shape_mask(shape, w, h, cx, cy, radius, rng.uniform(0, 2 * math.pi))

    psi = rng.uniform(0, 2 * math.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(psi) + dy * math.sin(psi) + rng.uniform(0, image_size)
    v = -dx * math.sin(psi) + dy * math.cos(psi) + rng.uniform(0, image_size)
    if pattern in ("rings", "gradient"):  # centred on the shape
        u, v = dx * math.cos(psi) + dy * math.sin(psi), -dx * math.sin(psi) + dy * math.cos(psi)
    p = _pattern(pattern, u, v, image_size, radius, rng)[..., None]
    fill = fg1 * (1 - p) + fg2 * p
    img = img * (1 - mask[..., None]) + fill * mask[..., None]
    img = img + (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.1  # sensor-like noise, std ~0.03
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


@dataclass
class DemoSet:
    images: list[Image.Image]
    labels: list[int]
    class_names: list[str]


def generate_demo(kind: str = "pretrain", num_classes: int | None = None, per_class: int | None = None,
                  image_size: int | None = None, seed: int = 0, split: str = "train") -> DemoSet:
    """Draw a whole demo split in memory: per_class images of each of the first num_classes classes.

    Defaults (DEFAULTS): pretrain 100 classes, transfer 12; 60 train / 10 (pretrain) or 20 (transfer) val
    images per class; 160 px. `python -m shards write demo pretrain OUT` writes the same images as shards.
    """
    if split not in SPLITS:
        raise ShardError(f"unknown demo split {split!r}; choose one of: {', '.join(SPLITS)}")
    names = class_names(kind, num_classes)
    d = DEFAULTS[kind]
    per_class = (d["per_class"] if split == "train" else d["val_per_class"]) if per_class is None else per_class
    image_size = d["image_size"] if image_size is None else image_size
    images, labels = [], []
    for c in range(len(names)):
        for i in range(per_class):
            images.append(render_image(kind, c, i, image_size, seed, split))
            labels.append(c)
    return DemoSet(images, labels, names)
