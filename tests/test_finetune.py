"""Fine-tuning: init resolution, head seeding by wnid, bad input, and accelerate runs on CPU (1 and 2 processes,
resume, a datasets dataset without shards, init from a DeepSpeed checkpoint)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_launch import child_env
from pipeline import finetune_lib as fl
from pipeline.config import ModelConfig
from pipeline.export import load_export, model_from_export, save_export
from pipeline.metrics import topk_correct
from pipeline.models import create_model, to_timm_state_dict

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
MODEL = "efficientnetv2_test"
SIZE = 48  # image side of the tiny runs


def _wnid(i: int) -> str:
    return f"n{1000 + i:08d}"


def _export(path: Path, num_classes: int, classes=None, seed: int = 0, name: str = MODEL) -> Path:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    classes = classes if classes is not None else [
        {"index": i, "wnid": _wnid(i), "name": f"class {i}"} for i in range(num_classes)]
    meta = {"architecture": {"name": name, "num_classes": num_classes,
                             "options": {"bn_eps": 1e-3, "bn_momentum": 0.1, "padding": "symmetric"}},
            "classes": classes, "image_size": {"train": SIZE, "eval": SIZE}, "mean": [0.5] * 3, "std": [0.5] * 3,
            "source": {"run_dir": "test", "tag": "step-00000000", "step": 0, "weights": "ema"}}
    return save_export(model.state_dict(), meta, path)


# A transfer set that a randomly initialised tiny model learns in a few dozen steps: the class is the dominant
# colour (with noise, brightness changes and a clutter square), so "accuracy above chance" checks the pipeline
# (labels, targets, evaluation, resume), not the model's capacity. Class folders are wnids, as in ImageNet.
COLOURS = {"n01440764": (200, 40, 40), "n01443537": (40, 180, 40), "n01484850": (40, 60, 200),
           "n01491361": (210, 200, 40)}


def _colour_images(seed: int, per_class: int):
    """(wnid, index, PIL image) for every image of the colour set."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for wnid, rgb in COLOURS.items():
        for i in range(per_class):
            a = np.array(rgb) * rng.uniform(0.6, 1.2) + rng.normal(0, 30, (SIZE, SIZE, 3))
            y, x = rng.integers(0, SIZE - SIZE // 4, 2)
            a[y:y + SIZE // 4, x:x + SIZE // 4] = rng.integers(0, 256, 3)
            yield wnid, i, Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def transfer(tmp_path_factory) -> Path:
    """Shards of the colour set, written by the toolkit from an image folder: 4 classes x 40 train / 12 val."""
    from shards.cli import main as shards_main

    root = tmp_path_factory.mktemp("data")
    for wnid, i, im in _colour_images(0, 52):
        (root / "images" / wnid).mkdir(parents=True, exist_ok=True)
        im.save(root / "images" / wnid / f"{wnid}_{i}.jpg", quality=90)
    out = root / "transfer"
    rc = shards_main(["write", "imagefolder", str(root / "images"), str(out), "--val-per-class", "12",
                      "--shard-size", "16", "--workers", "1", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A "21k" export with 8 classes, two of which (rows 6 and 3) are target classes."""
    classes = [{"index": i, "wnid": _wnid(i), "name": f"class {i}"} for i in range(8)]
    classes[6]["wnid"], classes[3]["wnid"] = "n01443537", "n01491361"
    return _export(tmp_path_factory.mktemp("init") / "export", num_classes=8, classes=classes)


def _overrides(run_dir: Path, data: Path, init: Path, **extra) -> list[str]:
    base = {"init": str(init), "data.train": f"[{data}]", "train.run_dir": str(run_dir),
            "progressive.min_image_size": SIZE, "progressive.max_image_size": SIZE, "data.eval_image_size": SIZE,
            "data.cutout": SIZE // 2, "data.eval_crop_threshold": 0, "optim.name": "rmsprop_tf",
            "optim.lr_per_256": 0.032, "train.total_steps": 24, "checkpoint.every_steps": 12, "train.log_every": 4}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ------------------------------------------------------------------------------------------ head seeding


def test_seed_head_rows_copies_matching_wnids():
    old_classes = [{"index": i, "wnid": _wnid(i), "name": str(i)} for i in range(5)]
    new_classes = [{"index": 0, "wnid": _wnid(3)}, {"index": 1, "wnid": "n99999999"}, {"index": 2, "wnid": _wnid(0)},
                   {"index": 3, "wnid": None}]
    old_w, old_b = torch.randn(5, 6), torch.randn(5)
    head = torch.nn.Linear(6, 4)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    n = fl.seed_head_rows(head, old_w, old_b, old_classes, new_classes)
    assert n == 2
    assert torch.equal(head.weight[0], old_w[3]) and torch.equal(head.bias[0], old_b[3])
    assert torch.equal(head.weight[2], old_w[0]) and torch.equal(head.bias[2], old_b[0])
    for row in (1, 3):  # no match: the fresh initialisation stays
        assert torch.equal(head.weight[row], before[0][row]) and torch.equal(head.bias[row], before[1][row])


def test_build_model_21k_to_1k_seeds_rows_and_loads_backbone(tmp_path, capsys):
    # "21k": 8 classes; "1k": 4 classes, three of them among the 8 (in another order), one new
    src = _export(tmp_path / "export", num_classes=8)
    init = fl.load_init(fl.classify_init(str(src)))
    target = [{"index": 0, "wnid": _wnid(5), "name": "a"}, {"index": 1, "wnid": _wnid(1), "name": "b"},
              {"index": 2, "wnid": "n77777777", "name": "new"}, {"index": 3, "wnid": _wnid(7), "name": "d"}]
    model = fl.build_model(init, ModelConfig(name=MODEL), target, head_seed=True)
    assert "seeded 3 of 4 classifier rows from the pretrained head (matched by wnid)" in capsys.readouterr().out
    sd, ref = model.state_dict(), init.state_dict
    for k, v in ref.items():
        if not k.startswith("classifier."):
            assert torch.equal(sd[k], v), k
    for new_row, old_row in ((0, 5), (1, 1), (3, 7)):
        assert torch.equal(sd["classifier.weight"][new_row], ref["classifier.weight"][old_row])
        assert torch.equal(sd["classifier.bias"][new_row], ref["classifier.bias"][old_row])
    assert not torch.equal(sd["classifier.weight"][2], ref["classifier.weight"][2])

    fresh = fl.build_model(init, ModelConfig(name=MODEL), target, head_seed=False)
    assert "new classifier for 4 classes" in capsys.readouterr().out
    assert not torch.equal(fresh.state_dict()["classifier.weight"][0], ref["classifier.weight"][5])


def test_classify_init_kinds(tmp_path, pretrained):
    assert fl.classify_init(str(pretrained)).kind == "export"
    step = tmp_path / "run" / "checkpoints" / "step-00000040"
    step.mkdir(parents=True)
    src = fl.classify_init(str(tmp_path / "run"))
    assert (src.kind, src.run_dir, src.step) == ("deepspeed", tmp_path / "run", None)
    src = fl.classify_init(str(step))
    assert (src.kind, src.run_dir, src.step) == ("deepspeed", tmp_path / "run", 40)
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert fl.classify_init(str(tmp_path / "w.safetensors")).kind == "timm"
    for bad, why in ((tmp_path / "nope", "does not exist"), (tmp_path / "run" / "checkpoints", "neither an export"),
                     (tmp_path / "notes.txt", "not a checkpoint")):
        if bad.suffix == ".txt":
            bad.write_text("x")
        with pytest.raises(fl.FinetuneError, match=why):
            fl.classify_init(str(bad))
    with pytest.raises(fl.FinetuneError, match="init: not set"):
        fl.classify_init(None)


def test_timm_file_init_prefers_ema_weights(tmp_path, capsys):
    torch.manual_seed(1)
    raw, ema = create_model(MODEL, num_classes=8), create_model(MODEL, num_classes=8)
    path = tmp_path / "timm_ckpt.pth"
    torch.save({"epoch": 3, "state_dict": to_timm_state_dict(raw), "state_dict_ema": to_timm_state_dict(ema)}, path)
    init = fl.load_init(fl.classify_init(str(path)), weights="auto", allow_pickle=True)  # a pickle: opted in
    assert init.weights == "ema"
    model = fl.build_model(init, ModelConfig(name=MODEL), [{"index": i} for i in range(3)], head_seed=True)
    assert torch.equal(model.state_dict()["stem.conv.weight"], ema.state_dict()["stem.conv.weight"])
    assert model.classifier.out_features == 3
    assert fl.load_init(fl.classify_init(str(path)), weights="raw", allow_pickle=True).weights == "raw"
    with pytest.raises(fl.FinetuneError, match="does not fit efficientnetv2_b0"):
        fl.build_model(init, ModelConfig(name="efficientnetv2_b0"), [{"index": 0}], head_seed=True)


def test_class_list_has_one_entry_per_class():
    got = fl.class_list([{"index": 2, "wnid": "n00000002", "name": "two"}, "n00000001"], 3)  # str: by position
    assert [c["index"] for c in got] == [0, 1, 2]
    assert got[0] == {"index": 0, "wnid": None, "name": "0"} and got[1]["wnid"] == "n00000001"
    assert got[2]["name"] == "two"
    assert len(fl.class_list((), 5)) == 5  # integer labels without names (a datasets Value column)


def test_topk_and_result_table():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.15], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), (1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([1, 2, 0]), (1, 5)) == [1, 3]  # k capped at the class count
    table = fl.result_table({"raw": {"top1": 50.0, "top5": 100.0, "samples": 8}})
    assert "raw" in table and "50.00" in table and "100.00" in table


# ------------------------------------------------------------------------------------------ bad input


def _main_error(capsys, overrides) -> str:
    from pipeline.finetune import main

    rc = main(["--config", "configs/finetune/demo.yaml", *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_one_clear_message_each(tmp_path, capsys, transfer, pretrained, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    run = tmp_path / "run"
    msg = _main_error(capsys, _overrides(run, transfer, tmp_path / "missing_export"))
    assert "init=" in msg and "does not exist" in msg

    other = _export(tmp_path / "b0_export", num_classes=8, name="efficientnetv2_b0")
    msg = _main_error(capsys, _overrides(run, transfer, other))
    assert "holds efficientnetv2_b0 weights but model.name is efficientnetv2_test" in msg

    msg = _main_error(capsys, _overrides(run, transfer, pretrained, **{"model.num_classes": 7}))
    assert "model.num_classes=7" in msg and "has 4 classes" in msg and "model.num_classes=0" in msg

    ds = _hf_dataset(tmp_path / "hf", n_per_class=2)
    capsys.readouterr()
    msg = _main_error(capsys, _overrides(run, transfer, pretrained, **{
        "data.train": "[]", "data.hf_dataset": str(ds), "data.hf_image_column": "picture"}))
    assert "no column 'picture'" in msg and "data.hf_image_column" in msg
    assert not run.exists()  # nothing started


def test_cli_exit_code(tmp_path, subprocess_env, repo_root, transfer):
    res = subprocess.run([PY, "-m", "pipeline.finetune", "--config", "configs/finetune/demo.yaml",
                          *_overrides(tmp_path / "run", transfer, tmp_path / "nope")],
                         cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "error: init=" in res.stderr


# ------------------------------------------------------------------------------------------ runs


def _hf_dataset(path: Path, n_per_class: int = 40, n_test: int = 8) -> Path:
    """A datasets DatasetDict on disk (train / test; Image + ClassLabel columns) of the colour set."""
    import io

    import datasets

    datasets.disable_progress_bars()
    names = list(COLOURS)

    def split(seed: int, n: int) -> datasets.Dataset:
        rows = {"image": [], "label": []}
        for wnid, _, im in _colour_images(seed, n):
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            rows["image"].append({"bytes": buf.getvalue(), "path": None})
            rows["label"].append(names.index(wnid))
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict(rows, features=feats)

    datasets.DatasetDict({"train": split(1, n_per_class), "test": split(2, n_test)}).save_to_disk(str(path))
    return path


def _launch_cmd(overrides, processes: int = 1) -> list[str]:
    if processes == 1:
        cmd = [PY, "-m", "pipeline.finetune"]
    else:  # --multi_gpu on a machine without GPUs: that many CPU processes on gloo
        cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", "-m", "pipeline.finetune"]
    return cmd + ["--config", "configs/finetune/demo.yaml", *overrides]


def _launch(repo_root, env, overrides, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(_launch_cmd(overrides, processes), cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def module_env():
    """conftest's subprocess_env for module-scoped runs (that fixture is per test)."""
    return child_env()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, module_env, transfer, pretrained):
    """One uninterrupted single-process run from the "21k" export (checkpoints at steps 12 and 24)."""
    run = tmp_path_factory.mktemp("full") / "run"
    res = _launch(REPO, module_env, _overrides(run, transfer, pretrained))
    return run, res


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, module_env, transfer) -> Path:
    """A 3-step DeepSpeed (ZeRO-2, CPU) pretraining run of the tiny model on the colour shards, with EMA."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    cmd = [PY, "-m", "pipeline.pretrain", "--config", "configs/pretrain/tiny_cpu.yaml", f"data.train=[{transfer}]",
           f"train.run_dir={run}", "train.total_steps=3", "progressive.num_stages=1", "ema.enabled=true"]
    res = subprocess.run(cmd, cwd=REPO, env=module_env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run


@pytest.mark.slow
def test_finetune_one_process_learns_and_exports(full_run):
    run, res = full_run
    assert "seeded 2 of 4 classifier rows from the pretrained head (matched by wnid)" in res.stdout
    m = _metrics(run)
    assert m["step"] == 24 and m["num_classes"] == 4
    for w in ("raw", "ema"):
        assert m["results"][w]["samples"] == 48
    assert max(m["results"]["raw"]["top1"], m["results"]["ema"]["top1"]) > 60.0, m  # chance: 25 %
    assert "top-1" in res.stdout  # the printed table
    model, meta = model_from_export(run / "export")
    assert meta["architecture"]["num_classes"] == 4 and meta["source"]["weights"] == "ema"
    assert [c["wnid"] for c in meta["classes"]] == list(COLOURS)
    assert list((run / "tb").rglob("events.out.tfevents.*")), "no TensorBoard events"


@pytest.mark.slow
def test_resume_continues_from_saved_step(tmp_path, repo_root, subprocess_env, transfer, pretrained, full_run):
    """A run interrupted after its step-12 checkpoint (the step-24 one only half written) resumes at step 12
    and ends with exactly the weights of the uninterrupted run."""
    full, cut = full_run[0], tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000012", cut / "checkpoints" / "step-00000012")
    partial = cut / "checkpoints" / "step-00000024"
    shutil.copytree(full / "checkpoints" / "step-00000024", partial)
    (partial / "COMPLETE.json").unlink()  # killed while saving: must not be resumed from
    res = _launch(repo_root, subprocess_env, _overrides(cut, transfer, pretrained))
    assert "(step 12)" in res.stdout + res.stderr
    a, _ = load_export(full / "export")
    b, _ = load_export(cut / "export")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(cut)["results"] == _metrics(full)["results"]


@pytest.mark.slow
def test_init_from_deepspeed_checkpoint_equals_its_export(tmp_path, pretrain_run, capsys):
    from pipeline.export import export_checkpoint

    export = export_checkpoint(pretrain_run, ema=True, out_dir=tmp_path / "export")
    target = fl.normalize_classes([{"index": i, "wnid": w, "name": w} for i, w in enumerate(COLOURS)])
    models = []
    for path in (pretrain_run, pretrain_run / "checkpoints" / "step-00000003", export):
        src = fl.classify_init(str(path))
        if src.kind == "deepspeed":  # what the fine-tuning main process does, EMA weights preferred
            src = fl.InitSource("export", fl.consolidate_deepspeed(src, tmp_path / f"c{len(models)}"))
        init = fl.load_init(src)
        assert init.weights == "ema"
        models.append(fl.build_model(init, ModelConfig(name=MODEL), target, head_seed=True).state_dict())
    assert capsys.readouterr().out.count("seeded 4 of 4 classifier rows") == 3
    # a consolidated init is reused on resume only when it comes from the same run and step
    assert fl.export_is_of(export, fl.classify_init(str(pretrain_run)))
    assert not fl.export_is_of(export, fl.InitSource("deepspeed", pretrain_run, run_dir=pretrain_run, step=2))
    for other in models[1:]:
        assert other.keys() == models[0].keys()
        for k in models[0]:
            assert torch.equal(models[0][k], other[k]), k


@pytest.mark.slow
def test_finetune_two_processes_from_deepspeed_checkpoint(tmp_path, repo_root, subprocess_env, transfer,
                                                          pretrain_run):
    run = tmp_path / "run"
    res = _launch(repo_root, subprocess_env, _overrides(run, transfer, pretrain_run / "checkpoints" /
                                                        "step-00000003"), processes=2)
    assert "seeded 4 of 4 classifier rows" in res.stdout
    m = _metrics(run)
    assert m["step"] == 24 and m["init_kind"] == "deepspeed"
    assert m["results"]["raw"]["samples"] == 48  # every test image once across the two processes
    assert max(m["results"]["raw"]["top1"], m["results"]["ema"]["top1"]) > 60.0, m
    ranks = sorted(p.name for p in (run / "checkpoints").glob("step-*/rank-*.pt"))
    assert ranks == ["rank-00000.pt"] * 2 + ["rank-00001.pt"] * 2  # per-rank loader / RNG state, 2 checkpoints
    _, meta = load_export(run / "init_export")  # consolidated once, by the main process
    assert meta["source"]["weights"] == "ema" and meta["source"]["step"] == 3


@pytest.mark.slow
def test_datasets_dataset_trains_without_shards(tmp_path, repo_root, subprocess_env, pretrained):
    """Straight from a save_to_disk folder; also progressive learning: 2 stages (32 -> 48 px, RandAugment and
    dropout rising), the second with a smaller micro-batch (more accumulation steps for the same batch)."""
    ds = _hf_dataset(tmp_path / "hf")
    run = tmp_path / "run"
    res = _launch(repo_root, subprocess_env, _overrides(run, Path("unused"), pretrained, **{
        "data.train": "[]", "data.hf_dataset": str(ds), "data.hf_val_split": "test",
        "progressive.enabled": "true", "progressive.num_stages": 2, "progressive.min_image_size": 32,
        "progressive.min_randaug": 0, "progressive.max_randaug": 2, "progressive.min_dropout": 0.0,
        "progressive.max_dropout": 0.1, "progressive.stage_micro_batch": "[16,8]"}))
    assert ("stage 1/2: steps 0-11, image 32px, RandAugment 0, mixup 0, cutmix 0, dropout 0, micro-batch 16 x 2 "
            "accumulation x 1 ranks") in res.stdout
    assert ("stage 2/2: steps 12-23, image 48px, RandAugment 2, mixup 0, cutmix 0, dropout 0.1, micro-batch 8 x 4 "
            "accumulation x 1 ranks") in res.stdout
    m = _metrics(run)
    assert m["split"] == "test" and m["results"]["raw"]["samples"] == 32
    assert max(m["results"]["raw"]["top1"], m["results"]["ema"]["top1"]) > 60.0, m
    assert not list(tmp_path.rglob("*.tar"))


@pytest.mark.slow
def test_preemption_signal_saves_and_exits_zero(tmp_path, module_env, transfer, pretrained):
    """SIGUSR1 (SLURM's warning before the time limit) mid-run: checkpoint at the next step, exit 0, and the
    checkpoint is one a rerun resumes from."""
    import signal
    import time

    run = tmp_path / "run"
    cmd = [PY, "-m", "pipeline.finetune", "--config", "configs/finetune/demo.yaml",
           *_overrides(run, transfer, pretrained, **{"train.total_steps": 5000, "checkpoint.every_steps": 0})]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(module_env, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        for line in proc.stdout:  # the handler is installed before the stage line is printed
            out.append(line)
            if "stage 1/1:" in line:
                time.sleep(1.0)
                proc.send_signal(signal.SIGUSR1)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert proc.returncode == 0, text[-4000:]
    assert "preemption signal: checkpoint at step" in text
    from pipeline.checkpoint import list_checkpoints

    done = list_checkpoints(run)
    assert len(done) == 1 and 0 < done[0].step < 5000
    assert not (run / "metrics.json").exists()


# ------------------------------------------------------------------------------------------ exact resume, 2 processes

# The accelerate backend's part of the resume matrix: 2 processes, a loader worker each, dropout and stochastic
# depth on, 2 progressive stages (32 px with micro-batch 8, then 48 px with micro-batch 4: 2 accumulation steps
# under no_sync), a checkpoint every 7 of 35 steps and at the stage boundary (17). Cut by kill -9 right after
# the step-21 checkpoint (mid-stage) or the step-17 one (the boundary), or by SIGUSR1 once step 16 is logged
# (saved at the next step); the rerun must log every loss of the uninterrupted run and end with its weights,
# bit for bit.
RESUME_STEPS, RESUME_EVERY, KILL_AFTER, BOUNDARY, SIGNAL_AFTER = 35, 7, 21, 17, 16


def _resume_overrides(run: Path, transfer: Path, pretrained: Path) -> list[str]:
    return _overrides(run, transfer, pretrained, **{
        "train.total_steps": RESUME_STEPS, "checkpoint.every_steps": RESUME_EVERY, "checkpoint.keep_last": 3,
        "train.log_every": 1, "data.workers": 1, "model.drop_rate": 0.3, "train.global_batch_size": 16,
        "train.micro_batch_size": 8, "progressive.enabled": "true", "progressive.num_stages": 2,
        "progressive.min_image_size": 32, "progressive.stage_micro_batch": "[8,4]"})


@pytest.fixture(scope="module")
def straight_two(tmp_path_factory, module_env, transfer, pretrained) -> Path:
    run = tmp_path_factory.mktemp("straight_two") / "run"
    _launch(REPO, module_env, _resume_overrides(run, transfer, pretrained), processes=2)
    return run


def _final_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The final checkpoint's raw weights (accelerate's model file) and the export (EMA weights)."""
    from safetensors.torch import load_file

    from pipeline.checkpoint import latest, step_tag

    raw = load_file(str(run / "checkpoints" / step_tag(latest(run)) / "model.safetensors"))
    return {"raw": raw, "ema": load_export(run / "export")[0]}


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["kill9_mid", "kill9_boundary", "preempt_mid"])
def test_two_process_resume_with_loader_workers_is_exact(cut, tmp_path, module_env, transfer, pretrained,
                                                         straight_two):
    import pretrain_launch as launch
    from pipeline.checkpoint import latest, list_checkpoints, read_marker, step_tag

    run = tmp_path / "run"
    over = _resume_overrides(run, transfer, pretrained)
    proc = subprocess.Popen(_launch_cmd(over, 2), cwd=REPO, env=module_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if cut.startswith("kill9"):
            target = KILL_AFTER if cut == "kill9_mid" else BOUNDARY
            marker = run / "checkpoints" / step_tag(target)
            launch.wait_for(lambda: read_marker(marker) is not None, proc, 300, f"the step-{target} checkpoint",
                            poll=0.05)
            launch.kill9(proc)
            for c in list_checkpoints(run, include_incomplete=True):  # "right after": as if no later one began
                if c.step > target:
                    shutil.rmtree(c.path)
            resumed_from = latest(run)
            assert resumed_from == target
        else:
            launch.wait_for(lambda: launch.logged_steps(run) >= SIGNAL_AFTER, proc, 300, f"step {SIGNAL_AFTER}",
                            poll=0.05)
            out = launch.preempt(proc)  # accelerate launch runs torchrun's agent in its own process
            assert "preemption signal: checkpoint at step" in out
            resumed_from = latest(run)
            assert SIGNAL_AFTER <= resumed_from < KILL_AFTER, resumed_from
    finally:
        if proc.poll() is None:
            launch.kill9(proc)
    res = _launch(REPO, module_env, over, processes=2)
    assert f"(step {resumed_from})" in res.stdout + res.stderr

    a, b = launch.losses_by_step(straight_two), launch.losses_by_step(run)
    assert sorted(a) == list(range(1, RESUME_STEPS + 1)) == sorted(b)
    differ = [(s, a[s], b[s]) for s in sorted(a) if a[s] != b[s]]
    assert not differ, f"resumed from step {resumed_from}: losses differ (step, uninterrupted, resumed): {differ[:3]}"
    wa, wb = _final_weights(straight_two), _final_weights(run)
    for kind in ("raw", "ema"):
        assert wa[kind].keys() == wb[kind].keys()
        for k in wa[kind]:
            assert torch.equal(wa[kind][k], wb[kind][k]), f"final {kind} weights differ: {k}"


@pytest.mark.slow
def test_pretraining_and_finetuning_log_the_same_tensorboard_tags(pretrain_run, full_run):
    """One trainer, one set of tags: a DeepSpeed pretraining run and an accelerate fine-tuning run (both with
    EMA, stochastic depth and one stage) write the same scalar, image and text tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(run: Path) -> dict[str, set[str]]:
        acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        return {kind: set(acc.Tags()[kind]) for kind in ("scalars", "images", "tensors")}

    pre, fine = tags(pretrain_run), tags(full_run[0])
    assert {"train/loss", "train/grad_norm", "perf/images_per_s", "eval/ema_top1"} <= pre["scalars"]
    for kind in pre:
        assert pre[kind] == fine[kind], (f"{kind}: only in pretraining {sorted(pre[kind] - fine[kind])}, only in "
                                         f"fine-tuning {sorted(fine[kind] - pre[kind])}")


@pytest.mark.slow
def test_demo_summary_reads_what_the_runs_write(tmp_path, pretrain_run, full_run, transfer, capsys):
    """`make demo`'s summary from a real pretraining run's summary.json and a fine-tuning run's metrics.json."""
    from pipeline.demo import print_summary

    (tmp_path / "shards").mkdir()
    for name in ("pretrain", "transfer"):
        (tmp_path / "shards" / name).symlink_to(transfer)
    runs = {"progressive": (pretrain_run, 1.0), "fixed final size": (pretrain_run, 1.0)}
    print_summary(runs, _metrics(full_run[0]), tmp_path, full_run[0] / "export", 1.0)
    out = capsys.readouterr().out
    assert "held-out images: raw top-1" in out and "EMA top-1" in out
    assert "24 steps @48px, 48 test images: raw top-1" in out
