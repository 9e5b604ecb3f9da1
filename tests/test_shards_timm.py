"""Shards that timm reads too: the writer's `_info.json`, timm's own wds reader on it, `timm-info`, verify."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.cli import main
from shards.format import TIMM_INFO_NAME, read_info, timm_info

reader_wds = pytest.importorskip("timm.data.readers.reader_wds")
timm_data = pytest.importorskip("timm.data")


WRITE_ARGS = ("--classes", 5, "--per-class", 4, "--val-per-class", 2, "--image-size", 40, "--small-copy", 24,
              "--shard-size", 7, "--workers", 1)


def run(*args) -> int:
    return main([str(a) for a in args] + (["--no-progress"] if args[0] in ("write", "verify") else []))


def write_demo(out: Path) -> Path:
    # 5 classes x (4 train + 2 val), 7 samples per shard: several shards per split, a short last one; every
    # sample also has a jpg_small (timm's default image key must still take the jpg).
    assert run("write", "demo", "pretrain", out, *WRITE_ARGS) == 0
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("timm") / "demo")


def ours(out: Path, split: str, image: str = "jpg") -> dict:
    """key -> (label, RGB pixels of `image`) of every sample of a split, read from the tars directly."""
    info = read_info(out)
    samples = {}
    for entry in info["splits"][split]["shards"]:
        with tarfile.open(out / entry["name"]) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            key, _, ext = name.partition(".")
            if ext == "cls":
                samples[key] = (int(data), pixels(Image.open(io.BytesIO(members[f"{key}.{image}"]))))
    return samples


def pixels(img: Image.Image) -> bytes:
    return np.asarray(img.convert("RGB")).tobytes()


@pytest.mark.parametrize("split,ours_split", [("train", "train"), ("val", "val"), ("validation", "val")])
def test_timm_reader_gets_every_sample_with_its_label(shard_dir, split, ours_split):
    expected = ours(shard_dir, ours_split)
    info = read_info(shard_dir)
    assert len(expected) == info["splits"][ours_split]["samples"] > 7
    reader = reader_wds.ReaderWds(str(shard_dir), split=split)
    assert reader.num_samples == len(expected) and len(reader) == len(expected)
    # Evaluation order is fixed: filenames() (key + ".JPEG") and iteration walk the shards in the same order.
    keys = [name.removesuffix(".JPEG") for name in reader.filenames()]
    got = [(target, pixels(img)) for img, target in reader]
    assert len(keys) == len(got) == len(expected) and set(keys) == set(expected)
    for key, (target, data) in zip(keys, got):
        assert (target, data) == expected[key], f"{split} sample {key}: timm reads another label or image"


def test_timm_train_mode_and_create_dataset(shard_dir):
    expected = Counter(ours(shard_dir, "train").values())
    # Training mode: shuffled shards and samples, the epoch length from _info.json's num_samples.
    reader = reader_wds.ReaderWds(str(shard_dir), split="train", is_training=True)
    assert Counter((t, pixels(img)) for img, t in reader) == expected
    # What `train.py --dataset wds/demo --data-dir DIR --val-split validation` builds (its default val split).
    ds = timm_data.create_dataset("wds/demo", root=str(shard_dir), split="validation")
    assert Counter((t, pixels(img)) for img, t in ds) == Counter(ours(shard_dir, "val").values())


def test_timm_reads_the_small_copy_when_asked(shard_dir):
    small = ours(shard_dir, "train", image="jpg_small")
    assert small != ours(shard_dir, "train")
    reader = reader_wds.ReaderWds(str(shard_dir), split="train", input_key="jpg_small;jpg")
    assert Counter((t, pixels(img)) for img, t in reader) == Counter(small.values())


def test_timm_info_content(shard_dir):
    info = read_info(shard_dir)
    written = json.loads((shard_dir / TIMM_INFO_NAME).read_text())
    assert written == timm_info(info)
    assert set(written["splits"]) == {"train", "val", "validation"}
    train = written["splits"]["train"]
    assert train == {"name": "train", "num_samples": 20, "filenames": [f"train-00000{i}.tar" for i in range(3)],
                     "shard_lengths": [7, 7, 6]}
    assert written["splits"]["validation"]["filenames"] == written["splits"]["val"]["filenames"]
    assert (shard_dir / "info.json").is_file(), "our own index stays beside it"


def test_timm_info_command_adds_it_to_existing_folders(tmp_path, capsys):
    out_a, out_b = write_demo(tmp_path / "a"), write_demo(tmp_path / "b")
    original = (out_a / TIMM_INFO_NAME).read_bytes()
    (out_a / TIMM_INFO_NAME).unlink()
    (out_b / TIMM_INFO_NAME).unlink()
    # Without it timm falls back to our info.json, whose schema it cannot read.
    with pytest.raises(KeyError):
        reader_wds.ReaderWds(str(out_a), split="train")
    capsys.readouterr()
    assert run("timm-info", out_a, out_b) == 0
    assert capsys.readouterr().out.count(": written") == 2
    assert (out_a / TIMM_INFO_NAME).read_bytes() == original == (out_b / TIMM_INFO_NAME).read_bytes()
    before = (out_a / TIMM_INFO_NAME).stat().st_mtime_ns
    assert run("timm-info", out_a) == 0
    assert "unchanged" in capsys.readouterr().out
    assert (out_a / TIMM_INFO_NAME).stat().st_mtime_ns == before, "idempotent: not rewritten"
    # A rerun of the finished write adds it too (folders written before the writer did).
    (out_a / TIMM_INFO_NAME).unlink()
    assert run("write", "demo", "pretrain", out_a, *WRITE_ARGS) == 0
    assert f"added {TIMM_INFO_NAME}" in capsys.readouterr().err
    assert (out_a / TIMM_INFO_NAME).read_bytes() == original


def _error_lines(capsys, *args) -> list[str]:
    capsys.readouterr()
    assert run(*args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip().splitlines()


def test_timm_info_command_refuses_clearly(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _error_lines(capsys, "timm-info", empty)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "info.json: missing" in lines[0]
    assert not (empty / TIMM_INFO_NAME).exists()
    out = write_demo(tmp_path / "out")
    (out / TIMM_INFO_NAME).unlink()
    (out / "val-000001.tar").unlink()
    lines = _error_lines(capsys, "timm-info", out, empty)
    assert len(lines) == 2 and "1 shard(s) listed in info.json are missing (val-000001.tar)" in lines[0]
    assert not (out / TIMM_INFO_NAME).exists()


def test_verify_checks_timm_info(tmp_path, capsys):
    out = write_demo(tmp_path / "out")
    capsys.readouterr()
    assert run("verify", out) == 0
    assert TIMM_INFO_NAME not in capsys.readouterr().out
    path = out / TIMM_INFO_NAME
    original = path.read_text()
    stale = json.loads(original)
    stale["splits"]["train"]["shard_lengths"][0] += 1
    path.write_text(json.dumps(stale))
    assert run("verify", out) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if TIMM_INFO_NAME in line]
    assert lines == [f"error: {TIMM_INFO_NAME} disagrees with info.json: splits.train.shard_lengths[0] is 8, "
                     f"info.json gives 7; rerun `python -m shards timm-info {out}`"]
    # Extra keys timm reads optionally (alt_label) are the user's business; a split missing is not.
    extra = json.loads(original)
    extra["splits"]["train"]["alt_label"] = "labels"
    path.write_text(json.dumps(extra))
    assert run("verify", out, "--no-decode") == 0
    del extra["splits"]["validation"]
    path.write_text(json.dumps(extra))
    assert run("verify", out, "--no-decode") == 1
    assert "splits.validation missing" in capsys.readouterr().out
    path.unlink()
    assert run("verify", out, "--no-decode") == 0
    assert f"warning: no {TIMM_INFO_NAME}: timm's wds reader cannot read this folder" in capsys.readouterr().out
