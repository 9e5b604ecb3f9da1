"""Shard toolkit: every source layout on small fixtures, conversions, bad inputs, resume, verify, stats, demo."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import ShardError, demo
from shards.cli import main, parse_shard_size
from shards.format import fit_size, read_info

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark"}


# ---------------------------------------------------------------------------------------------- fixtures


def image_bytes(w, h, seed=0, fmt="JPEG", mode="RGB", quality=90) -> bytes:
    """A small smooth image (distinct per seed) encoded in fmt / mode."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a, b, c = rng.integers(1, 7, 3)
    arr = np.stack([(xx * a + yy * b) % 256, (xx * b + c * 40) % 256, (yy * c + a * 30) % 256], -1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def class_images(n, seed, large_every=3):
    """n (file name suffix, bytes, (w, h)): mostly small JPEGs, every third one large (120x90)."""
    out = []
    for i in range(n):
        w, h = (120, 90) if i % large_every == 0 else (40 + i, 30)
        out.append((f"{i:04d}", image_bytes(w, h, seed * 100 + i), (w, h)))
    return out


def make_21k(root: Path, layout: str, per_class=(6, 6, 6, 6)) -> dict:
    """ImageNet-21k layout: one nXXXXXXXX.tar per class ("tars") or extracted nXXXXXXXX/ folders ("folders").

    Returns id -> (wnid, bytes, size) of every image."""
    root.mkdir(parents=True)
    (root / "words.txt").write_text("".join(f"{w}\t{n}, other name\n" for w, n in NAMES.items()))
    expected = {}
    for c, (wnid, n) in enumerate(zip(WNIDS, per_class)):
        files = [(f"{wnid}_{suffix}.JPEG", data, size) for suffix, data, size in class_images(n, c)]
        if layout == "tars":
            with tarfile.open(root / f"{wnid}.tar", "w") as tf:
                for name, data, _ in files:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        else:
            (root / wnid).mkdir()
            for name, data, _ in files:
                (root / wnid / name).write_bytes(data)
        for name, data, size in files:
            expected[f"{wnid}/{name}"] = (wnid, data, size)
    return expected


def read_samples(out: Path) -> dict:
    """key -> {split, shard, cls, json, jpg, jpg_small?} of every sample in info.json's shards."""
    info = read_info(out)
    samples = {}
    for split, s in info["splits"].items():
        for entry in s["shards"]:
            with tarfile.open(out / entry["name"]) as tf:
                for m in tf:
                    key, _, ext = m.name.partition(".")
                    sample = samples.setdefault(key, {"split": split, "shard": entry["name"]})
                    assert sample["shard"] == entry["name"], f"key {key} in two shards"
                    data = tf.extractfile(m).read()
                    sample[ext] = json.loads(data) if ext == "json" else int(data) if ext == "cls" else data
    return samples


def run(*args) -> int:
    return main([str(a) for a in args] + (["--no-progress"] if args[0] in ("write", "verify", "stats") else []))


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def check_output(out: Path, expected: dict, max_side: int) -> dict:
    """The checks every layout must pass; returns the samples by key."""
    info = read_info(out)
    samples = read_samples(out)
    by_id = {}
    for s in samples.values():
        assert s["json"]["id"] not in by_id, f"{s['json']['id']} written twice"
        by_id[s["json"]["id"]] = s
    assert sorted(by_id) == sorted(expected), "every source image exactly once across train / val"
    for ident, s in by_id.items():
        wnid, data, size = expected[ident]
        cls = info["classes"][s["cls"]]
        assert (cls["wnid"] or cls["name"]) == wnid, f"{ident}: label {s['cls']} is not its source class"
        assert s["json"].get("wnid", s["json"].get("class_name")) == wnid
        assert tuple(s["json"]["size"]) == size
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        if max(size) > max_side:
            assert max(img.size) == max_side, f"{ident}: large image not downscaled to {max_side}"
            assert abs(img.size[0] / img.size[1] - size[0] / size[1]) < 0.05, "aspect kept"
        elif data[:2] == b"\xff\xd8" and Image.open(io.BytesIO(data)).mode == "RGB":
            assert s["jpg"] == data, f"{ident}: a small RGB JPEG must keep its original bytes"
    # Classes mix within shards: a per-class source must not give single-class shards.
    for sp in info["splits"].values():
        assert sum(e["samples"] for e in sp["shards"]) == sp["samples"]
        for entry in sp["shards"]:
            labels = {s["cls"] for s in samples.values() if s["shard"] == entry["name"]}
            if entry["samples"] >= 4:  # (tiny tail shards may be single-class by chance)
                assert len(labels) >= 2, f"{entry['name']} holds a single class"
    assert run("verify", out) == 0
    return samples


# ---------------------------------------------------------------------------------------------- layouts


def test_imagenet21k_tars_and_extracted_folders_give_the_same_shards(tmp_path, capsys):
    expected = make_21k(tmp_path / "tars", "tars")
    make_21k(tmp_path / "folders", "folders")
    out_tars, out_folders = tmp_path / "out_tars", tmp_path / "out_folders"
    for src, out, workers in ((tmp_path / "tars", out_tars, 2), (tmp_path / "folders", out_folders, 1)):
        assert run("write", "imagenet21k", src, out, "--max-side", 64, "--val-per-class", 2, "--shard-size", 5,
                   "--workers", workers) == 0
    samples = check_output(out_tars, expected, 64)
    info = read_info(out_tars)
    assert [c["wnid"] for c in info["classes"]] == WNIDS, "class order: sorted wnids, recorded"
    assert [c["name"] for c in info["classes"]] == [NAMES[w] for w in WNIDS]
    assert info["source"]["layout"] == "tars" and info["num_classes"] == 4 and not info["multi_label"]
    val = [s for s in samples.values() if s["split"] == "val"]
    assert sorted(np.bincount([s["cls"] for s in val]).tolist()) == [2, 2, 2, 2], "held-out val per class"
    assert info["splits"]["val"]["class_counts"] == [2, 2, 2, 2]
    assert len(info["splits"]["train"]["shards"]) == 4 and info["splits"]["train"]["samples"] == 16
    assert not (out_tars / ".work").exists() and not list(out_tars.glob(".*"))
    assert shard_bytes(out_tars) == shard_bytes(out_folders), "a class tar and its extraction give equal shards"


@pytest.mark.parametrize("val_layout", ["class_folders", "flat_csv_kaggle"])
def test_imagenet1k_train_and_val(tmp_path, val_layout):
    src = tmp_path / "in1k"
    data_root = src / "ILSVRC" / "Data" / "CLS-LOC" if val_layout == "flat_csv_kaggle" else src
    src.mkdir()
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}, synonym\n" for w, n in NAMES.items()))
    expected, rows, k = {}, [], 0
    for c, wnid in enumerate(WNIDS[:3]):
        (data_root / "train" / wnid).mkdir(parents=True)
        for suffix, data, size in class_images(4, c):
            (data_root / "train" / wnid / f"{wnid}_{suffix}.JPEG").write_bytes(data)
            expected[f"train/{wnid}/{wnid}_{suffix}.JPEG"] = (wnid, data, size)
        for _suffix, data, size in class_images(2, 10 + c, large_every=2):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}"
            if val_layout == "class_folders":
                (data_root / "val" / wnid).mkdir(parents=True, exist_ok=True)
                (data_root / "val" / wnid / f"{name}.JPEG").write_bytes(data)
                expected[f"val/{wnid}/{name}.JPEG"] = (wnid, data, size)
            else:
                (data_root / "val").mkdir(parents=True, exist_ok=True)
                (data_root / "val" / f"{name}.JPEG").write_bytes(data)
                rows.append([name, f"{wnid} 1 2 30 40 {wnid} 5 6 70 80"])
                expected[f"val/{name}.JPEG"] = (wnid, data, size)
    if rows:
        with open(src / "LOC_val_solution.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ImageId", "PredictionString"]] + rows)
    out = tmp_path / "out"
    assert run("write", "imagenet1k", src, out, "--max-side", 64, "--shard-size", 4, "--workers", 1) == 0
    samples = check_output(out, expected, 64)
    info = read_info(out)
    assert [c["wnid"] for c in info["classes"]] == WNIDS[:3]
    assert info["classes"][0]["name"] == "tench"
    assert info["splits"]["val"]["samples"] == 6 and info["splits"]["train"]["samples"] == 12
    assert all(s["split"] == ("val" if s["json"]["id"].startswith("val/") else "train") for s in samples.values())
    keys = list(samples)
    assert all("." not in k for k in keys) and len(set(keys)) == len(keys)


def test_imagefolder_converts_every_mode_to_rgb_jpeg(tmp_path):
    src = tmp_path / "folder"
    variants = {
        "a.png": image_bytes(50, 40, 1, "PNG", "RGBA"),
        "b.png": image_bytes(50, 40, 2, "PNG", "P"),
        "c.jpg": image_bytes(50, 40, 3, "JPEG", "L"),
        "d.jpeg": image_bytes(50, 40, 4, "JPEG", "CMYK"),
        "e.webp": image_bytes(50, 40, 5, "WEBP"),
        "f.png": image_bytes(50, 40, 6, "PNG", "I;16"),
        "g.JPG": image_bytes(90, 30, 7),
    }
    expected = {}
    for cls in ("cat", "dog"):
        (src / cls / "sub").mkdir(parents=True)
        for name, data in variants.items():
            path = src / cls / ("sub" if name.startswith("g") else "") / name
            path.write_bytes(data)
            expected[path.relative_to(src).as_posix()] = (cls, data, Image.open(io.BytesIO(data)).size)
    (src / "dog" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run("write", "imagefolder", src, out, "--max-side", 64, "--val-count", 4, "--shard-size", 3,
               "--workers", 1) == 0
    samples = check_output(out, expected, 64)
    info = read_info(out)
    assert [c["name"] for c in info["classes"]] == ["cat", "dog"] and info["classes"][0]["wnid"] is None
    assert info["splits"]["val"]["samples"] == 4
    gray16 = next(s for s in samples.values() if s["json"]["id"] == "cat/f.png")
    assert 0 < np.asarray(Image.open(io.BytesIO(gray16["jpg"]))).mean() < 250, "16-bit scaled, not clipped"


def _hf_dataset(n, with_coarse=False, multi=False):
    from datasets import ClassLabel, Dataset, Features, Sequence
    from datasets import Image as HFImage

    names = ["airplane", "bird", "cat"]
    images = [Image.open(io.BytesIO(image_bytes(48 if i % 2 else 80, 36, i, "PNG"))) for i in range(n)]
    data = {"img": images, "fine_label": [i % 3 for i in range(n)]}
    feats = {"img": HFImage(), "fine_label": ClassLabel(names=names)}
    if with_coarse:
        data["coarse_label"] = [i % 2 for i in range(n)]
        feats["coarse_label"] = ClassLabel(names=["vehicle", "animal"])
    if multi:
        data["fine_label"] = [[i % 3, (i + 1) % 3] if i % 2 else [i % 3] for i in range(n)]
        feats["fine_label"] = Sequence(ClassLabel(names=names))
    return Dataset.from_dict(data, features=Features(feats))


def test_hf_dataset_saved_to_disk(tmp_path, capsys):
    from datasets import DatasetDict

    src = tmp_path / "cifar_like"
    DatasetDict({"train": _hf_dataset(12, with_coarse=True), "test": _hf_dataset(6, with_coarse=True)}
                ).save_to_disk(str(src))
    out = tmp_path / "out"
    # Two ClassLabel columns: the tool must ask which one.
    assert run("write", "hf", src, out, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert "several label (ClassLabel) columns (fine_label, coarse_label)" in err and "--label-column" in err
    assert run("write", "hf", src, out, "--label-column", "fine_label", "--max-side", 64, "--shard-size", 5,
               "--workers", 2) == 0
    info = read_info(out)
    assert [c["name"] for c in info["classes"]] == ["airplane", "bird", "cat"]
    assert info["source"]["val_split"] == "test" and info["source"]["image_column"] == "img"
    samples = read_samples(out)
    assert sorted(s["json"]["id"] for s in samples.values()) == sorted(
        [f"train/{i}" for i in range(12)] + [f"test/{i}" for i in range(6)])
    for s in samples.values():
        row = int(s["json"]["id"].split("/")[1])
        assert s["cls"] == row % 3 and s["json"]["class_name"] == info["classes"][row % 3]["name"]
        assert s["split"] == ("val" if s["json"]["id"].startswith("test/") else "train")
        assert max(Image.open(io.BytesIO(s["jpg"])).size) <= 64
        assert "labels" not in s["json"]
    assert run("verify", out) == 0


def test_hf_multi_label(tmp_path):
    src = tmp_path / "multi"
    _hf_dataset(8, multi=True).save_to_disk(str(src))
    out = tmp_path / "out"
    assert run("write", "hf", src, out, "--val-count", 2, "--workers", 1) == 0
    info = read_info(out)
    assert info["multi_label"] and "val" in info["splits"]
    for s in read_samples(out).values():
        row = int(s["json"]["id"].split("/")[1])
        if row % 2:
            assert s["json"]["labels"] == [row % 3, (row + 1) % 3] and s["cls"] == row % 3
        else:
            assert "labels" not in s["json"]
    assert run("verify", out) == 0


# ---------------------------------------------------------------------------------------------- options


def test_small_copy_written_for_large_images_and_reported(tmp_path):
    src = tmp_path / "folder"
    sources = {}
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        # downscaled to 128 / no small copy (already small) / kept as is, with a small copy
        for i, size in enumerate([(200, 150), (40, 30), (120, 90)]):
            data = image_bytes(*size, seed=i + (10 if c == "b" else 0))
            (src / c / f"{i}.jpg").write_bytes(data)
            sources[f"{c}/{i}.jpg"] = data
    out = tmp_path / "out"
    assert run("write", "imagefolder", src, out, "--max-side", 128, "--small-copy", 48, "--workers", 1) == 0
    samples = read_samples(out)
    extra = 0
    for s in samples.values():
        size = s["json"]["size"]
        if max(size) > 48:
            small = Image.open(io.BytesIO(s["jpg_small"]))
            assert small.format == "JPEG" and small.mode == "RGB" and 0.9 * 48 <= max(small.size) <= 48
            exact = fit_size(*fit_size(*size, 128), 48)
            assert abs(small.size[0] / small.size[1] - exact[0] / exact[1]) < 0.05
            extra += len(s["jpg_small"])
        else:
            assert "jpg_small" not in s
        if max(size) <= 128:
            assert s["jpg"] == sources[s["json"]["id"]]
    info = read_info(out)
    assert info["small_copy"] == {"max_side": 48, "extra_bytes": extra, "samples": 4}
    assert run("verify", out) == 0


def test_small_copy_of_a_photo_uses_dct_scaling():
    from shards.images import reduce_image
    from shards.photos import make_photo_jpegs

    photo = make_photo_jpegs(1, seed=3)[0]
    red = reduce_image(photo, max_side=512, quality=90, small_side=256)
    assert red.jpg == photo and red.size == (500, 375)
    assert Image.open(io.BytesIO(red.small)).size == (250, 188), "1/2 DCT scale, within 10% of 256: no resize"
    red = reduce_image(photo, max_side=400, quality=90, small_side=256)
    assert Image.open(io.BytesIO(red.jpg)).size == (400, 300)
    assert Image.open(io.BytesIO(red.small)).size == (256, 192)


def test_shard_size_parsing():
    assert parse_shard_size("1000") == (1000, 0)
    assert parse_shard_size("256MB") == (0, 256_000_000) and parse_shard_size("1GiB") == (0, 2**30)
    with pytest.raises(ShardError, match="--shard-size"):
        parse_shard_size("1.5")


def test_class_filters_and_caps(tmp_path):
    src = tmp_path / "in21k"
    make_21k(src, "folders", per_class=(1, 3, 8, 10))
    out = tmp_path / "out"
    assert run("write", "imagenet21k", src, out, "--min-per-class", 3, "--max-per-class", 4, "--val-per-class", 1,
               "--workers", 1) == 0
    info = read_info(out)
    assert [c["wnid"] for c in info["classes"]] == WNIDS[1:], "the class with 1 image is dropped, order kept"
    assert info["splits"]["val"]["class_counts"] == [1, 1, 1]
    assert info["splits"]["train"]["class_counts"] == [2, 4, 4]
    for s in read_samples(out).values():
        assert s["json"]["wnid"] == info["classes"][s["cls"]]["wnid"] == s["json"]["id"].split("/")[0]


def test_byte_sized_shards(tmp_path):
    src = tmp_path / "in21k"
    expected = make_21k(src, "folders")
    out = tmp_path / "out"
    limit = 12000
    assert run("write", "imagenet21k", src, out, "--shard-size", f"{limit}B", "--max-side", 0, "--val-per-class", 0,
               "--workers", 1) == 0
    info = read_info(out)
    shards = info["splits"]["train"]["shards"]
    assert len(shards) > 2 and info["options"]["shard_bytes"] == limit
    samples = read_samples(out)
    for entry in shards:
        planned = [len(expected[s["json"]["id"]][1]) for s in samples.values() if s["shard"] == entry["name"]]
        assert len(planned) == 1 or sum(planned) <= limit


def test_rerun_is_a_no_op_and_other_options_are_refused(tmp_path, capsys):
    src = tmp_path / "in21k"
    make_21k(src, "tars")
    out = tmp_path / "out"
    assert run("write", "imagenet21k", src, out, "--max-side", 64, "--workers", 1) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert run("write", "imagenet21k", src, out, "--max-side", 64, "--workers", 2) == 0
    assert "already complete" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert run("write", "imagenet21k", src, out, "--max-side", 48, "--workers", 1) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run("write", "imagenet21k", src, out, "--max-side", 48, "--workers", 1, "--overwrite") == 0
    assert read_info(out)["options"]["max_side"] == 48


def test_deterministic_for_any_worker_count_and_seeded(tmp_path):
    outs = {}
    for name, workers, seed in (("w1", 1, 0), ("w2", 2, 0), ("s1", 2, 1)):
        outs[name] = tmp_path / name
        assert run("write", "demo", "transfer", outs[name], "--classes", 4, "--per-class", 5, "--val-per-class", 2,
                   "--image-size", 48, "--shard-size", 6, "--seed", seed, "--workers", workers) == 0
    assert shard_bytes(outs["w1"]) == shard_bytes(outs["w2"])
    assert (outs["w1"] / "info.json").read_bytes() == (outs["w2"] / "info.json").read_bytes()
    assert shard_bytes(outs["w1"]) != shard_bytes(outs["s1"])


# ---------------------------------------------------------------------------------------------- bad data


def test_corrupt_inputs_are_skipped_and_reported(tmp_path, capsys):
    src = tmp_path / "folder"
    good = image_bytes(60, 40, 1)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            (src / c / f"ok{i}.jpg").write_bytes(image_bytes(60, 40, i + (5 if c == "b" else 0)))
    (src / "a" / "empty.jpg").write_bytes(b"")
    (src / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "b" / "garbage.png").write_bytes(b"\x89PNG not really" * 10)
    out = tmp_path / "out"
    assert run("write", "imagefolder", src, out, "--max-bad-fraction", 0.1, "--workers", 1) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 of 11 images" in errors[0] and "bad_samples.txt" in errors[0]
    assert "Traceback" not in err
    assert not (out / "info.json").exists()
    # Raising the threshold resumes the same write and finishes it.
    assert run("write", "imagefolder", src, out, "--max-bad-fraction", 0.5, "--workers", 1) == 0
    report = (out / "bad_samples.txt").read_text().splitlines()
    bad = {line.split("\t")[1]: line.split("\t")[2] for line in report if not line.startswith("#")}
    assert set(bad) == {"a/empty.jpg", "a/truncated.jpg", "b/garbage.png"}
    assert "zero-byte" in bad["a/empty.jpg"] and "undecodable" in bad["a/truncated.jpg"]
    info = read_info(out)
    assert info["splits"]["train"]["samples"] == 8 and info["splits"]["train"]["bad_samples"] == 3
    assert {s["json"]["id"] for s in read_samples(out).values()} == {
        f"{c}/ok{i}.jpg" for c in "ab" for i in range(4)}
    assert run("verify", out) == 0


def test_damaged_class_tar_keeps_the_images_before_the_damage(tmp_path, capsys):
    src = tmp_path / "in21k"
    make_21k(src, "tars")
    tar = src / f"{WNIDS[0]}.tar"
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    tar.write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last image
    out = tmp_path / "out"
    assert run("write", "imagenet21k", src, out, "--val-per-class", 0, "--max-bad-fraction", 0.2,
               "--workers", 1) == 0
    info = read_info(out)
    assert info["splits"]["train"]["samples"] == 23
    assert f"{WNIDS[0]}/{last.name}" in (out / "bad_samples.txt").read_text()


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_write_resumes_to_identical_shards(tmp_path, subprocess_env):
    args = ["write", "demo", "pretrain", None, "--classes", 10, "--per-class", 6, "--val-per-class", 2,
            "--image-size", 48, "--shard-size", 8, "--workers", 2]
    reference = tmp_path / "reference"
    assert run(*[reference if a is None else a for a in args]) == 0
    expected = shard_bytes(reference)

    out = tmp_path / "out"
    env = dict(subprocess_env, SHARDS_TEST_STALL_IN="train-000004.tar")
    cmd = [sys.executable, "-m", "shards"] + [str(out if a is None else a) for a in args] + ["--no-progress"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / ".work" / "stalled").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(0.3)  # let the other worker finish a shard or two meanwhile
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the writer and its workers, mid-shard
        proc.wait()
    assert not (out / "info.json").exists()
    partial = list(out.glob(".train-000004.tar.*.tmp"))
    assert partial and partial[0].stat().st_size > 0, "the stalled shard is half-written under a temp name"
    kept = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert kept and "train-000004.tar" not in kept
    for name in kept:
        assert (out / name).read_bytes() == expected[name], f"{name}: a final name only ever holds a full shard"

    assert run(*[out if a is None else a for a in args]) == 0
    assert shard_bytes(out) == expected
    assert (out / "info.json").read_bytes() == (reference / "info.json").read_bytes()
    assert {name: (out / name).stat().st_ino for name in kept} == kept, "finished shards were kept, not rewritten"
    assert not list(out.glob(".*.tmp")) and not (out / ".work").exists()


# ---------------------------------------------------------------------------------------------- verify / stats


@pytest.fixture
def small_out(tmp_path):
    out = tmp_path / "out"
    assert run("write", "demo", "pretrain", out, "--classes", 6, "--per-class", 4, "--val-per-class", 1,
               "--image-size", 40, "--shard-size", 5, "--workers", 1) == 0
    return out


def test_verify_catches_a_truncated_shard(small_out, capsys):
    shard = small_out / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert run("verify", small_out) == 1
    text = capsys.readouterr().out
    assert "train-000001.tar" in text and "truncated" in text and "FAILED" in text


def test_verify_catches_a_count_mismatch(small_out, capsys):
    info = json.loads((small_out / "info.json").read_text())
    info["splits"]["train"]["shards"][2]["samples"] += 1
    info["splits"]["train"]["samples"] += 1
    (small_out / "info.json").write_text(json.dumps(info))
    assert run("verify", small_out) == 1
    text = capsys.readouterr().out
    assert "train-000002.tar: 5 samples, info.json says 6" in text


def test_verify_catches_a_bad_label_and_an_undecodable_image(small_out, capsys):
    shard = small_out / "val-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".cls") and i < 4:
                data = b"99"
            elif m.name.endswith(".jpg") and i > 4:
                data = data[:100] + b"\0" * (len(data) - 100)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    info = json.loads((small_out / "info.json").read_text())
    info["splits"]["val"]["shards"][0]["bytes"] = shard.stat().st_size
    (small_out / "info.json").write_text(json.dumps(info))
    assert run("verify", small_out, "--workers", 1) == 1
    text = capsys.readouterr().out
    assert "label 99 outside 0..5" in text and "jpg does not decode" in text


def test_stats(small_out, capsys):
    assert run("stats", small_out, "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["splits"]["train"]["class_counts"] == [4] * 6
    assert st["splits"]["val"]["per_class"] == {"min": 1, "median": 1.0, "mean": 1.0, "max": 1}
    assert run("stats", small_out) == 0
    text = capsys.readouterr().out
    assert "train: 24 samples in 5 shards" in text and "images per class: min 4" in text


# ---------------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys, *args) -> str:
    capsys.readouterr()
    assert run(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_bad_input_gives_one_clear_line(tmp_path, capsys):
    out = tmp_path / "out"
    msg = _one_line_error(capsys, "write", "imagenet21k", tmp_path / "nowhere", out)
    assert "nowhere: no such folder" in msg
    (tmp_path / "empty").mkdir()
    msg = _one_line_error(capsys, "write", "imagenet21k", tmp_path / "empty", out)
    assert "no class tars (nXXXXXXXX.tar) or class folders" in msg
    (tmp_path / "noimages" / "n01440764").mkdir(parents=True)
    msg = _one_line_error(capsys, "write", "imagenet21k", tmp_path / "noimages", out)
    assert "no images" in msg
    msg = _one_line_error(capsys, "write", "imagefolder", tmp_path / "empty", out)
    assert "no class folders" in msg
    msg = _one_line_error(capsys, "write", "imagenet1k", tmp_path / "empty", out)
    assert "no train/ folder" in msg
    msg = _one_line_error(capsys, "write", "imagenet22k", tmp_path / "empty", out)
    assert "unknown source kind 'imagenet22k'; choose one of: imagenet21k, imagenet1k" in msg
    msg = _one_line_error(capsys, "write", "demo", "pretraining", out)
    assert "unknown demo set 'pretraining'" in msg
    msg = _one_line_error(capsys, "write", "demo", "pretrain", out, "--classes", 1000)
    assert "--classes 1000 is outside 2..144" in msg
    msg = _one_line_error(capsys, "write", "imagefolder", tmp_path / "empty", out, "--classes", 3)
    assert "--classes only apply to `write demo`" in msg
    msg = _one_line_error(capsys, "verify", tmp_path / "empty")
    assert "info.json: missing" in msg
    assert not out.exists(), "a failed start leaves nothing behind"


def test_missing_hf_column_gives_one_clear_line(tmp_path, capsys):
    src = tmp_path / "ds"
    _hf_dataset(4).save_to_disk(str(src))
    msg = _one_line_error(capsys, "write", "hf", src, tmp_path / "out", "--image-column", "image")
    assert "column 'image' does not exist (columns: img, fine_label); pass --image-column NAME" in msg
    msg = _one_line_error(capsys, "write", "hf", src, tmp_path / "out", "--hf-train-split", "validation")
    assert "single dataset without splits" in msg
    msg = _one_line_error(capsys, "write", "hf", tmp_path / "nothing", tmp_path / "out")
    assert "no such dataset folder" in msg


def test_entry_point_error_has_no_traceback(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "shards", "write", "imagenet21k", str(tmp_path / "missing"),
                           str(tmp_path / "out")], env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder; give the "
                                                "imagenet21k source folder"]


# ---------------------------------------------------------------------------------------------- demo, photos


def test_demo_generator_is_deterministic_and_sets_are_disjoint():
    a = demo.generate_demo("pretrain", num_classes=100, per_class=1, image_size=64, seed=3)
    b = demo.generate_demo("pretrain", num_classes=100, per_class=1, image_size=64, seed=3)
    c = demo.generate_demo("pretrain", num_classes=100, per_class=1, image_size=64, seed=4)
    assert len(a.class_names) == 100 and len(set(a.class_names)) == 100 and a.labels == list(range(100))
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, c.images))
    assert all(max(im.size) == 64 and im.mode == "RGB" for im in a.images)
    transfer = demo.class_names("transfer")
    assert 10 <= len(transfer) <= 20 and not set(transfer) & set(demo.class_names("pretrain", 144))
    val = demo.generate_demo("transfer", per_class=1, image_size=64, split="val")
    train = demo.generate_demo("transfer", per_class=1, image_size=64)
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(val.images, train.images))


def test_demo_fine_patterns_need_resolution():
    """A fine pattern's contrast survives at full size and mostly vanishes when the image is shrunk 4x."""
    names = demo.class_names("pretrain", 144)
    fine = names.index("square-fine_stripes")
    coarse = names.index("square-stripes")

    def detail(img, size):
        small = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(small.convert("L"), dtype=np.float32)
        return np.abs(np.diff(arr, axis=1)).mean() + np.abs(np.diff(arr, axis=0)).mean()

    imgs = {c: [demo.render_image("pretrain", c, i, 160) for i in range(6)] for c in (fine, coarse)}
    ratio = {c: np.mean([detail(im, 40) / detail(im, 160) for im in imgs[c]]) for c in imgs}
    assert ratio[fine] < ratio[coarse], "fine stripes lose more of their detail at low resolution"


def test_photo_jpegs():
    from shards.photos import make_photo_jpegs

    jpegs = make_photo_jpegs(3, seed=1)
    assert jpegs == make_photo_jpegs(3, seed=1) and jpegs != make_photo_jpegs(3, seed=2)
    for data in jpegs:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.size == (500, 375) and img.mode == "RGB"
        assert len(data) > 30_000, "a photo crop, not a flat drawing"
