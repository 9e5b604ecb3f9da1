"""Image decoding: full RGB decode, and crop-aware reduced-size decode straight to a resized uint8 tensor.

Entropy (Huffman) decoding dominates JPEG decode time and does not shrink with DCT scaling, so the biggest saving
comes from decoding fewer bytes: the shard toolkit stores a second, smaller copy of large images (``jpg_small``,
max side ~256). The crop box is chosen first, in original-image coordinates, from the JPEG header alone; then the
image is decoded from the cheapest source that still holds the crop at the target size or larger:

1. ``jpg_small`` when the crop, scaled into it, is at least the target size in both dimensions;
2. otherwise the original with DCT scaling by 1/2, 1/4 or 1/8, the largest factor that keeps the crop at least
   the target size;
3. otherwise a full decode.

So the crop is never upsampled more than a full decode would upsample it: a reduced source is used only when the
crop needs no upsampling from it at all. The crop box is rounded to whole pixels of the source it is cut from,
which moves each edge by at most half a source pixel (one original pixel for a half-size copy).

Decoders (``data.decoder``; ``auto`` takes the first one installed, chosen once when a transform is built):

- ``simplejpeg``: libjpeg-turbo 3 bundled in its wheel; DCT-scaled decodes are ~1.5x faster than PIL's ``draft``
  and a full decode ~25% faster than PIL's. libjpeg-turbo also scales by 3/8, 5/8, 3/4 and 7/8, but measured on
  500x375 photos those take as long as a full decode or longer (no SIMD IDCT for them), so only 1/2, 1/4, 1/8
  are used.
- ``torchvision``: its libjpeg-turbo decoder for full-size decodes (no DCT scaling: scaled decodes go to PIL).
- ``pil``: PIL with ``draft`` for DCT scaling.

Whatever the decoder, data it refuses (a JPEG flavour it does not read, corrupt bytes) goes to PIL, which either
decodes it or raises :class:`DecodeError` naming the sample; except damage simplejpeg's strict mode reports
("Corrupt JPEG data", "Premature end"), which PIL would decode into garbage without a word: that is a
DecodeError at once. Most damage inside entropy-coded data decodes without any warning in every decoder: only
the shard checksums find it (``data.verify_checksums``, shards/README.md). A header claiming more pixels than
``PIL.Image.MAX_IMAGE_PIXELS`` is refused before any decode (a decompression bomb).
Decoding only the crop's region (stopping after its last MCU row, skipping the columns outside it) needs
TurboJPEG 3's cropping-region API, which no maintained Python binding exposes yet (PyTurboJPEG 2 wraps only its
lossless crop transform, which costs a full entropy decode plus a re-encode: measured no faster than a full
decode); see BENCHMARKS.md.
"""

from __future__ import annotations

import io
import struct
from typing import Mapping, NamedTuple, Optional

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.config import ConfigError

try:
    # torchvision's libjpeg-turbo decoder writes straight into a tensor: ~15% faster than PIL for a full-size
    # decode. torchvision 0.29 deprecates its image codecs (in favour of TorchCodec, not a dependency here); we
    # keep using it while it exists, silence that one warning, and fall back to PIL when it is gone.
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.io.image import _has_image_ops

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    TV_DECODE = bool(_has_image_ops())
except ImportError:  # pragma: no cover - depends on the torchvision release
    TV_DECODE = False

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; missing only in hand-made environments
    simplejpeg = None

DECODERS = ("simplejpeg", "torchvision", "pil")
_SCALES = (8, 4, 2)  # DCT scaling denominators worth using (see the module docstring)


def available_decoders() -> list[str]:
    """The decoders this environment has, fastest first."""
    have = {"simplejpeg": simplejpeg is not None, "torchvision": TV_DECODE, "pil": True}
    return [name for name in DECODERS if have[name]]


def resolve_decoder(name: str = "auto") -> str:
    """``data.decoder`` -> the decoder used: ``auto`` is the fastest installed one; a named one must be installed."""
    have = available_decoders()
    if name == "auto":
        return have[0]
    if name not in DECODERS:
        raise ConfigError(f"data.decoder={name!r} is not a decoder: use auto, {', '.join(DECODERS)}")
    if name not in have:
        fix = "pip install simplejpeg" if name == "simplejpeg" else "a torchvision built with its image ops"
        raise ConfigError(f"data.decoder={name}: not available in this environment ({fix}, or data.decoder=auto)")
    return name


def describe_decoder(name: str) -> str:
    """One line for the start-up log: which decoder, which version, what it does."""
    if name == "simplejpeg":
        return f"simplejpeg {simplejpeg.__version__} (libjpeg-turbo; DCT scaling 1/2, 1/4, 1/8)"
    if name == "torchvision":
        return (f"torchvision {torchvision.__version__} (libjpeg-turbo) full-size, PIL {PIL.__version__} draft "
                "scaling")
    return f"PIL {PIL.__version__} (draft DCT scaling 1/2, 1/4, 1/8)"

# What PIL raises for corrupt, truncated or hostile data (struct.error / IndexError: malformed headers). These
# become DecodeError, which the loader counts and skips.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError, IndexError, struct.error)

Box = tuple[int, int, int, int]
"""(top, left, height, width) in pixels of the original image."""


class DecodeError(ValueError):
    """A sample's image cannot be decoded (corrupt, truncated, not an image, missing)."""


# libjpeg's warnings for damaged entropy data or a cut file. simplejpeg's strict mode raises them; PIL would then
# decode the same bytes into garbage without a word, so these are final, not a reason to try PIL.
_CORRUPT_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")


def _check_pixels(size: tuple[int, int], what: str) -> None:
    """Refuse a header claiming more pixels than PIL's limit (a decompression bomb), before any decode."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise DecodeError(f"{what}: the header claims {size[0]}x{size[1]} pixels, above the limit {limit} "
                          "(PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb or a damaged header")


def _image_bytes(sample: Mapping, key: str) -> Optional[bytes]:
    data = sample.get(key)
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise DecodeError(f"sample {sample.get('__key__', '?')}: field '{key}' is {type(data).__name__}, expected "
                      "the encoded image bytes (do not decode images in the webdataset pipeline)")


def _open(data: bytes, what: str) -> Image.Image:
    """Parse the header only (no pixel decode)."""
    try:
        return Image.open(io.BytesIO(data))
    except _PIL_ERRORS as e:
        raise DecodeError(f"{what}: cannot read the image header: {e}") from e


def decode_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises DecodeError for corrupt or truncated data."""
    im = _open(bytes(data), "image")
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except _PIL_ERRORS as e:
        raise DecodeError(f"image: cannot decode: {e}") from e


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): they carry the size.
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) read from a JPEG's start-of-frame segment, or None if ``data`` does not look like one.

    A few microseconds instead of PIL's ~15 (which parses every table in Python); the crop box needs only the
    size. None makes the caller fall back to PIL, which then names the actual problem.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker == 0xDA or marker == 0xD9:  # scan data or end of image before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > n or length < 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return (width, height)
        pos += 2 + length
    return None


def _header(data: bytes, what: str) -> tuple[tuple[int, int], bool]:
    """(width, height) and whether it is a JPEG, without decoding pixels; raises DecodeError if unreadable."""
    size = jpeg_size(data)
    if size is not None:
        return size, True
    im = _open(data, what)
    return im.size, im.format == "JPEG"


class SampleImage:
    """The images of one sample, headers parsed, pixels not yet decoded.

    ``size`` is (width, height) of the original; ``decode_crop`` decodes a box of it at a target size.
    """

    def __init__(self, sample: Mapping):
        self.key = str(sample.get("__key__", "?"))
        data = _image_bytes(sample, "jpg")
        if data is None:
            raise DecodeError(f"sample {self.key}: no 'jpg' field (keys: {sorted(k for k in sample)})")
        self._data = data
        self._small_data = _image_bytes(sample, "jpg_small")
        self.size, self.is_jpeg = _header(data, f"sample {self.key}")
        if self.size[0] < 1 or self.size[1] < 1:
            raise DecodeError(f"sample {self.key}: image has size {self.size}")
        _check_pixels(self.size, f"sample {self.key}")

    def _small_size(self) -> Optional[tuple[int, int]]:
        if self._small_data is None:
            return None
        try:
            size, is_jpeg = _header(self._small_data, f"sample {self.key} (jpg_small)")
            _check_pixels(size, f"sample {self.key} (jpg_small)")
        except DecodeError:
            return None  # the original is still usable: a broken small copy only costs speed
        return size if is_jpeg and size[0] > 0 and size[1] > 0 else None

    def plan(self, box: Box, out_size: tuple[int, int], reduced: bool) -> "DecodePlan":
        """Choose the source ('jpg' or 'jpg_small') and the DCT scale denominator (1, 2, 4 or 8) for a crop."""
        _, _, h, w = box
        th, tw = out_size
        plan = DecodePlan("jpg", self._data, self.is_jpeg, 1.0, 1.0, 1, self.size)
        if reduced:
            small = self._small_size()
            if small is not None:
                sx, sy = small[0] / self.size[0], small[1] / self.size[1]
                if h * sy >= th and w * sx >= tw:
                    plan = DecodePlan("jpg_small", self._small_data, True, sx, sy, 1, small)
            if plan.is_jpeg:
                for k in _SCALES:
                    if h * plan.sy / k >= th and w * plan.sx / k >= tw:
                        plan = plan._replace(scale=k)
                        break
        return plan

    def decode_crop(self, box: Box, out_size: tuple[int, int], *, reduced: bool = True,
                    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                    decoder: Optional[str] = None) -> torch.Tensor:
        """Decode ``box`` (top, left, height, width in original pixels) resized to ``out_size`` (height, width).

        Returns a uint8 tensor (3, H, W) (channels-last strides). Raises DecodeError if the data is corrupt.
        ``decoder``: one of :data:`DECODERS` (None: the fastest installed).
        """
        plan = self.plan(box, out_size, reduced)
        pixels, scale = self.decode_plan(plan, decoder)  # (3, h_src, w_src) uint8
        return crop_resize(pixels, box, plan.sx / scale, plan.sy / scale, out_size, interpolation)

    def decode_plan(self, plan: "DecodePlan", decoder: Optional[str] = None) -> tuple[torch.Tensor, int]:
        """Pixels of the planned source as uint8 (3, h, w), and the DCT scale actually used."""
        decoder = decoder or DEFAULT_DECODER
        what = f"sample {self.key} ({plan.source})"
        tv_error = None
        if decoder == "simplejpeg" and plan.is_jpeg:
            sw, sh = plan.size
            k = plan.scale
            try:
                # min_width / min_height = the 1/k size: libjpeg-turbo's smallest scaling factor that reaches it
                arr = simplejpeg.decode_jpeg(plan.data, colorspace="RGB", min_width=-(-sw // k),
                                             min_height=-(-sh // k))
            except ValueError as e:  # corrupt, or a flavour libjpeg-turbo's RGB output refuses (CMYK): PIL decides
                tv_error = str(e).splitlines()[-1] if str(e) else type(e).__name__
                if tv_error.startswith(_CORRUPT_WARNINGS):
                    raise DecodeError(f"{what}: cannot decode: {tv_error}") from e
            else:
                if arr.shape[:2] == (-(-sh // k), -(-sw // k)):
                    return torch.from_numpy(arr).permute(2, 0, 1), k
                tv_error = f"scaled to {arr.shape[1]}x{arr.shape[0]}, not 1/{k}"  # tiny images: decode in full
                plan = plan._replace(scale=1)
        elif decoder == "torchvision" and plan.scale == 1 and plan.is_jpeg:
            try:
                return decode_jpeg(torch.frombuffer(bytearray(plan.data), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB), 1
            except RuntimeError as e:  # corrupt, or a JPEG flavour only PIL reads: PIL decides below
                tv_error = str(e).splitlines()[-1]
        im = _open(plan.data, what)
        scale = 1
        if plan.scale > 1:
            full_w = im.size[0]
            # PIL picks the largest of 8/4/2/1 that keeps the image at least the requested size, which for a
            # request of floor(W / k) is exactly k; read it back anyway rather than trust the arithmetic.
            drafted = im.draft("RGB", (im.size[0] // plan.scale, im.size[1] // plan.scale))
            if drafted is not None:
                scale = round(full_w / drafted[1][2])
        try:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
        except _PIL_ERRORS as e:
            extra = f" ({decoder}: {tv_error})" if tv_error else ""
            raise DecodeError(f"{what}: cannot decode: {e}{extra}") from e
        return pil_to_tensor(im), scale


DEFAULT_DECODER = resolve_decoder("auto")


class DecodePlan(NamedTuple):
    source: str
    """'jpg' or 'jpg_small'."""
    data: bytes
    is_jpeg: bool
    sx: float
    """Source pixels per original pixel, horizontally (1 for the original)."""
    sy: float
    scale: int
    """DCT scaling denominator: the source is decoded at 1/scale."""
    size: tuple[int, int]
    """(width, height) of the source."""


def crop_resize(pixels: torch.Tensor, box: Box, sx: float, sy: float, out_size: tuple[int, int],
                interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> torch.Tensor:
    """Cut ``box`` (original-image pixels) out of a decoded source whose pixels per original pixel are (sx, sy)
    and resize it to ``out_size``; uint8 (3, H, W) in and out."""
    top, left, h, w = box
    hs, ws = pixels.shape[-2:]
    # Whole source pixels: each edge moves by at most half a source pixel.
    y0 = min(max(round(top * sy), 0), hs - 1)
    x0 = min(max(round(left * sx), 0), ws - 1)
    y1 = min(max(round((top + h) * sy), y0 + 1), hs)
    x1 = min(max(round((left + w) * sx), x0 + 1), ws)
    crop = pixels[:, y0:y1, x0:x1]
    if (y1 - y0, x1 - x0) == tuple(out_size):
        return crop
    # uint8 in, uint8 out: torch's antialiased bilinear has a fast uint8 kernel for channels-last input. A
    # strided crop view is not channels-last contiguous, so torch would allocate a CHW output and repack it;
    # copying the crop first halves the resize at 384 px and keeps the result HWC-ordered for the PIL step.
    crop = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    if interpolation != InterpolationMode.BILINEAR:
        return F.resize(crop, list(out_size), interpolation=interpolation, antialias=True)[0]
    # What torchvision's resize does for uint8 bilinear on CPU (torch's native uint8 antialiased kernel; the
    # output stays channels-last), without its dispatch layers (~0.1 ms per call).
    return torch.nn.functional.interpolate(crop, size=list(out_size), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) owning a copy of the pixels (HWC memory, channels-last strides)."""
    arr = np.array(im, dtype=np.uint8, copy=True)  # writable copy: torch refuses to wrap read-only buffers
    return torch.from_numpy(arr).permute(2, 0, 1)


def tensor_to_pil(x: torch.Tensor, flip: bool = False) -> Image.Image:
    """uint8 tensor (3, H, W) -> RGB PIL image, optionally mirrored left-right on the way."""
    hwc = x.permute(1, 2, 0)
    if flip:
        hwc = hwc.flip(1)
    return Image.fromarray(np.ascontiguousarray(hwc.numpy()))  # (H, W, 3) uint8 -> mode RGB


def centre_crop_box(size: tuple[int, int], crop: int) -> Box:
    """A (top, left, crop, crop) box centred as the EfficientNetV2 code does: offset (dim - crop) // 2."""
    w, h = size
    crop = max(1, min(crop, w, h))
    return ((h - crop) // 2, (w - crop) // 2, crop, crop)


def full_box(size: tuple[int, int]) -> Box:
    w, h = size
    return (0, 0, h, w)
