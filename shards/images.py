"""Decode, check and reduce one image: everything leaves here as RGB JPEG bytes, or as a BadImage."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

from .format import fit_size

# Very large photos are legitimate in ImageNet-21k; the draft decode below keeps them cheap. The hard limit
# still guards against decompression bombs.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


# jpg_small's longer side is --small-copy N, or down to SMALL_SLACK * N when libjpeg's DCT scaling gets there.
SMALL_SLACK = 0.9


class BadImage(Exception):
    """An image that cannot be used (zero bytes, undecodable, truncated); the message is the reason."""


@dataclass
class Reduced:
    jpg: bytes
    size: tuple[int, int]
    """Original (width, height)."""
    small: Optional[bytes]
    """The second, smaller JPEG; None when not asked for or when the image is already that small."""


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: transparency over white, 16-bit scaled to 8-bit, CMYK / L / P converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I"):
        # 16-bit (and 32-bit integer) grayscale: convert("RGB") would clip everything above 255 to white.
        arr = np.asarray(img).astype(np.int64)
        arr = np.clip(arr, 0, 65535) >> 8 if arr.max(initial=0) > 255 else np.clip(arr, 0, 255)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        hi = float(arr.max(initial=0.0))
        arr = arr * (255.0 / hi) if hi > 1.0 else arr * 255.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def reduce_image(data: bytes, max_side: int = 512, quality: int = 90, small_side: int = 0) -> Reduced:
    """Check one encoded image and return it as RGB JPEG with the longer side at most max_side.

    An RGB JPEG that already fits keeps its original bytes; anything else (too large, PNG / WebP, CMYK,
    grayscale, palette) is decoded, converted, downscaled (aspect kept) and re-encoded at `quality`.
    Every image is entropy-decoded in full once, so truncated files are caught here rather than in training.
    `small_side` > 0 adds `small`, the image with its longer side at small_side (or down to SMALL_SLACK times
    that, when DCT scaling gets there) for images larger than that.
    """
    if not data:
        raise BadImage("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        width, height = img.size
        target = fit_size(width, height, max_side)
        keep_bytes = fmt == "JPEG" and img.mode == "RGB" and target == (width, height)
        small_size = fit_size(*target, small_side) if 0 < small_side < max(target) else None
        # Decode only the pixels needed: the re-encoded size, or for a kept original just enough for the small
        # copy (or nothing beyond checking the data). libjpeg then scales by 1/2, 1/4 or 1/8 in the DCT, never
        # below the requested size; every coefficient is still entropy-decoded, so damaged data is still caught.
        if keep_bytes:
            need = fit_size(*target, int(small_side * SMALL_SLACK)) if small_size else (1, 1)
        else:
            need = target
        if fmt == "JPEG" and img.mode in ("RGB", "L") and need != (width, height):
            img.draft(img.mode, need)
        img.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadImage(f"undecodable ({type(e).__name__}: {e})") from None
    if width < 1 or height < 1:
        raise BadImage(f"empty image ({width}x{height})")

    try:
        rgb = to_rgb(img)
        if keep_bytes:
            jpg = data
        else:
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.BICUBIC)
            jpg = encode_jpeg(rgb, quality)
        small = None
        if small_size is not None:
            # A DCT-scaled decode that already lands within the slack (500x375 at 1/2 -> 250x188 for 256) is
            # used as is: no resize, which would cost more than the decode itself.
            fits = small_side * SMALL_SLACK <= max(rgb.size) <= small_side
            small = encode_jpeg(rgb if fits else rgb.resize(small_size, Image.Resampling.BICUBIC), quality)
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot convert ({type(e).__name__}: {e})") from None
    return Reduced(jpg=jpg, size=(width, height), small=small)
