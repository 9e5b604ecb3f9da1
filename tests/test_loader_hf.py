"""The Hugging Face datasets source: sample shape, column errors, split by rank / worker, exact resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data.hf import HFSource, load_hf_dataset  # noqa: E402
from pipeline.data.loader import build_eval_loader, build_train_loader  # noqa: E402
from pipeline.data.shards import DataError  # noqa: E402
from pipeline.progressive import Stage  # noqa: E402


def _png(i: int) -> bytes:
    arr = (np.random.default_rng(i).random((20, 24, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A DatasetDict (train 30 / test 10) with Image + ClassLabel features, saved to disk."""
    root = tmp_path_factory.mktemp("hf") / "tiny"
    feats = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"]),
                               "note": datasets.Value("string")})

    def part(n, off):
        return datasets.Dataset.from_dict(
            {"img": [{"bytes": _png(off + i), "path": None} for i in range(n)],
             "fine": [(off + i) % 3 for i in range(n)], "note": [f"s{off + i}" for i in range(n)]}, features=feats)

    datasets.DatasetDict({"train": part(30, 0), "test": part(10, 100)}).save_to_disk(str(root))
    return root


def _cfg(root, **kw):
    kw.setdefault("workers", 0)
    return DataConfig(hf_dataset=str(root), hf_image_column="img", hf_label_column="fine", **kw)


def _stage(mbs=4):
    return Stage(index=0, start_step=0, end_step=10**6, image_size=24, randaug=0.0, mixup=0.0, cutmix=0.0,
                 dropout=0.1, drop_path=None, micro_batch_size=mbs)


def _loader(cfg, rank=0, world=1, mbs=4):
    return build_train_loader(cfg, stage=_stage(mbs), micro_batch_size=mbs, seed=1, rank=rank, world_size=world)


def test_samples_have_the_shard_shape(hf_folder):
    src = HFSource(load_hf_dataset(str(hf_folder), "train"), image_column="img", label_column="fine", name="tiny")
    assert len(src) == 30 and src.num_classes == 3 and [c["name"] for c in src.classes] == ["a", "b", "c"]
    s = src.sample(4)
    assert s["jpg"] == _png(4)  # the stored bytes, not re-encoded
    assert int(s["cls"]) == 1 and s["__key__"].endswith("#4")


def test_missing_column_lists_the_columns(hf_folder):
    with pytest.raises(DataError, match=r"no column 'image' \(columns: img, fine, note\).*hf_image_column"):
        HFSource(load_hf_dataset(str(hf_folder), "train"), image_column="image", label_column="fine")
    with pytest.raises(DataError, match=r"no split 'validation' \(it has: train, test\)"):
        load_hf_dataset(str(hf_folder), "validation")
    with pytest.raises(DataError, match="not in the local Hugging Face cache"):
        load_hf_dataset("no-such-user/no-such-dataset-xyz", "train")


def test_ranks_and_workers_split_the_epoch(hf_folder):
    seen = []
    for rank in range(2):
        ld = _loader(_cfg(hf_folder, workers=2), rank=rank, world=2, mbs=3)
        assert ld.batches_per_epoch() == 4  # 30 // 4 readers = 7 each: 2 batches of 3 per reader, 2 readers
        for _ in range(ld.batches_per_epoch()):
            seen += next(ld)["key"]
        ld.close()
    assert len(seen) == 24 and len(set(seen)) == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(hf_folder, workers):
    cfg = _cfg(hf_folder, workers=workers)
    ref = _loader(cfg)
    ref_b = [next(ref) for _ in range(10)]  # 7 batches per epoch: crosses into epoch 1
    ld = _loader(cfg)
    first = [next(ld) for _ in range(3)]
    state = ld.state_dict()
    ld.close()
    res = _loader(cfg)
    res.load_state_dict(state)
    rest = [next(res) for _ in range(7)]
    for a, b in zip(first + rest, ref_b):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])
    for x in (ref, res):
        x.close()


def test_world_size_change(hf_folder):
    seen, states = [], []
    for rank in range(2):
        ld = _loader(_cfg(hf_folder), rank=rank, world=2, mbs=3)
        seen += next(ld)["key"]
        states.append(ld.state_dict())
    one = _loader(_cfg(hf_folder), mbs=3)
    one.load_state_dict(states[1])
    while True:
        b = next(one)
        if one.epoch:
            break
        seen += b["key"]
    assert len(seen) == len(set(seen)) >= 30 - 2


def test_eval_covers_the_test_split(hf_folder):
    keys = []
    for rank in range(2):
        ev = build_eval_loader(_cfg(hf_folder), image_size=16, micro_batch_size=4, rank=rank, world_size=2)
        for b in ev:
            keys += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
    assert sorted(keys) == sorted(f"{hf_folder} [test]#{i}" for i in range(10))


def test_the_datasets_source_implements_the_protocol(hf_folder):
    from pipeline.data.hf import HFPlan, row_address
    from pipeline.data.protocol import Address, Fetch, Plan, SampleStream

    src = HFSource(load_hf_dataset(str(hf_folder), "train"), image_column="img", label_column="fine", name="tiny")
    plan = HFPlan(len(src), seed=1, world_size=1, workers=2)
    assert isinstance(plan, Plan) and isinstance(src, Fetch)
    stream = plan.stream(0, 0, 1, fetch=src)
    assert isinstance(stream, SampleStream)
    address, sample = stream.next()
    assert type(address) is Address and address == row_address(address.member) == (0, 0, 0, address.member, 0)
    assert plan.global_index(address) == (0, address.member) and sample["__key__"] == f"tiny#{address.member}"
    assert next(plan.delivered(0, 0, 1, 1)) == address


def test_data_folder_loads_with_load_dataset(tmp_path):
    # a plain folder of parquet files (what a hub dataset's files look like), loaded offline
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(6)],
                                     "label": [i % 2 for i in range(6)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["x", "y"])}))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    src = HFSource(load_hf_dataset(str(tmp_path / "pq"), "train"))
    assert len(src) == 6 and src.sample(3)["jpg"] == _png(3) and int(src.sample(3)["cls"]) == 1
