"""Data faults, provoked for real on shards written by the toolkit: corrupt JPEGs, damaged and missing shards,
counts and labels that disagree, too few shards, decompression bombs, shards deleted mid-run, checksums, and
shard paths that try to leave their folder. Each test says what the system does (docs/faults.md)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from pipeline.data.decode import DecodeError, SampleImage, available_decoders, decode_rgb, full_box, jpeg_size
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import ChecksumMismatch, DataError, TrainPlan, load_split, verify_sample
from pretrain_launch import CONFIG, REPO, env
from shards.format import add_sample_digests, file_sha256
from shards.photos import make_photo_folder, make_photo_jpegs
from test_loader import cfg_for, keys_of, loader, one_epoch, stage, take, write_shards
from test_shards import run as shards_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD_SIZE = 8
DEMO_ARGS = ("--classes", 4, "--per-class", 24, "--val-per-class", 2, "--image-size", 48, "--shard-size", SHARD_SIZE,
             "--workers", 1)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """4 classes x 24 train (12 shards of 8) + 2 val per class (1 shard), 48 px, written by the toolkit."""
    out = tmp_path_factory.mktemp("data_faults") / "demo"
    assert shards_cli("write", "demo", "pretrain", out, *DEMO_ARGS) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """One train shard of 40 real photo crops (500x375, q90) with 256-px small copies (`--small-copy 256`)."""
    base = tmp_path_factory.mktemp("data_faults_photos")
    src = make_photo_folder(base / "src", num_classes=2, per_class=20, seed=14)
    assert shards_cli("write", "imagefolder", src, base / "out", "--small-copy", 256, "--shard-size", 100,
                      "--workers", 1) == 0
    return base / "out"


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def edit_info(root: Path, fn) -> None:
    info = json.loads((root / "info.json").read_text())
    fn(info)
    (root / "info.json").write_text(json.dumps(info))


def layout(shard: Path) -> list[tuple[str, int, int, int]]:
    """(member name, header start, data start, data end) of every member, in tar order."""
    with tarfile.open(shard) as tf:
        return [(m.name, m.offset, m.offset_data, m.offset_data + m.size) for m in tf]


def replace_member(root: Path, shard: str, name: str, data: bytes) -> None:
    """Rewrite one member of a shard and record the new file in info.json (size and sha256 agree again), as a
    writer bug or a hand edit would leave it: only the sample itself is wrong."""
    path = root / shard
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, old in members:
            new = data if m.name == name else old
            m.size = len(new)
            tf.addfile(m, io.BytesIO(new))

    def fix(info):
        for s in info["splits"].values():
            for e in s["shards"]:
                if e["name"] == shard:
                    e["bytes"], e["sha256"] = path.stat().st_size, file_sha256(path)
    edit_info(root, fix)


def flip(data: bytes, pos: int, mask: int = 0x55) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


def epoch_keys(cfg, **kw) -> tuple[list[str], object]:
    ld = loader(cfg, **kw)
    batches = one_epoch(ld)
    ld.close()
    return keys_of(batches), ld


def shard_keys(shard: Path) -> list[str]:
    return list(dict.fromkeys(name.split(".")[0] for name, *_ in layout(shard)))


# ------------------------------------------------------------------------------- 1: a corrupt JPEG, mid-photo


def test_corrupt_jpeg_mid_photo_strict_decode_and_checksums():
    """Bytes flipped in the middle of a real photo: libjpeg repairs most such damage and at most warns.
    simplejpeg's strict mode turns the warning into an error, which the decoder now keeps (it used to hand the
    bytes to PIL, which decoded the garbage silently); flips nothing notices are caught only by checksums."""
    jpeg = make_photo_jpegs(1, seed=3)[0]
    size = jpeg_size(jpeg)
    noticed = silent = None
    for pos in range(len(jpeg) // 3, 2 * len(jpeg) // 3, 97):
        bad = flip(jpeg, pos)
        try:
            simplejpeg.decode_jpeg(bad, colorspace="RGB")
            silent = silent or bad
        except ValueError:
            noticed = noticed or bad
        if noticed and silent:
            break
    assert noticed and silent

    def decode(data, decoder):
        return SampleImage({"__key__": "photo", "jpg": data}).decode_crop(full_box(size), (size[1], size[0]),
                                                                           reduced=False, decoder=decoder)

    with pytest.raises(DecodeError, match=r"sample photo \(jpg\): cannot decode: Corrupt JPEG data"):
        decode(noticed, "simplejpeg")
    for decoder in available_decoders():  # silent damage: every decoder returns other pixels, no error
        assert not decode(silent, decoder).equal(decode(jpeg, decoder))
    # the per-sample digests the writer records catch both
    sample = add_sample_digests({"id": "photo", "size": list(size)}, {"cls": b"0", "jpg": jpeg})
    good = {"__key__": "photo", "cls": b"0", "jpg": jpeg, "json": json.dumps(sample, sort_keys=True,
                                                                            separators=(",", ":")).encode()}
    verify_sample(good)
    for bad in (noticed, silent):
        with pytest.raises(ChecksumMismatch, match=r"^jpg differs from its recorded sha256"):
            verify_sample({**good, "jpg": bad})


# --------------------------------------------------------------- 10: integrity, 20 flips in a photo shard


def test_twenty_flips_in_a_photo_shard_are_all_reported_by_verify(photos, tmp_path, capsys):
    root = copy(photos, tmp_path)
    shard = root / "train-000000.tar"
    members = layout(shard)
    data = bytearray(shard.read_bytes())
    n = len(data)
    rng = np.random.default_rng(14)
    positions = [int(p) for p in rng.choice(np.arange(n // 3, 2 * n // 3), 19, replace=False)]
    # and one in the header of the first jpg_small of the middle third (a header flip hides its member)
    positions.append(next(head for name, head, _, _ in members if head > n // 3 and name.endswith(".jpg_small")) + 7)
    for p in positions:
        data[p] ^= int(rng.integers(1, 256))
    shard.write_bytes(bytes(data))
    in_data = {name for name, _, start, end in members for p in positions if start <= p < end}
    in_header = {(name, head) for name, head, start, _ in members for p in positions if head <= p < start}
    assert len(in_data) >= 10, "most flips land in member data (the photos dominate the shard)"
    assert shards_cli("verify", root, "--workers", 1) == 1
    out = capsys.readouterr().out
    assert "error: train-000000.tar: sha256 of the file differs from info.json" in out
    lines = {}
    for line in out.splitlines():
        m = re.match(r"error: train-000000\.tar: sample '([^']+)': (.*)", line)
        if m:
            lines[m.group(1)] = lines.get(m.group(1), "") + m.group(2)
    for name in sorted(in_data):
        key, ext = name.split(".", 1)
        assert key in lines, f"flipped member {name} not reported"
        assert f"{ext} differs from its recorded sha256" in lines[key] or "bad json" in lines[key] or \
            (ext != "json" and f"missing members ['{ext}']" in lines[key]), lines[key]
    assert in_header
    for name, head in in_header:  # a damaged header hides its member: the gap and the absent member are named
        key, ext = name.split(".", 1)
        assert f"damaged tar header at byte {head}" in out
        line = lines.get(key, "")
        assert f"'{ext}'" in line or f"{ext} listed in its checksums but absent" in line, \
            f"member {name} behind a damaged header not reported: {line}"


def test_loader_checks_per_sample_checksums_when_asked(photos, tmp_path):
    root = copy(photos, tmp_path)
    shard = root / "train-000000.tar"
    members = [(name, start, end) for name, _, start, end in layout(shard) if name.endswith((".jpg", ".jpg_small"))]
    n = shard.stat().st_size
    rng = np.random.default_rng(10)
    middle = [m for m in members if n // 3 <= m[1] and m[2] <= 2 * n // 3]
    hit = [middle[int(i)] for i in rng.choice(len(middle), 20, replace=False)]
    data = bytearray(shard.read_bytes())
    for _, start, end in hit:  # one byte in the middle third of the member's data
        data[int(rng.integers(start + (end - start) // 3, start + 2 * (end - start) // 3))] ^= 0x5A
    shard.write_bytes(bytes(data))
    flipped = {name.split(".")[0] for name, _, _ in hit}
    cfg = dict(shuffle_buffer=40, max_bad_fraction=1.0)
    keys, ld = epoch_keys(cfg_for([root], verify_checksums=True, **cfg), mbs=8, st=stage(size=64, mbs=8))
    assert ld.bad_samples == len(flipped), "every sample with a flipped member is counted as bad"
    assert not flipped & set(keys), "and none of them reaches a batch"
    assert all("ChecksumMismatch" in b.reason and "differs from its recorded sha256" in b.reason
               for b in ld.bad_examples)
    # the eval loader too: flipped samples are left out of the metrics and counted
    ev = build_eval_loader(cfg_for([root], verify_checksums=True), image_size=64, micro_batch_size=8, split="train")
    valid = [k for b in ev for k, ok in zip(b.key, b.valid.tolist()) if ok]
    assert ev.bad_samples == len(flipped) and len(valid) == 40 - len(flipped) and not flipped & set(valid)
    # without the option (the default) most of them decode and are trained on as corrupted pixels
    keys, ld = epoch_keys(cfg_for([root], **cfg), mbs=8, st=stage(size=64, mbs=8))
    assert ld.bad_samples < len(flipped) and flipped & set(keys)


def test_old_shards_without_checksums_stay_readable(demo, tmp_path, capsys):
    """Format version 1 (no checksums): loader and verify read it; asking the loader to check refuses at start."""
    root = copy(demo, tmp_path)

    def strip(info):
        info["version"], info["fingerprint"] = 1, "written by a version-1 writer"
        del info["checksums"]
        for s in info["splits"].values():
            for e in s["shards"]:
                del e["sha256"]
    edit_info(root, strip)
    assert shards_cli("verify", root, "--workers", 1) == 0
    assert "warning: info.json records no checksums (format version 1)" in capsys.readouterr().out
    # the same write again: refused with the way to add checksums
    assert shards_cli("write", "demo", "pretrain", root, *DEMO_ARGS) == 2
    assert "holds shards of format version 1 (no checksums); pass --overwrite to rewrite them as version 2" in \
        capsys.readouterr().err
    keys = write_shards(tmp_path / "v1", [6] * 4)  # the loader tests' hand-made version-1 shards
    assert sorted(keys_of(take(loader(cfg_for([tmp_path / "v1"])), 6))) == sorted(keys)
    with pytest.raises(DataError, match=r"data.verify_checksums=true but \S*v1/info.json records no checksums.*"
                                        r"rewrite them .* or set data.verify_checksums=false"):
        loader(cfg_for([tmp_path / "v1"], verify_checksums=True))


# ------------------------------------------------------------------------ 2, 3: truncated and zero-byte shards


def test_truncated_tar_is_skipped_and_counted(demo, tmp_path, capsys):
    root = copy(demo, tmp_path)
    shard = root / "train-000004.tar"
    keys = shard_keys(shard)
    cut = next(start for name, _, start, _ in layout(shard) if name == f"{keys[3]}.jpg") + 20
    shard.write_bytes(shard.read_bytes()[:cut])  # inside the jpg of the 4th sample: samples 4..8 lost
    ld = loader(cfg_for([root], shuffle_buffer=32))
    assert re.search(r"warning: data.train\[0\] .*: 1 shard\(s\) differ in size from info.json \(train-000004.tar: "
                     r"\d+ bytes, info.json says \d+\), about \d of 96 samples lost; their unreadable samples are "
                     r"skipped and counted .*python -m shards verify", capsys.readouterr().err)
    got = keys_of(one_epoch(ld))
    assert ld.bad_samples == 5 and len(got) == 96
    assert set(keys[:3]) <= set(got) and not set(keys[3:]) & set(got)
    # 5 of 96 is above the default data.max_bad_fraction (1 %): the check at the epoch's end stops the run
    with pytest.raises(DataError, match=r"5 of 96 samples \(5.21%\) could not be read or decoded, above "
                                        r"data.max_bad_fraction=0.01.*train-000004.tar: shard unreadable after"):
        next(ld)


def test_zero_byte_shard_error_at_start_or_skipped_and_counted(demo, tmp_path, capsys):
    root = copy(demo, tmp_path)
    shard = root / "train-000007.tar"
    keys = shard_keys(shard)
    shard.write_bytes(b"")
    with pytest.raises(DataError, match=r"train-000007.tar: 0 bytes, info.json says \d+\), about 8 of 96"):
        loader(cfg_for([root]))
    got, ld = epoch_keys(cfg_for([root], max_bad_fraction=0.2, shuffle_buffer=32), workers=2)
    assert "train-000007.tar: 0 bytes" in capsys.readouterr().err
    assert ld.bad_samples == 8 and not set(keys) & set(got)
    assert all("train-000007.tar" in b.url and "shard ended after 0 samples" in b.reason for b in ld.bad_examples)


# -------------------------------------------------------------------------------------- 4: a missing shard


def test_missing_shard_is_one_clear_error_at_start(demo, tmp_path):
    root = copy(demo, tmp_path)
    (root / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"info.json: 1 of 12 train shards listed there do not exist \(first: "
                                        r"\S*train-000002.tar\); copy the missing files or rewrite the shards"):
        loader(cfg_for([root]))


def test_missing_val_shard_stops_the_run_at_start_not_at_the_first_eval(demo, tmp_path):
    """Found a bug: eval loaders were built at the first evaluation, so a missing val shard stopped the run
    there (eval.every_steps in, or at the very end). The trainer now checks the val data at start."""
    root = copy(demo, tmp_path)
    (root / "val-000000.tar").unlink()
    proc = subprocess.run([sys.executable, "-m", "pipeline.pretrain", "--config", CONFIG, f"data.train=[{root}]",
                           f"train.run_dir={tmp_path / 'run'}"], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "val-000000.tar" in errors[0] and "copy the missing files" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoints/step-*")), "stopped before training"


# ------------------------------------------------------------------------------ 5: counts that disagree


def test_info_counts_that_disagree_with_the_shards(demo, tmp_path, capsys):
    root = copy(demo, tmp_path)

    def total_off(info):
        info["splits"]["train"]["samples"] += 1
    edit_info(root, total_off)
    with pytest.raises(DataError, match=r"splits.train.samples is 97 but its shards hold 96; the file is "
                                        r"inconsistent"):
        loader(cfg_for([root]))
    edit_info(root, lambda info: info["splits"]["train"].update(samples=96))

    def counts(info):  # shard 1 claims 3 more samples than it holds, shard 2 one fewer
        s = info["splits"]["train"]
        s["shards"][1]["samples"] += 3
        s["shards"][2]["samples"] -= 1
        s["samples"] += 2
    edit_info(root, counts)
    got, ld = epoch_keys(cfg_for([root], max_bad_fraction=0.1, shuffle_buffer=32), mbs=2, st=stage(mbs=2))
    assert ld.bad_samples == 3, "the samples shard 1 does not hold are counted as bad (and replaced)"
    assert any("shard ended after 8 samples, info.json says 11" in b.reason for b in ld.bad_examples)
    assert shard_keys(root / "train-000002.tar")[-1] not in got, "a sample beyond info.json's count is not read"
    assert shards_cli("verify", root, "--workers", 1, "--no-decode") == 1
    out = capsys.readouterr().out
    assert "train-000001.tar: 8 samples, info.json says 11" in out and "train-000002.tar: 8 samples, info.json " \
        "says 7" in out


# --------------------------------------------------------------------------------------- 6: labels


def test_labels_out_of_range_for_the_head(demo, tmp_path):
    with pytest.raises(DataError, match=r"the model has 3 classes but the training data has 4 .*set "
                                        r"model.num_classes=0"):
        build_train_loader(cfg_for([demo]), stage=stage(), micro_batch_size=4, num_classes=3)
    root = copy(demo, tmp_path)
    key = shard_keys(root / "train-000003.tar")[2]
    replace_member(root, "train-000003.tar", f"{key}.cls", b"99")
    got, ld = epoch_keys(cfg_for([root], max_bad_fraction=0.1, shuffle_buffer=32))
    assert ld.bad_samples == 1 and key not in got
    assert [b.reason for b in ld.bad_examples if b.key == key] == ["ValueError: label [99] outside [0, 4)"]


# --------------------------------------------------------------------------- 7: fewer shards than readers


def test_fewer_shards_than_ranks_times_workers(demo):
    with pytest.raises(DataError, match=r"has 12 shards but 4 ranks x 4 workers = 16 readers need at least 16.*"
                                        r"--shard-size N.*lower data.workers.*data.resampled=true"):
        build_train_loader(cfg_for([demo], workers=4), stage=stage(), micro_batch_size=4, rank=3, world_size=4)
    # resampled draws shards with replacement: no minimum (in-process here: 16 ranks x 1 reader)
    ld = build_train_loader(cfg_for([demo], resampled=True), stage=stage(), micro_batch_size=4, rank=5,
                            world_size=16)
    assert len(next(ld).key) == 4
    # evaluation splits samples, not shards: one val shard serves 16 readers
    ev = build_eval_loader(cfg_for([demo]), image_size=32, micro_batch_size=4, rank=15, world_size=16)
    assert len(ev) == 1


# ---------------------------------------------------------------------------- 8: decompression bomb


def bomb(jpeg: bytes, width: int = 60000, height: int = 60000) -> bytes:
    """The JPEG with its frame header claiming width x height (3.6 gigapixels: ~11 GB as RGB)."""
    pos = 2
    while jpeg[pos + 1] not in (0xC0, 0xC1, 0xC2):
        pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
    return jpeg[:pos + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[pos + 9:]


def test_decompression_bomb_is_refused_cheaply(demo, tmp_path, capsys):
    key = shard_keys(demo / "train-000000.tar")[0]
    with tarfile.open(demo / "train-000000.tar") as tf:
        jpeg = tf.extractfile(f"{key}.jpg").read()
    huge = bomb(jpeg)
    assert jpeg_size(huge) == (60000, 60000)
    for decoder in available_decoders():
        t0 = time.perf_counter()
        with pytest.raises(DecodeError, match=r"claims 60000x60000 pixels, above the limit \d+ .*decompression bomb"):
            SampleImage({"__key__": key, "jpg": huge}).decode_crop((0, 0, 600, 600), (32, 32), decoder=decoder)
        assert time.perf_counter() - t0 < 0.5
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_rgb(huge)  # PIL's own limit (Image.MAX_IMAGE_PIXELS)
    # in a shard: skipped and counted by the loader, reported by verify from the header alone
    root = copy(demo, tmp_path)
    replace_member(root, "train-000000.tar", f"{key}.jpg", huge)
    t0 = time.perf_counter()
    got, ld = epoch_keys(cfg_for([root], max_bad_fraction=0.1, shuffle_buffer=32))
    assert ld.bad_samples == 1 and key not in got and time.perf_counter() - t0 < 20
    assert shards_cli("verify", root, "--workers", 1) == 1
    assert f"sample '{key}': jpg does not decode (DecompressionBombError" in capsys.readouterr().out
    # and the writer skips one in its source
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"ok{i}.jpg").write_bytes(jpeg)
    (src / "bomb.jpg").write_bytes(huge)
    assert shards_cli("write", "imagefolder", tmp_path / "src", tmp_path / "out", "--max-bad-fraction", 0.5,
                      "--workers", 1) == 0
    assert "bomb.jpg\ttoo large to decode safely" in (tmp_path / "out" / "bad_samples.txt").read_text()


# --------------------------------------------------------------------------- 9: shards deleted mid-run


def test_shards_deleted_while_a_run_reads_them(demo, tmp_path):
    root = copy(demo, tmp_path)
    # in-process reading first, so that which shards are open when one is deleted is exact
    cfg = cfg_for([root], max_bad_fraction=0.2, shuffle_buffer=16)
    plan = TrainPlan([load_split(str(root), "train")], weights=None, seed=0, world_size=1, workers=1,
                     resampled=False, shuffle_buffer=16)
    order = plan.shard_split(0, 0)[0][0]
    victim = root / f"train-{order[5]:06d}.tar"  # opened after 40 samples; 20 are read for the first batch
    lost, kept = set(shard_keys(victim)), victim.read_bytes()
    ld = loader(cfg)
    first = take(ld, 1)
    victim.unlink()
    rest = [next(ld) for _ in range(ld.batches_per_epoch() - 1)]
    assert ld.epoch == 0 and ld.bad_samples == SHARD_SIZE and not lost & set(keys_of(first + rest))
    assert all("FileNotFoundError" in b.reason and victim.name in b.url for b in ld.bad_examples)
    # every shard gone under two reader processes: one clear error within an epoch, no hang
    victim.write_bytes(kept)
    ld = loader(cfg_for([root], max_bad_fraction=0.2), workers=2)
    take(ld, 1)
    for p in root.glob("train-*.tar"):
        p.unlink()
    with pytest.raises(DataError, match=r"(could not be read or decoded|all 4 samples of a batch failed).*"
                                        r"FileNotFoundError.*shards verify"):
        for _ in range(ld.batches_per_epoch() + 1):
            next(ld)
    ld.close()


# ------------------------------------------------------------------------- 11: paths that leave the folder


@pytest.mark.parametrize("name", ["../outside/train-000000.tar", "{abs}", "file://{abs}", "sub/../../x.tar"])
def test_shard_paths_cannot_escape_the_folder(demo, tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(demo / "train-000000.tar", outside / "train-000000.tar")
    root = copy(demo, tmp_path)
    name = name.format(abs=outside / "train-000000.tar")
    edit_info(root, lambda info: info["splits"]["train"]["shards"][0].update(name=name))
    with pytest.raises(DataError, match=rf"info.json: splits.train.shards\[0\].name '{re.escape(name)}' is (an "
                                        r"absolute path|a path with '\.\.').*; refused"):
        loader(cfg_for([root]))
    assert shards_cli("verify", root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "refused" in err[0]
