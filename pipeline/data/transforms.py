"""Per-sample train / eval transforms at a stage's image size and RandAugment magnitude.

``TrainTransform(cfg.data, image_size, randaug_magnitude)(sample) -> (3, S, S) float32``: random-resized crop
(box chosen from the JPEG header, then a crop-aware reduced-size decode, see ``decode.py``), horizontal flip,
RandAugment on uint8 pixels, optional cutout, normalisation with ``data.mean`` / ``data.std``.
``EvalTransform(cfg.data, image_size)``: the reference's eval geometry (centre crop with ratio
size / (size + 32) below ``data.eval_crop_threshold``, else the whole image resized), same decode and
normalisation.

Randomness comes only from torch's global RNG (the streaming loader seeds it per sample from (seed, epoch, key),
so augmentation is reproducible on resume whatever the worker count). Decode problems raise
:class:`DecodeError` for the loader to count and skip.

Where the time goes (one core, 500x375 photo JPEGs, see bench/loader.py): decoding dominates, so the crop decides
the source (stored small copy / DCT-scaled / full) before anything is decoded; the resize runs on uint8 tensors
(torch's antialiased uint8 path is ~3x faster than PIL's); RandAugment runs through torchvision's own ops on a PIL
image, because its geometric ops and sharpness are 5-10x faster on PIL than on tensors (which go through float
grid_sample / conv), and the uint8 <-> PIL hand-over costs a few microseconds.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from pipeline.config import DataConfig
from pipeline.data.decode import (
    DecodeError,
    SampleImage,
    centre_crop_box,
    decode_rgb,
    full_box,
    pil_to_tensor,
    resolve_decoder,
    tensor_to_pil,
)

__all__ = ["TrainTransform", "EvalTransform", "RandAugment", "Normalize", "DecodeError", "decode_rgb",
           "eval_crop_box"]

# Ops whose value is a factor around 1 (torchvision applies 1 + v); a factor below 0 is undefined.
_ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
# Translation beyond this fraction of the side would move the picture out of the frame entirely.
_MAX_TRANSLATE_FRACTION = 0.9


class RandAugment(v2.RandAugment):
    """torchvision's RandAugment with the magnitude on the continuous 0-10 scale of the paper, >10 allowed.

    The op list, the op and sign sampling (torch global RNG) and the pixel ops are torchvision's. What it cannot
    express is the magnitude: it indexes a table of ``num_magnitude_bins`` values from 0 to each op's maximum,
    so the index can never exceed the maximum and must be an integer, while the paper's schedules use values
    like 8.33 or 25 (TF ``_MAX_LEVEL`` = 10; "above 10 means stronger than nominal"). Here each op's value is
    the straight line through torchvision's own level-0 and level-10 values (``num_magnitude_bins=11``),
    evaluated at the magnitude: rotate = m / 10 * 30 degrees, shear = m / 10 * 0.3, enhance factors
    1 +- m / 10 * 0.9, posterize 8 - 0.4 m bits, solarize threshold (1 - m / 10) of the range, translate
    m / 10 * 0.45 of the side. For m <= 10 this equals torchvision at 11 bins; above 10 the line is extended
    and clamped where an op runs out of range: enhance factors at 0, posterize at 1 bit, solarize threshold at
    0 (full inversion), translation at 0.9 of the side (the picture never leaves the frame entirely).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, fill: Sequence[int] | int = 128,
                 interpolation: InterpolationMode = InterpolationMode.NEAREST):
        if magnitude < 0:
            raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}")
        fill_value = list(fill) if isinstance(fill, Sequence) else fill
        super().__init__(num_ops=num_ops, magnitude=0, num_magnitude_bins=11, interpolation=interpolation,
                         fill=fill_value)
        self.level = float(magnitude)
        self._cache: dict[tuple[str, int, int], Optional[float]] = {}

    def op_value(self, op: str, height: int, width: int) -> Optional[float]:
        """The unsigned value of ``op`` at this magnitude for an image of the given size (None: no value)."""
        key = (op, height, width)
        if key not in self._cache:
            table_fn, _ = self._AUGMENTATION_SPACE[op]
            table = table_fn(self.num_magnitude_bins, height, width)
            if table is None:
                value = None
            else:
                if self.level.is_integer() and self.level <= 10:
                    value = float(table[int(self.level)])  # bit-identical to torchvision at 11 bins
                else:
                    v0, v10 = float(table[0]), float(table[10])
                    value = v0 + (v10 - v0) * self.level / 10.0
                if op == "Posterize":
                    value = float(min(8, max(1, round(value))))
                elif op == "Solarize":
                    value = min(1.0, max(0.0, value))
                elif op == "TranslateX":
                    value = min(value, _MAX_TRANSLATE_FRACTION * width)
                elif op == "TranslateY":
                    value = min(value, _MAX_TRANSLATE_FRACTION * height)
            self._cache[key] = value
        return self._cache[key]

    def forward(self, *inputs):
        flat_inputs_with_spec, image = self._flatten_and_extract_image_or_video(inputs)
        height, width = v2.functional.get_size(image)
        for _ in range(self.num_ops):
            op, (_, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            value = self.op_value(op, height, width)
            if value is None:
                value = 0.0
            elif signed and torch.rand(()) <= 0.5:
                value = -value
            if op in _ENHANCE_OPS:
                value = max(value, -1.0)  # factor 1 + value stays >= 0
            image = self._apply_image_or_video_transform(image, op, value, interpolation=self.interpolation,
                                                         fill=self._fill)
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, image)

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.level:g} (0-10 scale)"


class Normalize:
    """uint8 (3, H, W) -> float32 (3, H, W), contiguous, (x / 255 - mean) / std in one pass."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32)
        out.copy_(x)
        return out.mul_(self.scale).add_(self.shift)


def _fill_value(mean: Sequence[float]) -> list[int]:
    # The mean colour normalises to 0: padding from rotations / translations / cutout carries no signal.
    return [int(round(255 * m)) for m in mean]


class TrainTransform:
    """Training transform of one stage: sample dict -> normalised (3, S, S) float32 tensor.

    Steps: random-resized crop (area ``cfg.crop_area``, aspect ``cfg.crop_ratio``) chosen in original-image
    coordinates from the header, reduced-size decode of that crop when ``cfg.reduced_decode`` (see
    decode.py), resize to S x S (antialiased bilinear on uint8), horizontal flip with probability
    ``cfg.hflip``, RandAugment (``cfg.randaug_ops`` ops at ``randaug_magnitude``; 0 disables it), cutout of a
    ``cfg.cutout`` px square (0 disables), normalisation. The RNG calls are the same with and without reduced
    decode, so the two give the same crop geometry for the same seed.
    """

    def __init__(self, cfg: DataConfig, image_size: int, randaug_magnitude: float):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.out_size = (self.image_size, self.image_size)
        self.randaug_magnitude = float(randaug_magnitude)
        self.reduced_decode = cfg.reduced_decode
        self.decoder = resolve_decoder(cfg.decoder)
        self.hflip = float(cfg.hflip)
        self.cutout = int(cfg.cutout)
        self.fill = _fill_value(cfg.mean)
        self._cutout_fill = torch.tensor(self.fill, dtype=torch.uint8).view(3, 1, 1)
        self.crop_area = (float(cfg.crop_area[0]), float(cfg.crop_area[1]))
        self.crop_ratio = (float(cfg.crop_ratio[0]), float(cfg.crop_ratio[1]))
        # float32 logs, as torchvision computes them: the same uniform_ bounds, so the same draws
        self._log_ratio = tuple(float(v) for v in torch.log(torch.tensor(self.crop_ratio)))
        self.randaug = (RandAugment(cfg.randaug_ops, self.randaug_magnitude, fill=self.fill)
                        if self.randaug_magnitude > 0 and cfg.randaug_ops > 0 else None)
        self.normalize = Normalize(cfg.mean, cfg.std)

    def crop_box(self, image: SampleImage) -> tuple[int, int, int, int]:
        """The random-resized-crop box (top, left, height, width), drawn from the image size alone.

        The same torch RNG draws and arithmetic as torchvision's ``RandomResizedCrop`` (so the same box for the
        same seed; tests/test_transforms.py checks it), without its input flattening and size query (~0.1 ms).
        """
        width, height = image.size
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.crop_area).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(*self._log_ratio)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return (top, left, h, w)
        # fallback: a centre crop at the nearest allowed aspect ratio
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.crop_ratio):
            w = width
            h = int(round(w / min(self.crop_ratio)))
        elif in_ratio > max(self.crop_ratio):
            h = height
            w = int(round(h * max(self.crop_ratio)))
        else:
            w, h = width, height
        return ((height - h) // 2, (width - w) // 2, h, w)

    def augment_uint8(self, sample: Mapping) -> torch.Tensor:
        """Everything but the normalisation: uint8 (3, S, S)."""
        image = SampleImage(sample)
        box = self.crop_box(image)
        x = image.decode_crop(box, self.out_size, reduced=self.reduced_decode, decoder=self.decoder)
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        if self.randaug is not None:
            pil = self.randaug(tensor_to_pil(x, flip=flip))
            x = pil_to_tensor(pil)
        elif flip:
            x = x.flip(-1)
        if self.cutout > 0:
            x = self._cutout(x)
        return x

    def _cutout(self, x: torch.Tensor) -> torch.Tensor:
        # A square of side cfg.cutout centred uniformly in the image, clipped at the borders (as the TF code).
        h, w = x.shape[-2:]
        cy = int(torch.randint(h, ()))
        cx = int(torch.randint(w, ()))
        half = self.cutout // 2
        y0, y1 = max(0, cy - half), min(h, cy - half + self.cutout)
        x0, x1 = max(0, cx - half), min(w, cx - half + self.cutout)
        x = x.clone()
        x[:, y0:y1, x0:x1] = self._cutout_fill
        return x

    def __call__(self, sample: Mapping) -> torch.Tensor:
        return self.normalize(self.augment_uint8(sample))

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, randaug={self.randaug_magnitude:g}, "
                f"reduced_decode={self.reduced_decode}, decoder={self.decoder}, cutout={self.cutout})")


def eval_crop_box(size: tuple[int, int], image_size: int, crop_threshold: int) -> tuple[int, int, int, int]:
    """The reference eval geometry: below the threshold a centre square of int(S / (S + 32) * short side),
    else the whole image. ``size`` is (width, height); returns (top, left, height, width)."""
    if image_size < crop_threshold:
        return centre_crop_box(size, int(image_size / (image_size + 32) * min(size)))
    return full_box(size)


class EvalTransform:
    """Eval transform: sample dict -> normalised (3, S, S) float32 tensor.

    Geometry of the EfficientNetV2 code (``preprocess_for_eval``): below ``cfg.eval_crop_threshold`` a centre
    square of int(S / (S + 32) * short side), else the whole image, resized to S x S (bilinear, as there, but
    antialiased). The same reduced-size decode as training applies when the crop allows it.
    """

    def __init__(self, cfg: DataConfig, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.out_size = (self.image_size, self.image_size)
        self.crop_threshold = int(cfg.eval_crop_threshold)
        self.reduced_decode = cfg.reduced_decode
        self.decoder = resolve_decoder(cfg.decoder)
        self.normalize = Normalize(cfg.mean, cfg.std)

    def uint8(self, sample: Mapping) -> torch.Tensor:
        image = SampleImage(sample)
        box = eval_crop_box(image.size, self.image_size, self.crop_threshold)
        return image.decode_crop(box, self.out_size, reduced=self.reduced_decode, decoder=self.decoder)

    def __call__(self, sample: Mapping) -> torch.Tensor:
        return self.normalize(self.uint8(sample))

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, crop_threshold={self.crop_threshold})"
