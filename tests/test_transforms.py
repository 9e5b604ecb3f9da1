"""Train / eval transforms: crop-aware reduced decode keeps the geometry, RandAugment scale, eval crop, errors."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data.decode import (
    DECODERS,
    SampleImage,
    available_decoders,
    crop_resize,
    describe_decoder,
    jpeg_size,
    resolve_decoder,
)
from pipeline.data.transforms import DecodeError, EvalTransform, RandAugment, TrainTransform, decode_rgb, eval_crop_box

# We use torchvision's JPEG decoder knowingly while it exists (see decode.py); pytest resets warning filters.
# Transforms run in single-threaded loader workers; intra-op threads only add contention on tiny images.
pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _small(img: Image.Image, side: int = 256) -> bytes:
    scale = side / max(img.size)
    return _jpeg(img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def photos():
    """Real photographs (scikit-learn's two samples) cut to 500x375 and 1000x750."""
    from sklearn.datasets import load_sample_images

    rng = random.Random(0)
    out = []
    for arr in load_sample_images().images:  # 640 x 427 each
        src = Image.fromarray(arr)
        for size in ((500, 375), (1000, 750)):
            x0, y0 = rng.randint(0, 80), rng.randint(0, 7)
            img = src.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + 560, y0 + 420))
            out.append(img)
    return out


def sample_of(img: Image.Image, small: bool = True, key: str = "k") -> dict:
    s = {"__key__": key, "jpg": _jpeg(img), "cls": b"3", "json": {}}
    if small and max(img.size) > 256:
        s["jpg_small"] = _small(img)
    return s


def run(tf, sample, seed):
    torch.manual_seed(seed)
    return tf.augment_uint8(sample) if isinstance(tf, TrainTransform) else tf(sample)


def test_train_output_shape_dtype_and_normalisation(photos):
    cfg = DataConfig()
    for size in (64, 128, 200):
        tf = TrainTransform(cfg, size, randaug_magnitude=10)
        x = tf(sample_of(photos[0]))
        assert x.shape == (3, size, size) and x.dtype == torch.float32 and x.is_contiguous()
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5
    cfg2 = DataConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    tf2 = TrainTransform(cfg2, 96, 0)
    torch.manual_seed(1)
    u8 = tf2.augment_uint8(sample_of(photos[1])).float()
    torch.manual_seed(1)
    x2 = tf2(sample_of(photos[1]))
    expect = (u8 / 255 - torch.tensor(cfg2.mean).view(3, 1, 1)) / torch.tensor(cfg2.std).view(3, 1, 1)
    assert torch.allclose(x2, expect, atol=1e-5)


def test_train_is_deterministic_given_the_global_rng(photos):
    tf = TrainTransform(DataConfig(), 128, 15)
    s = sample_of(photos[0])
    assert torch.equal(run(tf, s, 7), run(tf, s, 7))
    assert not torch.equal(run(tf, s, 7), run(tf, s, 8))


@pytest.mark.parametrize("decoder", available_decoders())
def test_reduced_decode_keeps_the_crop_geometry(photos, decoder):
    """Same seeds, with and without reduced decode: the same crops, pixels differ only by resampling."""
    on = TrainTransform(DataConfig(reduced_decode=True, decoder=decoder), 128, 0)
    off = TrainTransform(DataConfig(reduced_decode=False, decoder=decoder), 128, 0)
    sources, diffs, shifted = set(), [], []
    for img in photos:
        for small in (True, False):
            s = sample_of(img, small=small)
            for seed in range(12):
                torch.manual_seed(seed)
                image = SampleImage(s)
                box = on.crop_box(image)
                plan = image.plan(box, on.out_size, True)
                sources.add((plan.source, plan.scale))
                a, b = run(on, s, seed).float(), run(off, s, seed).float()
                diffs.append((a - b).abs().mean().item())
                if plan.source != "jpg" or plan.scale > 1:
                    # Control: a crop moved by 3% of its size is clearly different, so the check can fail.
                    top, left, h, w = box
                    moved = (top, min(left + max(2, w // 33), image.size[0] - w), h, w)
                    full = image.decode_plan(image.plan(moved, on.out_size, False), decoder)[0]
                    c = crop_resize(full, moved, 1.0, 1.0, on.out_size).float()
                    flip = b.flip(-1)
                    ref_b = b if (c - b).abs().mean() < (c - flip).abs().mean() else flip
                    shifted.append((c - ref_b).abs().mean().item())
    # The test covers all three decode routes: stored small copy, DCT scaling, full decode.
    assert ("jpg_small", 1) in sources and ("jpg", 1) in sources
    assert any(src == "jpg" and k > 1 for src, k in sources)
    # Mean absolute difference in uint8 levels: ~3 (up to ~6) from resampling a smaller source, against ~17
    # for the same crop moved by 3% of its size.
    assert max(diffs) < 8.0, diffs
    assert np.mean(diffs) < 4.0
    assert np.mean(shifted) > 3 * np.mean(diffs)


def test_crop_box_draws_what_torchvision_draws():
    """TrainTransform samples the box itself (no input flattening); the boxes are torchvision's, draw for draw."""
    cfg = DataConfig()
    tf = TrainTransform(cfg, 128, 0)
    ref = v2.RandomResizedCrop(128, scale=tuple(cfg.crop_area), ratio=tuple(cfg.crop_ratio))

    class Sized:
        def __init__(self, size):
            self.size = size

    fallbacks = 0
    for size in ((500, 375), (375, 500), (64, 48), (1000, 12), (12, 1000), (3, 3)):
        for seed in range(150):
            torch.manual_seed(seed)
            ours = tf.crop_box(Sized(size))
            after_ours = torch.rand(())
            torch.manual_seed(seed)
            p = ref.make_params([torch.empty((0, size[1], size[0]), dtype=torch.uint8)])
            assert ours == (p["top"], p["left"], p["height"], p["width"]), (size, seed)
            assert torch.rand(()) == after_ours  # the same number of draws
            fallbacks += ours[2:] in ((12, 16), (16, 12), (3, 3))  # the centre-crop fallback was exercised
    assert fallbacks > 0


def test_decoder_choice():
    have = available_decoders()
    assert have[-1] == "pil" and set(have) <= set(DECODERS)
    assert resolve_decoder("auto") == have[0]
    for name in have:
        assert resolve_decoder(name) == name and describe_decoder(name).startswith(name.replace("pil", "PIL"))
    with pytest.raises(ValueError, match="data.decoder='turbo'"):
        resolve_decoder("turbo")
    assert "simplejpeg" in have  # a dependency of the package: the fast path is what users get


@pytest.mark.parametrize("decoder", available_decoders())
def test_decoders_give_the_same_pixels(photos, decoder):
    """Every decoder, full size and DCT-scaled, within ~1 level of PIL's decode of the same plan."""
    for img in photos:
        image = SampleImage(sample_of(img, small=False))
        w, h = image.size
        for k in (1, 2, 4, 8):
            plan = image.plan((0, 0, h, w), (h // k, w // k), True)
            assert plan.scale == k
            ours, k_ours = image.decode_plan(plan, decoder)
            ref, k_ref = image.decode_plan(plan, "pil")
            assert k_ours == k_ref == k and ours.shape == ref.shape == (3, -(-h // k), -(-w // k))
            assert (ours.float() - ref.float()).abs().mean() < 1.0, (decoder, k)


def test_reduced_decode_never_upsamples_more_than_a_full_decode(photos):
    cfg = DataConfig()
    for img in photos:
        image = SampleImage(sample_of(img))
        for seed in range(40):
            torch.manual_seed(seed)
            for size in (64, 128, 300):
                tf = TrainTransform(cfg, size, 0)
                box = tf.crop_box(image)
                plan = image.plan(box, (size, size), True)
                _, _, h, w = box
                crop_h, crop_w = h * plan.sy / plan.scale, w * plan.sx / plan.scale
                if h >= size and w >= size:
                    assert crop_h >= size and crop_w >= size  # reduced, but still not upsampled
                else:
                    assert (plan.source, plan.scale) == ("jpg", 1)  # already upsampled: nothing reduced


def test_plan_prefers_the_small_copy_then_dct_scaling(photos):
    big = photos[1]  # 1000 x 750
    image = SampleImage(sample_of(big))
    assert image.plan((0, 0, 750, 1000), (128, 128), True)[:1] == ("jpg_small",)
    assert image.plan((0, 0, 750, 1000), (300, 300), True).scale == 2  # 375 >= 300 at 1/2, small too small
    assert image.plan((0, 0, 600, 600), (128, 128), False)[::5] == ("jpg", 1)
    no_small = SampleImage(sample_of(big, small=False))
    assert no_small.plan((0, 0, 750, 1000), (128, 128), True).scale == 4  # 187 x 250 >= 128; 1/8 too small
    assert no_small.plan((100, 100, 200, 200), (128, 128), True).scale == 1


def test_randaug_matches_torchvision_up_to_10(photos):
    img = photos[0].resize((96, 72))
    for magnitude in (0, 4, 10):
        ours = RandAugment(2, magnitude, fill=128)
        ref = v2.RandAugment(2, magnitude=magnitude, num_magnitude_bins=11, fill=128)
        for seed in range(30):
            torch.manual_seed(seed)
            a = np.asarray(ours(img))
            torch.manual_seed(seed)
            b = np.asarray(ref(img))
            assert np.array_equal(a, b), (magnitude, seed)


def test_randaug_above_10_is_stronger_and_every_op_runs(photos):
    img = photos[0].resize((96, 72))
    base = np.asarray(img).astype(np.float32)

    def strength(m):
        ra = RandAugment(2, m, fill=128)
        total = 0.0
        for seed in range(60):
            torch.manual_seed(seed)
            total += np.abs(np.asarray(ra(img)).astype(np.float32) - base).mean()
        return total / 60

    s5, s10, s20 = strength(5), strength(10), strength(20)
    assert s5 < s10 < s20
    ra = RandAugment(2, 25)
    assert ra.op_value("Rotate", 72, 96) == pytest.approx(75.0)
    assert ra.op_value("ShearX", 72, 96) == pytest.approx(0.75)
    assert ra.op_value("Posterize", 72, 96) == 1  # clamped at 1 bit
    assert ra.op_value("Solarize", 72, 96) == 0  # full inversion
    assert ra.op_value("TranslateX", 72, 96) == pytest.approx(0.9 * 96)  # clamped in the frame
    assert RandAugment(2, 8.5).op_value("Rotate", 72, 96) == pytest.approx(25.5)  # continuous magnitudes
    for op, (_, signed) in ra._AUGMENTATION_SPACE.items():  # every op at 25, both signs: all values valid
        value = ra.op_value(op, 72, 96) or 0.0
        for sign in (1, -1) if signed else (1,):
            v = sign * value
            if op in ("Brightness", "Color", "Contrast", "Sharpness"):
                v = max(v, -1.0)
            out = ra._apply_image_or_video_transform(img, op, v, interpolation=ra.interpolation, fill=ra._fill)
            assert out.size == img.size
    with pytest.raises(ValueError):
        RandAugment(2, -1)


def test_magnitude_zero_disables_randaug(photos):
    assert TrainTransform(DataConfig(), 64, 0).randaug is None
    assert TrainTransform(DataConfig(randaug_ops=0), 64, 10).randaug is None
    assert TrainTransform(DataConfig(), 64, 5).randaug.level == 5


def test_cutout_fills_a_square_with_the_mean(photos):
    tf = TrainTransform(DataConfig(cutout=24), 64, 0)
    for seed in range(5):
        x = run(tf, sample_of(photos[0]), seed)
        filled = (x == 128).all(dim=0)
        assert filled.sum() >= 12 * 12  # at least a clipped quarter of the square
        ys, xs = torch.nonzero(filled, as_tuple=True)
        assert ys.max() - ys.min() < 24 + 1 and xs.max() - xs.min() < 24 + 1


def _gradient_photo(w, h):
    # Red encodes x, green encodes y: after a crop, the edge values give the crop box back.
    xs = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    arr = np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_eval_geometry_centre_crop_and_full_resize():
    assert eval_crop_box((500, 375), 224, 320) == (23, 86, 328, 328)  # int(224/256*375)=328, (375-328)//2
    assert eval_crop_box((500, 375), 384, 320) == (0, 0, 375, 500)
    img = _gradient_photo(500, 375)
    s = {"__key__": "g", "jpg": _jpeg(img, 95), "jpg_small": _small(img)}
    small = EvalTransform(DataConfig(), 224).uint8(s).float()
    assert small.shape == (3, 224, 224)
    # centre crop x in [86, 414) of 500, y in [23, 351) of 375: the edge colours give the box back
    assert small[0, :, 0].mean() == pytest.approx(86 / 499 * 255, abs=4)
    assert small[0, :, -1].mean() == pytest.approx(413 / 499 * 255, abs=4)
    assert small[1, 0, :].mean() == pytest.approx(23 / 374 * 255, abs=4)
    assert small[1, -1, :].mean() == pytest.approx(350 / 374 * 255, abs=4)
    full = EvalTransform(DataConfig(), 384).uint8(s).float()
    assert full.shape == (3, 384, 384)
    assert full[0, :, 0].mean() < 4 and full[0, :, -1].mean() > 251  # the whole width
    assert full[1, 0, :].mean() < 4 and full[1, -1, :].mean() > 251
    x = EvalTransform(DataConfig(), 224)(s)
    assert x.dtype == torch.float32 and x.shape == (3, 224, 224)


def test_eval_uses_the_small_copy_only_when_big_enough():
    img = _gradient_photo(1000, 750)
    s = {"__key__": "g", "jpg": _jpeg(img, 95), "jpg_small": _small(img)}
    full = EvalTransform(DataConfig(reduced_decode=False), 128).uint8(s).float()
    reduced = EvalTransform(DataConfig(), 128).uint8(s).float()
    assert (full - reduced).abs().mean() < 3


def test_corrupt_images_raise_decode_error(photos):
    tf = TrainTransform(DataConfig(), 64, 10)
    ev = EvalTransform(DataConfig(), 64)
    good = sample_of(photos[0], small=False)
    truncated = {"__key__": "t", "jpg": good["jpg"][: len(good["jpg"]) // 2]}
    garbage = {"__key__": "g", "jpg": b"not an image at all" * 20}
    for bad in (truncated, garbage, {"__key__": "none", "cls": b"1"}):
        for fn in (tf, ev):
            with pytest.raises(DecodeError, match=bad["__key__"]):
                fn(bad)
    with pytest.raises(DecodeError):
        decode_rgb(truncated["jpg"])
    # a DCT-scaled (PIL) decode of a truncated file raises too
    big = _jpeg(photos[1])
    with pytest.raises(DecodeError):
        SampleImage({"__key__": "b", "jpg": big[: len(big) // 2]}).decode_crop((0, 0, 750, 1000), (64, 64))
    # a broken small copy is ignored (the original still decodes)
    broken_small = dict(sample_of(photos[0]), jpg_small=b"garbage")
    assert tf(broken_small).shape == (3, 64, 64)
    with pytest.raises(DecodeError, match="expected the encoded image bytes"):
        tf({"__key__": "p", "jpg": photos[0]})


def test_other_image_kinds_become_rgb(photos):
    gray = photos[0].convert("L")
    cmyk = photos[0].convert("CMYK")
    buf = io.BytesIO()
    photos[0].save(buf, "PNG")
    tf = TrainTransform(DataConfig(), 64, 10)
    for data in (_jpeg(gray), _jpeg(cmyk), buf.getvalue()):
        assert tf({"__key__": "x", "jpg": data}).shape == (3, 64, 64)
        assert EvalTransform(DataConfig(), 64)({"__key__": "x", "jpg": data}).shape == (3, 64, 64)
    im = decode_rgb(_jpeg(gray))
    assert im.mode == "RGB" and im.size == photos[0].size


def test_jpeg_size_reads_the_frame_header_like_pil(photos):
    img = photos[0].resize((333, 250))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation tag: an APP1 segment before the frame header
    kinds = {
        "baseline": dict(quality=90),
        "progressive": dict(quality=80, progressive=True),
        "optimized": dict(quality=75, optimize=True),
        "exif": dict(quality=90, exif=exif.tobytes()),
        "restart markers": dict(quality=90, restart_marker_blocks=4),
        "4:4:4": dict(quality=95, subsampling=0),
    }
    for name, opts in kinds.items():
        buf = io.BytesIO()
        img.save(buf, "JPEG", **opts)
        assert jpeg_size(buf.getvalue()) == (333, 250), name
    for mode in ("L", "CMYK"):
        data = _jpeg(img.convert(mode))
        assert jpeg_size(data) == Image.open(io.BytesIO(data)).size
    png = io.BytesIO()
    img.save(png, "PNG")
    assert jpeg_size(png.getvalue()) is None  # not a JPEG: the caller falls back to PIL
    data = _jpeg(img)
    assert jpeg_size(data[:20]) is None and jpeg_size(b"") is None and jpeg_size(b"\xff\xd8garbage") is None
    s = SampleImage({"__key__": "p", "jpg": png.getvalue()})
    assert s.size == (333, 250) and not s.is_jpeg
