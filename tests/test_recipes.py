"""Every shipped recipe starts as users start it: each file in configs/pretrain/ on 2 ranks through torchrun
(DeepSpeed on CPU), each file in configs/finetune/ on 2 processes through accelerate, with the file's own model.

Only data paths, step counts (for M, L and XL also the number of stages), batch sizes and image sizes are overridden
(plus the run dir and the fine-tune init), so whatever else a recipe sets (ZeRO stage, channels_last, optimizer,
schedule, presets, mixup, cutout, loader workers, EMA, label smoothing ...) runs as shipped. A pretraining recipe
runs one step per progressive stage (M, L and XL: their first and last stage only, see ALL_STAGES), so it saves at
every stage boundary and at the end, then evaluates; a fine-tuning recipe runs 2 steps, saves and evaluates.
Fine-tuning recipes start from the export of the run their header names: ImageNet-1k fine-tunes from the ImageNet-21k
pretraining of the same model, transfer sets from the ImageNet-1k fine-tune, the demo from the tiny pretraining, so
every model size is chained through export as a user would.

Images are 40-48 px (the stages' sizes step from 40 to 48, evaluation at 48): any size from 33 to 64 px
leaves a 2x2 map after the stride-32 stem and stages, which keeps the cost down; at 32 px the map is 1x1 and
train-mode BatchNorm over 2 samples per rank makes the gradients overflow (XL: NaN), which says nothing about
the recipe.

Time (2 cores): a launch's start-up is ~6 s (the tiny recipe's whole 3-step run takes 8 s); what dominates for
S to XL is per-parameter work that grouping launches would not remove: the optimizer steps, the EMA, a
checkpoint at each of the four stage boundaries (XL: ~4 GB each), evaluation of raw and EMA weights, export,
and for fine-tuning DDP's first step. So every recipe is its own launch, exactly as a user starts it;
``recipes0/timings.json`` in pytest's temporary folder has each launch's seconds.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

import pretrain_launch as launch
from ds_launch import child_env
from pipeline.checkpoint import rank_file, read_marker
from pipeline.config import load_config
from pipeline.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = sorted((REPO / "configs/pretrain").glob("*.yaml"))
FINETUNE = sorted((REPO / "configs/finetune").glob("*.yaml"))
RANKS = 2
TIMEOUT_S = 900  # per launch; the XL pretraining recipe takes ~1.5 minutes here

# Where each fine-tuning recipe starts, as its header's command line says (init=runs/pretrain_xl/export is the
# xl_in21k run; the transfer recipes start from runs/finetune_in1k_s/export).
INIT_FROM = {
    "in1k_s.yaml": "pretrain/s_in21k.yaml",
    "in1k_m.yaml": "pretrain/m_in21k.yaml",
    "in1k_l.yaml": "pretrain/l_in21k.yaml",
    "in1k_xl.yaml": "pretrain/xl_in21k.yaml",
    "cars.yaml": "finetune/in1k_s.yaml",
    "cifar10.yaml": "finetune/in1k_s.yaml",
    "cifar100.yaml": "finetune/in1k_s.yaml",
    "flowers102.yaml": "finetune/in1k_s.yaml",
    "demo.yaml": "pretrain/tiny_cpu.yaml",
}
# The ImageNet fine-tunes train on the pretraining set (its classes carry wnids, so the new head is seeded
# from the pretrained head's rows); the transfer recipes on the separate transfer set.
TRANSFER_DATA = {"cars.yaml", "cifar10.yaml", "cifar100.yaml", "flowers102.yaml", "demo.yaml"}

# Small demo sets: 20 train shards, so that every one of 2 ranks x 8 loader workers (the transfer recipes'
# data.workers) has data; 2 validation images per class.
PRE_CLASSES, PRE_PER_CLASS, PRE_VAL = 10, 24, 2
TR_CLASSES, TR_PER_CLASS, TR_VAL = 5, 32, 2
MIN_SIZE, SIZE = 40, 48
GLOBAL_BATCH, MICRO_BATCH, EVAL_BATCH = 4, 2, 10
FINETUNE_STEPS = 2

pytestmark = pytest.mark.slow

# The S and tiny recipes run every progressive stage as shipped; M, L and XL run their first and last stage only
# (progressive.num_stages=2: the smallest and the largest image size and regularization of the recipe). Their
# other stages run the same code, and each stage boundary costs them a checkpoint of 1-4 GB and seconds of
# optimizer step here (the suite's time budget).
ALL_STAGES = {"efficientnetv2_s", "efficientnetv2_test"}


def stages_run(cfg) -> int:
    """The steps (one per stage) a pretraining recipe runs here."""
    if not cfg.progressive.enabled:
        return 2
    return cfg.progressive.num_stages if cfg.model.name in ALL_STAGES else min(2, cfg.progressive.num_stages)


def _param(path: Path, kind: str):
    return pytest.param(path, id=f"{kind}/{path.name}")


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """What a finished launch left behind, read before its checkpoint shards are deleted."""

    config: Path
    run_dir: Path
    command: list[str]
    returncode: int
    log: Path
    checkpoints: dict[int, dict] = field(default_factory=dict)  # step -> COMPLETE.json of each complete one
    rank_files: dict[int, list[bool]] = field(default_factory=dict)  # step -> rank file present, per rank
    export: Optional[Path] = None
    export_error: Optional[str] = None

    def failure(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines()
                 if "[WARNING]" not in ln and "[INFO]" not in ln and ln.strip()]
        return (f"{self.config.relative_to(REPO)} failed (exit {self.returncode}):\n$ {' '.join(self.command)}\n"
                + "\n".join(lines[-50:]))


class Recipes:
    """Runs each recipe once per session (fine-tunes pull in the run they start from) and keeps its facts.

    The checkpoint shards of a finished run are deleted once read (an XL checkpoint is ~4 GB, three are kept
    per run): the runs' facts, logs and exports stay.
    """

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[str, Run] = {}
        self.timings: dict[str, float] = {}
        self.pre_data = root / "data" / "pretrain"
        self.transfer_data = root / "data" / "transfer"
        self._write_shards()

    def _write_shards(self) -> None:
        common = ["--image-size", str(SIZE), "--shard-size", "12", "--no-progress", "--workers", "1"]
        for kind, out, args in (
                ("pretrain", self.pre_data, ["--classes", PRE_CLASSES, "--per-class", PRE_PER_CLASS,
                                             "--val-per-class", PRE_VAL]),
                ("transfer", self.transfer_data, ["--classes", TR_CLASSES, "--per-class", TR_PER_CLASS,
                                                  "--val-per-class", TR_VAL, "--shard-size", "8"])):
            cmd = [sys.executable, "-m", "shards", "write", "demo", kind, str(out), *common, *map(str, args)]
            subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env=child_env(), timeout=300)

    def get(self, key: str) -> Run:
        """``key``: 'pretrain/NAME.yaml' or 'finetune/NAME.yaml'."""
        if key not in self.runs:
            kind, name = key.split("/")
            self.runs[key] = self._pretrain(name) if kind == "pretrain" else self._finetune(name)
        return self.runs[key]

    # the launches -------------------------------------------------------------------------------------------

    def _pretrain(self, name: str) -> Run:
        config = REPO / "configs/pretrain" / name
        cfg = load_config(config)
        run_dir = self.root / "pretrain" / config.stem
        # one step per progressive stage: every stage is entered (its size, RandAugment, mixup, dropout)
        steps = stages_run(cfg)
        stages = [f"progressive.num_stages={steps}"] if cfg.progressive.enabled else []
        overrides = [*stages, f"data.train=[{self.pre_data}]", f"train.run_dir={run_dir}", f"train.total_steps={steps}",
                     f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO_BATCH}",
                     f"eval.micro_batch_size={EVAL_BATCH}", f"progressive.min_image_size={MIN_SIZE}",
                     f"progressive.max_image_size={SIZE}", f"data.eval_image_size={SIZE}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "pipeline.pretrain", "--config", str(config),
               *overrides]
        run = self._launch(config, run_dir, cmd)
        if run.returncode == 0 and f"pretrain/{name}" in INIT_FROM.values():
            out = run_dir / "export"
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pipeline.export", str(run_dir), "--ema", "--out", str(out)],
                                  cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
            self._timed(f"export pretrain/{name}", t0)
            if proc.returncode == 0:
                run.export = out
            else:
                run.export_error = f"export of {run_dir} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        self._drop_shards(run)
        return run

    def _finetune(self, name: str) -> Run:
        config = REPO / "configs/finetune" / name
        if name not in INIT_FROM:
            pytest.fail(f"configs/finetune/{name} has no INIT_FROM entry in {Path(__file__).name}: add the run "
                        "its header's init= names")
        source = self.get(INIT_FROM[name])
        if source.returncode != 0 or source.export is None:
            pytest.fail(f"{INIT_FROM[name]}, the run configs/finetune/{name} starts from, failed: "
                        + (source.export_error or source.failure()))
        data = self.transfer_data if name in TRANSFER_DATA else self.pre_data
        run_dir = self.root / "finetune" / config.stem
        overrides = [f"init={source.export}", f"data.train=[{data}]", f"train.run_dir={run_dir}",
                     f"train.total_steps={FINETUNE_STEPS}", f"train.global_batch_size={GLOBAL_BATCH}",
                     f"train.micro_batch_size={MICRO_BATCH}", f"eval.micro_batch_size={EVAL_BATCH}",
                     f"progressive.min_image_size={SIZE}", f"progressive.max_image_size={SIZE}",
                     f"data.eval_image_size={SIZE}"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(RANKS),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "pipeline.finetune", "--config", str(config), *overrides]
        run = self._launch(config, run_dir, cmd)
        if run.returncode == 0:
            run.export = run_dir / "export"  # the fine-tune exports itself; transfer recipes start from it
        self._drop_shards(run)
        return run

    def _launch(self, config: Path, run_dir: Path, cmd: list[str]) -> Run:
        log = self.root / "logs" / f"{config.parent.name}_{config.stem}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(PYTHONWARNINGS="ignore"), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # the whole tree: torchrun starts every rank in a session of its own, so killing the launcher's
                # process group would leave the ranks (and their loader workers) running
                launch.kill9(proc)
                rc = -1
                f.write(f"\n(timed out after {TIMEOUT_S}s; killed)\n")
        self._timed(f"{config.parent.name}/{config.name}", t0)
        run = Run(config=config, run_dir=run_dir, command=cmd, returncode=rc, log=log)
        ckpts = run_dir / "checkpoints"
        for tag in sorted(ckpts.glob("step-*")) if ckpts.is_dir() else []:
            marker = read_marker(tag)
            if marker is not None:
                run.checkpoints[marker["step"]] = marker
                run.rank_files[marker["step"]] = [rank_file(tag, r).is_file() for r in range(RANKS)]
        return run

    def _timed(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.perf_counter() - t0, 1)
        (self.root / "timings.json").write_text(json.dumps(self.timings, indent=1))

    @staticmethod
    def _drop_shards(run: Run) -> None:
        shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    yield Recipes(root)
    # the exports (up to ~0.8 GB for XL) are not worth keeping in pytest's last three temp folders; logs stay
    for export in root.glob("*/*/export"):
        shutil.rmtree(export, ignore_errors=True)


def _read(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def _check_checkpoints(run: Run, final_step: int) -> None:
    assert run.checkpoints, f"{run.run_dir}: no complete checkpoint (COMPLETE.json)"
    assert max(run.checkpoints) == final_step, sorted(run.checkpoints)
    for step, marker in run.checkpoints.items():
        assert marker["world_size"] == RANKS, (step, marker)
        assert all(run.rank_files[step]), f"step {step}: rank files present per rank {run.rank_files[step]}"


def _check_eval(result: dict, samples: int) -> None:
    for kind in ("raw", "ema"):  # every recipe keeps an EMA
        r = result[kind]
        n = r.get("samples", r.get("images"))
        assert n == samples, (kind, r)  # the whole validation split, across both ranks
        assert 0.0 <= r["top1"] <= r["top5"] <= 100.0, (kind, r)


# ---------------------------------------------------------------------------------------------- the tests


def test_every_finetune_recipe_knows_where_it_starts():
    """A new fine-tuning recipe must say which run it starts from, and that run must be of the same model."""
    for path in FINETUNE:
        assert path.name in INIT_FROM, f"configs/finetune/{path.name}: add it to INIT_FROM"
        source = REPO / "configs" / INIT_FROM[path.name]
        assert load_config(source).model.name == load_config(path).model.name, (path.name, INIT_FROM[path.name])
    assert set(INIT_FROM) == {p.name for p in FINETUNE}, "INIT_FROM names a recipe that no longer exists"


@pytest.mark.parametrize("config", [_param(p, "pretrain") for p in PRETRAIN])
def test_pretrain_recipe_starts_on_two_ranks(recipes, config):
    run = recipes.get(f"pretrain/{config.name}")
    assert run.returncode == 0, run.failure()
    assert run.export_error is None, run.export_error
    cfg = load_config(config)
    summary = _read(run.run_dir / "summary.json")
    assert summary["world_size"] == RANKS and not summary["preempted"]
    assert summary["zero_stage"] == cfg.train.zero_stage
    steps = summary["total_steps"]
    assert summary["step"] == steps == stages_run(cfg)
    # a checkpoint at every stage boundary and at the end; the recipe's keep_last pruned the older ones
    _check_checkpoints(run, steps)
    assert len(run.checkpoints) == min(steps, cfg.checkpoint.keep_last)
    final_loss = summary["losses"][-1][1]
    assert math.isfinite(final_loss), summary["losses"]
    last = _read_lines(run.run_dir / "train_log.jsonl")[-1]
    assert math.isfinite(last["grad_norm"]), last
    # DeepSpeed skips a step whose gradients are not finite and only says so in its log
    assert "OVERFLOW" not in run.log.read_text(errors="replace"), run.failure()
    _check_eval(summary["eval"], PRE_CLASSES * PRE_VAL)
    resolved = _read_yaml(run.run_dir / "config.yaml")
    assert resolved["model"]["name"] == cfg.model.name
    assert resolved["model"]["channels_last"] == cfg.model.channels_last


@pytest.mark.parametrize("config", [_param(p, "finetune") for p in FINETUNE])
def test_finetune_recipe_starts_on_two_processes(recipes, config):
    run = recipes.get(f"finetune/{config.name}")
    assert run.returncode == 0, run.failure()
    cfg = load_config(config)
    metrics = _read(run.run_dir / "metrics.json")
    assert metrics["step"] == metrics["total_steps"] == FINETUNE_STEPS
    assert metrics["model"] == cfg.model.name
    source = recipes.get(INIT_FROM[config.name])
    assert Path(metrics["init"]) == source.export and metrics["init_kind"] == "export"
    _check_checkpoints(run, FINETUNE_STEPS)
    val = TR_CLASSES * TR_VAL if config.name in TRANSFER_DATA else PRE_CLASSES * PRE_VAL
    _check_eval(metrics["results"], val)
    assert (run.export / "model.safetensors").is_file()
    log = _read_lines(run.run_dir / "train_log.jsonl")
    assert log and all(math.isfinite(r["loss"]) for r in log), log


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
