"""Streaming loader: split, equal batches, exact resume, stage changes, bad samples, eval coverage, URLs."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.protocol import (
    Address,
    Batch,
    EvalBatch,
    Fetch,
    Missing,
    Plan,
    ReaderBatch,
    ReaderFailure,
    ReaderReport,
    SampleStream,
)
from pipeline.data.shards import (
    DataError,
    DatasetReaders,
    ShuffleStream,
    TrainPlan,
    epoch_order,
    load_split,
    split_shards,
)
from pipeline.progressive import Stage

NUM_CLASSES = 5


def _jpeg(i: int, size=(24, 20)) -> bytes:
    rng = np.random.default_rng(i)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, sizes, *, split="train", prefix="", num_classes=NUM_CLASSES, wnids=None,
                 corrupt=(), multi_label=False, name_prefix="") -> list[str]:
    """Tiny shards in the toolkit's format plus info.json; returns the keys in write order."""
    root.mkdir(parents=True, exist_ok=True)
    info_path = root / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
    else:
        wnids = wnids or [f"n{c:08d}" for c in range(num_classes)]
        info = {"format": "effnetv2-shards", "version": 1, "name": root.name, "num_classes": len(wnids),
                "classes": [{"index": c, "wnid": w, "name": f"class {w}"} for c, w in enumerate(wnids)],
                "multi_label": multi_label, "splits": {}}
    keys, shards, idx = [], [], 0
    for j, n in enumerate(sizes):
        name = f"{split}-{j:06d}.tar"
        with open(root / name, "wb") as f, wds.TarWriter(f) as w:
            for _ in range(n):
                key = f"{prefix}{split}{idx:05d}"
                label = idx % info["num_classes"]
                sample = {"__key__": key, "cls": str(label).encode(),
                          "jpg": b"\xff\xd8 not a jpeg" if key in corrupt else _jpeg(idx),
                          "json": json.dumps({"labels": [label, (label + 1) % info["num_classes"]]}
                                             if multi_label else {}).encode()}
                w.write(sample)
                keys.append(key)
                idx += 1
        shards.append({"name": name_prefix + name if name_prefix else name, "samples": n,
                       "bytes": (root / name).stat().st_size})
    info["splits"][split] = {"samples": sum(sizes), "shards": shards}
    info_path.write_text(json.dumps(info))
    return keys


def stage(size=32, mbs=4, randaug=5.0, mixup=0.0, cutmix=0.0, index=0) -> Stage:
    return Stage(index=index, start_step=0, end_step=10**6, image_size=size, randaug=randaug, mixup=mixup,
                 cutmix=cutmix, dropout=0.1, drop_path=None, micro_batch_size=mbs)


def cfg_for(roots, **kw) -> DataConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    return DataConfig(train=[str(r) for r in roots], **kw)


def loader(cfg, *, rank=0, world=1, st=None, mbs=4, seed=0, **kw):
    return build_train_loader(cfg, stage=st or stage(mbs=mbs), micro_batch_size=mbs, num_classes=0,
                              label_smoothing=0.1, seed=seed, rank=rank, world_size=world, **kw)


def take(ld, n):
    return [next(ld) for _ in range(n)]


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def one_epoch(ld):
    """The batches of the loader's current epoch (stops when the epoch counter moves on)."""
    epoch, out = ld.epoch, []
    n = ld.batches_per_epoch()
    for _ in range(n):
        out.append(next(ld))
    assert ld.epoch == epoch
    return out


@pytest.fixture
def data8(tmp_path):
    """8 equal shards of 6 samples (48)."""
    keys = write_shards(tmp_path / "d8", [6] * 8)
    return tmp_path / "d8", keys


# ------------------------------------------------------------------------------------------ index / plan


def test_info_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(DataError, match="python -m shards write"):
        load_split(str(tmp_path / "nowhere"), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "info.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an effnetv2-shards info file"):
        load_split(str(tmp_path / "bad"), "train")
    write_shards(tmp_path / "ok", [3, 3])
    with pytest.raises(DataError, match=r"no split 'val' \(it has: train\)"):
        load_split(str(tmp_path / "ok"), "val")
    (tmp_path / "ok" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="1 of 2 train shards .* do not exist"):
        load_split(str(tmp_path / "ok"), "train")


def test_shard_order_is_seeded_and_split_by_rank_then_worker():
    assert epoch_order(10, 0, 0) == epoch_order(10, 0, 0)
    assert epoch_order(10, 0, 0) != epoch_order(10, 0, 1)
    assert sorted(epoch_order(10, 3, 7)) == list(range(10))
    counts = [5] * 8
    split = split_shards(list(range(8)), counts, 2, 2)
    # rank 0 gets 0, 2, 4, 6 (round-robin by samples), its workers alternate within that
    assert split == [[[0, 4], [2, 6]], [[1, 5], [3, 7]]]
    # uneven sizes: the groups' totals stay within one shard of each other
    counts = [9, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    groups = split_shards(list(range(10)), counts, 2, 1)
    totals = [sum(counts[i] for i in g[0]) for g in groups]
    assert abs(totals[0] - totals[1]) <= 9


def test_too_few_shards_is_a_clear_error(tmp_path):
    write_shards(tmp_path / "d", [4, 4, 4])
    cfg = cfg_for([tmp_path / "d"], workers=2)
    with pytest.raises(DataError, match=r"3 shards but 2 ranks x 2 workers = 4 readers need at least 4.*"
                                         r"--shard-size.*data\.workers"):
        loader(cfg, rank=0, world=2)
    loader(cfg_for([tmp_path / "d"], workers=2, resampled=True), rank=0, world=2, mbs=2)  # no minimum


def test_fast_forward_materializes_only_the_buffer(data8):
    root, _ = data8
    split = load_split(str(root), "train")
    plan = TrainPlan([split], weights=None, seed=0, world_size=1, workers=1, resampled=False, shuffle_buffer=4)
    direct = plan.stream(0, 0, 0, fetch=DatasetReaders([split]))
    ref = [direct.next() for _ in range(plan.quota(0))]
    fetch = DatasetReaders([split])
    s = plan.stream(0, 0, 0, fetch=fetch)
    s.skip(40)  # of 48: the first shards are never opened
    assert fetch.opened <= 3
    rest = []
    while s.remaining:
        rest.append(s.next())
    assert [a for a, _ in rest] == [a for a, _ in ref[40:]]
    assert [c["__key__"] for _, c in rest] == [c["__key__"] for _, c in ref[40:]]
    assert [c["jpg"] for _, c in rest] == [c["jpg"] for _, c in ref[40:]]


def test_shuffle_stream_same_addresses_with_and_without_content():
    def mk():
        return ShuffleStream(iter(range(100)), 10, random.Random(3), 90, fetch=lambda a: a * 2)
    a, b = mk(), mk()
    full = [a.next() for _ in range(90)]
    b.skip(30)
    rest = [b.next() for _ in range(60)]
    assert rest == full[30:]
    assert sorted(x for x, _ in full) != list(range(90)) or True  # shuffled, not sorted
    assert [x for x, _ in full] != list(range(90))


# ------------------------------------------------------------------------------------------ train loader


def test_two_ranks_two_workers_disjoint_and_cover_the_epoch(data8):
    root, all_keys = data8
    cfg = cfg_for([root], workers=2)
    per_rank = []
    for rank in range(2):
        ld = loader(cfg, rank=rank, world=2, mbs=3)
        assert ld.batches_per_epoch() == 8  # 48 / (2 ranks x 2 readers) = 12 each: 4 batches of 3 per reader
        batches = one_epoch(ld)
        assert all(b["image"].shape == (3, 3, 32, 32) for b in batches)
        assert all(b["target"].shape == (3, NUM_CLASSES) for b in batches)
        per_rank.append(keys_of(batches))
        ld.close()
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys)


def test_uneven_shards_give_equal_batch_counts(tmp_path):
    sizes = [7, 13, 5, 9, 11, 3, 8, 6]
    write_shards(tmp_path / "u", sizes)
    cfg = cfg_for([tmp_path / "u"], workers=2)
    counts, seen = [], []
    for rank in range(2):
        ld = loader(cfg, rank=rank, world=2, mbs=2)
        n = 0
        while n < ld.batches_per_epoch():
            seen.extend(next(ld)["key"])
            n += 1
        assert ld.epoch == 0
        # the next batch starts epoch 1: the epoch really had exactly n batches
        next(ld)
        assert ld.epoch == 1
        counts.append(n)
        ld.close()
    assert counts[0] == counts[1] > 0
    assert len(seen) == len(set(seen))  # nobody repeats a sample within the epoch


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_exact_resume(data8, world, workers):
    root, _ = data8
    cfg = cfg_for([root], workers=workers)
    total, cut = 14, 5  # 48 / world / 4 per batch: crosses at least one epoch boundary
    for rank in range(world):
        ref_ld = loader(cfg, rank=rank, world=world)
        ref = take(ref_ld, total)
        ref_ld.close()
        ld = loader(cfg, rank=rank, world=world)
        first = take(ld, cut)
        state = ld.state_dict()
        ld.close()
        resumed = loader(cfg, rank=rank, world=world)
        resumed.load_state_dict(state)
        rest = take(resumed, total - cut)
        resumed.close()
        assert keys_of(first + rest) == keys_of(ref)
        for a, b in zip(first + rest, ref):
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["target"], b["target"])


def test_resume_mid_epoch_keeps_counters_and_refuses_other_data(data8, tmp_path):
    root, _ = data8
    cfg = cfg_for([root], workers=0)
    ld = loader(cfg)
    take(ld, 3)
    state = ld.state_dict()
    assert state["samples_seen"] == 12 and state["bad_samples"] == 0
    other = tmp_path / "other"
    write_shards(other, [6] * 7)
    with pytest.raises(DataError, match="data or its order changed"):
        loader(cfg_for([other])).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_buffer"):
        loader(cfg_for([root], shuffle_buffer=16)).load_state_dict(state)


def test_stage_change_mid_epoch_changes_size_and_keeps_keys(data8):
    root, _ = data8
    cfg = cfg_for([root], workers=2)
    ref_ld = loader(cfg, st=stage(size=32))
    ref = take(ref_ld, 10)
    ref_ld.close()
    ld = loader(cfg, st=stage(size=32))
    first = take(ld, 3)
    ld.set_stage(stage(size=48, randaug=10.0, index=1))
    rest = take(ld, 7)
    ld.close()
    assert keys_of(first + rest) == keys_of(ref)
    assert [b["image"].shape[-1] for b in first + rest] == [32] * 3 + [48] * 7


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_changes_at_epoch_ends_are_not_empty_epochs(data8, workers):
    """Stages as long as an epoch: every stage change restarts the readers when they have just delivered the
    epoch's last batch. The restarted readers have nothing left; that is the end of a full epoch, not an empty
    one (two "empty" epochs in a row used to stop the run with 'produced no batch in a whole epoch')."""
    root, all_keys = data8
    ld = loader(cfg_for([root], workers=workers), mbs=4)
    per_epoch = ld.batches_per_epoch()
    seen = []
    for s in range(4):
        ld.set_stage(stage(size=24 + 8 * s, mbs=4, index=s))
        seen.append(take(ld, per_epoch))
        assert ld.epoch == s
    ld.close()
    for batches in seen:
        assert sorted(keys_of(batches)) == sorted(all_keys)  # each stage one whole epoch, nothing lost


def test_stage_change_with_new_batch_size_loses_and_repeats_nothing(data8):
    root, all_keys = data8
    cfg = cfg_for([root], workers=2)
    ld = loader(cfg, mbs=4)
    batches = take(ld, 3)  # 12 samples
    ld.set_stage(stage(size=40, mbs=6, index=1))
    while True:
        b = next(ld)
        if ld.epoch != 0:
            break
        batches.append(b)
    keys = keys_of(batches)
    assert [len(b["key"]) for b in batches[3:]] == [6] * len(batches[3:])
    assert len(keys) == len(set(keys))
    # each reader has 24 samples: 4 + 4 + 4 at mbs 4 (3 batches over 2 readers), then 6-batches until < 6 left
    assert len(keys) >= len(all_keys) - 2 * 5


def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path):
    root = tmp_path / "bad"
    write_shards(root, [6, 6, 6, 6], corrupt={"train00002"})
    # cut shard 3 inside the jpg of its 4th sample: samples 3, 4, 5 of that shard are lost
    tar = root / "train-000003.tar"
    with tarfile.open(tar) as tf:
        members = [m for m in tf.getmembers()]
    names = sorted({m.name.split(".")[0] for m in members})
    jpg = next(m for m in members if m.name == f"{names[3]}.jpg")
    data = tar.read_bytes()
    tar.write_bytes(data[: jpg.offset_data + 20])
    cfg = cfg_for([root], workers=2, max_bad_fraction=0.5)
    ld = loader(cfg, mbs=4)
    batches = one_epoch(ld)
    ld.close()
    assert ld.bad_samples == 1 + 3
    assert ld.samples_seen == 24
    got = keys_of(batches)
    assert len(got) == 24  # batch sizes are kept: bad samples are replaced inside their batch
    assert "train00002" not in got
    assert not {names[3], names[4], names[5]} & set(got)
    assert all(torch.isfinite(b["image"]).all() for b in batches)
    # over the threshold: one clear error naming the shard and the fix
    ld = loader(cfg_for([root], workers=0, max_bad_fraction=0.05), mbs=4)
    with pytest.raises(DataError, match=r"could not be read or decoded.*max_bad_fraction.*shards verify") as err:
        for _ in range(12):
            next(ld)
    # the readers' reports carry the bad samples into the message: key, shard and reason
    assert re.search(r"Recent: .*train00002 in \S*train-000000\.tar: DecodeError", str(err.value))


def test_resume_counts_bad_samples_like_the_uninterrupted_run(tmp_path):
    root = tmp_path / "bad"
    write_shards(root, [6, 6, 6, 6], corrupt={"train00002", "train00013", "train00020"})
    cfg = cfg_for([root], workers=2, max_bad_fraction=0.5)
    ref = loader(cfg)
    ref_keys = keys_of(take(ref, 6))
    ld = loader(cfg)
    first = take(ld, 2)
    state = ld.state_dict()
    ld.close()
    res = loader(cfg)
    res.load_state_dict(state)
    rest = take(res, 4)
    res.close()
    assert keys_of(first + rest) == ref_keys
    assert res.bad_samples == ref.bad_samples
    ref.close()


def test_in_process_reading_leaves_the_global_rng_alone(data8):
    root, _ = data8
    ld = loader(cfg_for([root], workers=0))
    torch.manual_seed(123)
    random.seed(123)
    next(ld)
    a, b = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(a, torch.rand(3)) and b == random.random()


def test_pipe_urls_stream_the_same_samples(data8, tmp_path):
    root, _ = data8
    info = json.loads((root / "info.json").read_text())
    remote = tmp_path / "remote"
    remote.mkdir()
    for s in info["splits"]["train"]["shards"]:
        s["name"] = f"pipe:cat {root / s['name']}"
    (remote / "info.json").write_text(json.dumps(info))
    # commands inside a dataset's info.json run only when the user allows it (data.allow_pipe)
    with pytest.raises(DataError, match=r"shell command \(pipe:\); refused.*data.allow_pipe=true"):
        loader(cfg_for([remote], workers=2))
    ref = loader(cfg_for([root], workers=2))
    via_pipe = loader(cfg_for([remote], workers=2, allow_pipe=True))
    assert keys_of(take(via_pipe, 6)) == keys_of(take(ref, 6))
    # and fast-forward through a pipe
    state = via_pipe.state_dict()
    again = loader(cfg_for([remote], workers=2, allow_pipe=True))
    again.load_state_dict(state)
    assert keys_of(take(again, 3)) == keys_of(take(ref, 3))
    for x in (ref, via_pipe, again):
        x.close()


def test_resampled_mode_is_endless_and_resumes(tmp_path):
    write_shards(tmp_path / "r", [5, 5, 5])
    cfg = cfg_for([tmp_path / "r"], workers=0, resampled=True)
    ld = loader(cfg, mbs=3)
    ref = keys_of(take(ld, 12))  # several nominal epochs
    assert ld.epoch >= 2
    again = loader(cfg, mbs=3)
    take(again, 4)
    state = again.state_dict()
    res = loader(cfg, mbs=3)
    res.load_state_dict(state)
    assert keys_of(take(res, 8)) == ref[12:]


def test_weighted_datasets_interleave_deterministically(tmp_path):
    wn = [f"n{c:08d}" for c in range(6)]
    write_shards(tmp_path / "big", [8, 8, 8, 8], prefix="big", wnids=wn)
    write_shards(tmp_path / "small", [4, 4], prefix="small", wnids=[wn[4], wn[1]])  # another label order
    cfg = cfg_for([tmp_path / "big", tmp_path / "small"], workers=0, train_weights=[0.5, 0.5])
    a, b = loader(cfg, mbs=4), loader(cfg, mbs=4)
    ka, kb = keys_of(take(a, 10)), keys_of(take(b, 10))
    assert ka == kb
    n_small = sum(k.startswith("small") for k in ka)
    assert 8 < n_small < 32  # about half of 40, and the small set (8) repeats
    # labels of the small set are mapped by wnid into the big set's classes
    c = loader(cfg_for([tmp_path / "big", tmp_path / "small"], workers=0, train_weights=[0.0, 1.0]), mbs=4)
    batches = take(c, 6)  # 24 draws of the small set's 8 samples: each comes several times
    assert set(torch.cat([b["target"] for b in batches]).argmax(1).tolist()) <= {4, 1}
    first_image = {}
    repeats_differ = []
    for b in batches:
        for k, im in zip(b["key"], b["image"]):
            if k in first_image:
                repeats_differ.append(not torch.equal(first_image[k], im))
            first_image.setdefault(k, im)
    assert repeats_differ and all(repeats_differ)  # a repeat gets a fresh augmentation
    # without weights: one pass over both, nothing twice
    d = loader(cfg_for([tmp_path / "big", tmp_path / "small"], workers=0), mbs=4)
    keys = keys_of(one_epoch(d))
    assert len(keys) == 40 and len(set(keys)) == 40


def test_world_size_change_continues_the_epoch_without_repeats(data8):
    root, all_keys = data8
    seen = []
    states = []
    for rank in range(2):
        ld = loader(cfg_for([root], workers=0), rank=rank, world=2)
        seen += keys_of(take(ld, 2))  # 16 of 48
        states.append(ld.state_dict())
    one = loader(cfg_for([root], workers=2), rank=0, world=1)
    one.load_state_dict(states[0])
    assert one.epoch == 0
    while True:
        b = next(one)
        if one.epoch != 0:
            break
        seen += b["key"]
    assert len(seen) == len(set(seen))
    assert len(seen) >= 48 - 2 * 3  # at most one partial batch per new reader is left for the next epoch


def test_micro_batch_larger_than_a_readers_share_is_refused(tmp_path):
    write_shards(tmp_path / "t", [2, 2])
    with pytest.raises(DataError, match="fewer than the micro-batch size 4"):
        loader(cfg_for([tmp_path / "t"], workers=2), mbs=4)


# ------------------------------------------------------------------------------------------ eval loader


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_loader_covers_each_sample_once(tmp_path, workers):
    root = tmp_path / "v"
    write_shards(root, [6] * 4, split="train")
    val_keys = write_shards(root, [5, 3, 7], split="val", prefix="v")
    cfg = cfg_for([root], workers=workers)
    seen, lengths = [], []
    for rank in range(2):
        ev = build_eval_loader(cfg, image_size=24, micro_batch_size=4, rank=rank, world_size=2)
        batches = list(ev)
        lengths.append(len(batches))
        assert len(batches) == len(ev)
        for b in batches:
            assert b["image"].shape == (4, 3, 24, 24) and b["valid"].shape == (4,)
            assert (b["label"][~b["valid"]] == -1).all()
            seen += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert lengths[0] == lengths[1]
    assert sorted(seen) == sorted(val_keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_batches_of_multi_label_data_and_their_bad_samples(tmp_path, workers):
    root = tmp_path / "mv"
    write_shards(root, [6] * 4, multi_label=True)
    val_keys = write_shards(root, [5, 4], split="val", prefix="v", corrupt={"vval00003"}, multi_label=True)
    ev = build_eval_loader(cfg_for([root], workers=workers), image_size=24, micro_batch_size=4)
    batches = list(ev)
    assert ev.bad_samples == 1 and all(type(b) is EvalBatch for b in batches)
    for b in batches:
        assert "labels" in b and b["labels"] is b.labels and b.labels.shape == (4, NUM_CLASSES)
        assert (b.labels.sum(1) == 2 * b.valid).all()  # two labels per real sample, none on padding / bad ones
    got = [k for b in batches for k, v in zip(b.key, b.valid.tolist()) if v]
    assert sorted(got) == sorted(set(val_keys) - {"vval00003"})


def test_reader_processes_can_be_spawned(data8):
    """The per-worker dataset pickles (spawn start method, macOS), transform and plan included."""
    import pickle

    root, _ = data8
    ld = loader(cfg_for([root], workers=2))
    next(ld)
    clone = pickle.loads(pickle.dumps(ld._dl.dataset))
    assert clone.plan.quota(0) == ld.quota
    ld.close()


def test_mixing_and_multi_label_targets_resume_exactly(tmp_path):
    root = tmp_path / "ml"
    write_shards(root, [6] * 4, multi_label=True)
    cfg = cfg_for([root], workers=2)
    st = stage(mixup=0.8, cutmix=1.0)
    ref = loader(cfg, st=st)
    ref_b = take(ref, 5)
    ref.close()
    for b in ref_b:
        assert torch.allclose(b["target"].sum(1), torch.ones(4))
    plain = next(loader(cfg, st=stage()))
    # two labels per sample, 1/2 each, smoothed: (1 - 0.1) / 2 + 0.1 / 5
    assert torch.allclose(plain["target"].max(1).values, torch.full((4,), 0.9 / 2 + 0.1 / NUM_CLASSES))
    ld = loader(cfg, st=st)
    first = take(ld, 2)
    state = ld.state_dict()
    ld.close()
    res = loader(cfg, st=st)
    res.load_state_dict(state)
    for a, b in zip(first + take(res, 3), ref_b):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    res.close()


@pytest.mark.parametrize("cut", [2, 9])
def test_resume_after_batch_size_changes_matches_uninterrupted(tmp_path, cut):
    """Readers end unevenly after a micro-batch change; the restarted round-robin must follow the same order."""
    root = tmp_path / "u"
    write_shards(root, [5, 9, 4, 8, 7, 3])
    cfg = cfg_for([root], workers=2)
    plan = {3: stage(size=32, mbs=5, index=1), 7: stage(size=40, mbs=2, index=2)}  # at batch i: new stage

    def run(n, start=0, ld=None):
        ld = ld or loader(cfg, mbs=3)
        out = []
        for i in range(start, n):
            if i in plan:
                ld.set_stage(plan[i])
            out.append(next(ld))
        return ld, out

    ref_ld, ref = run(16)
    ref_ld.close()
    ld, first = run(cut)
    state = ld.state_dict()
    ld.close()
    res = loader(cfg, mbs=3)
    current = max((i for i in plan if i < cut), default=None)
    if current is not None:
        res.set_stage(plan[current])  # the trainer sets the stage of the resumed step
    res.load_state_dict(state)
    _, rest = run(16, cut, res)
    res.close()
    assert [b["key"] for b in first + rest] == [b["key"] for b in ref]


# ------------------------------------------------------------------------------- reader -> loader protocol


def test_plans_streams_and_fetches_implement_the_protocol(data8):
    root, keys = data8
    split = load_split(str(root), "train")
    plan = TrainPlan([split], weights=None, seed=0, world_size=1, workers=2, resampled=False, shuffle_buffer=4)
    fetch = DatasetReaders([split])
    assert isinstance(plan, Plan) and isinstance(fetch, Fetch)
    stream = plan.stream(0, 0, 1, fetch=fetch)
    assert isinstance(stream, SampleStream)
    address, content = stream.next()
    assert type(address) is Address and address._fields == ("dataset", "instance", "shard", "member", "occurrence")
    assert plan.global_index(address) == (0, split.offsets[address.shard] + address.member)
    assert content["__key__"] == keys[plan.global_index(address)[1]]  # keys in write order: the global index
    assert next(plan.delivered(0, 0, 1, 1)) == address
    fetch.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_typed_records_that_read_like_dicts(data8, workers):
    root, _ = data8
    ld = loader(cfg_for([root], workers=workers), mbs=3)
    b = next(ld)
    ld.close()
    assert type(b) is Batch
    assert b["image"] is b.image and b["target"] is b.target and b["key"] is b.key
    assert set(b) == set(b.keys()) == set(dict(b)) == {"image", "target", "key"} and "valid" not in b
    with pytest.raises(KeyError):
        b["__reader"]
    assert b.image.shape == (3, 3, 32, 32) and len(b.key) == 3


def test_reader_records_pickle_and_pin_through_the_dataloader(monkeypatch):
    """What a worker sends: it pickles, the DataLoader's conversion leaves it alone, and pin_memory pins the
    batch's tensors (without a pin_memory method the DataLoader would leave an unknown object unpinned)."""
    from torch.utils.data._utils.collate import default_convert
    from torch.utils.data._utils.pin_memory import pin_memory

    bad = Missing("k1", "/x/train-000000.tar", "DecodeError: no")
    rec = ReaderBatch(Batch(image=torch.rand(2, 3, 4, 4), target=torch.rand(2, 5), key=["k0", "k0"]),
                      ReaderReport(reader=1, position=8, samples=2, bad=1, bad_examples=(bad,)))
    back = pickle.loads(pickle.dumps(rec))
    assert back.report == rec.report and back.batch.key == rec.batch.key
    assert torch.equal(back.batch.image, rec.batch.image) and torch.equal(back.batch.target, rec.batch.target)
    assert default_convert(rec) is rec
    assert pickle.loads(pickle.dumps(ReaderFailure("broken"))) == ReaderFailure("broken")
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    out = pin_memory(rec)
    assert type(out) is ReaderBatch and out.report == rec.report and len(pinned) == 2
    assert out.batch.image is not rec.batch.image and torch.equal(out.batch.image, rec.batch.image)
    ev = EvalBatch(image=torch.zeros(2, 3, 4, 4), valid=torch.ones(2, dtype=torch.bool),
                   label=torch.zeros(2, dtype=torch.long), key=["a", "b"])
    pinned.clear()
    assert type(pin_memory(ReaderBatch(ev, rec.report)).batch) is EvalBatch and len(pinned) == 3
    assert "labels" not in ev and set(ev) == {"image", "valid", "label", "key"}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_reader_failure_reaches_the_training_process(tmp_path, workers):
    root = tmp_path / "allbad"
    keys = [f"train{i:05d}" for i in range(16)]
    write_shards(root, [4] * 4, corrupt=set(keys))
    ld = loader(cfg_for([root], workers=workers, max_bad_fraction=1.0), mbs=4)
    with pytest.raises(DataError, match=r"all 4 samples of a batch failed and no readable replacement"):
        next(ld)
    ld.close()


def test_the_loader_takes_a_stage_only(data8):
    from types import SimpleNamespace

    root, _ = data8
    cfg = cfg_for([root])
    fake = SimpleNamespace(image_size=32, randaug=0.0, mixup=0.0, cutmix=0.0, micro_batch_size=4)
    with pytest.raises(TypeError, match="pipeline.progressive.Stage"):
        loader(cfg, st=fake)
    ld = loader(cfg)
    with pytest.raises(TypeError, match="pipeline.progressive.Stage"):
        ld.set_stage(fake)
    # the plain stage of the defaults: no RandAugment, no mixing, the loader's micro-batch size
    ld.set_stage(Stage(index=0, start_step=0, end_step=1, image_size=40))
    b = next(ld)
    assert b.image.shape == (4, 3, 40, 40)
    assert ld.micro_batch_size == 4


# ------------------------------------------------------------------------------------------ worker start


def test_fork_server_workers_give_the_forked_workers_batches_and_ignore_job_signals(data8):
    """data.worker_start: forkserver workers (the default) give the images, targets and keys forked ones give,
    for training and evaluation; SIGUSR1 and SIGTERM to every process under the loader, as SLURM signals every
    process of a job step, neither kill a worker or the fork server nor change a batch."""
    from pipeline.watchdog import child_pids

    root, _ = data8
    got = {}
    for method in ("fork", "forkserver"):
        cfg = cfg_for([root], workers=2, worker_start=method)
        ld = loader(cfg, mbs=3)
        batches = take(ld, 3)
        if method == "forkserver":
            under = child_pids()
            assert len(under) >= 3  # the server and its two workers
            for pid in under:
                for sig in (signal.SIGUSR1, signal.SIGTERM):
                    os.kill(pid, sig)
            time.sleep(0.5)
            assert set(under) <= set(child_pids())  # every one still there
        batches += take(ld, 5)
        ld.close()
        ev = build_eval_loader(cfg, image_size=32, micro_batch_size=4, num_classes=NUM_CLASSES, split="train")
        got[method] = (batches, list(ev))
    (train_a, eval_a), (train_b, eval_b) = got["fork"], got["forkserver"]
    assert keys_of(train_a) == keys_of(train_b)
    for a, b in zip(train_a, train_b):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert [e["key"] for e in eval_a] == [e["key"] for e in eval_b] and len(eval_a) > 0
    for a, b in zip(eval_a, eval_b):
        assert torch.equal(a["image"], b["image"])


def _report_from_a_worker(parent, out: str) -> None:
    parent.install()
    print("a warning from the worker", file=sys.stderr, flush=True)
    Path(out).write_text(os.environ.get("EFFNETV2_TEST_PROBE", "unset"))


def test_fork_server_workers_see_the_current_environment_and_output(tmp_path, monkeypatch, capfd):
    """What the training process set or redirected after the fork server started (credentials, captured output)
    reaches a worker from the server, as it would reach a forked one."""
    from pipeline.data.workers import ParentState, worker_context

    ctx = worker_context("forkserver")  # starts the server now, if no earlier test did
    monkeypatch.setenv("EFFNETV2_TEST_PROBE", "set after the server started")
    proc = ctx.Process(target=_report_from_a_worker, args=(ParentState(), str(tmp_path / "env.txt")))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert (tmp_path / "env.txt").read_text() == "set after the server started"
    assert "a warning from the worker" in capfd.readouterr().err
