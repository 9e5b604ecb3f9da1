"""Config and command-line faults: a misspelt key, a wrong type, inverted stage ranges, a batch that does not
split, ZeRO options that do not fit, a resume with a changed frozen setting, and a generated sweep of typos and
wrong values. Each ends in one line on stderr that names the key, exit status 2, and no traceback.

The command-line runs that need a process of their own (the exit status of ``python -m pipeline.pretrain``, a
two-rank torchrun launch, a resume against a real run folder) start together in one module fixture; the sweep
calls the entry points' ``main()`` in-process, which is what ``python -m`` runs (``exit_process(main())``).
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch.distributed as dist

from ds_launch import child_env
from pipeline import finetune, pretrain
from pipeline.checkpoint import CheckpointManager, checkpoint_problem, read_marker
from pipeline.config import SECTIONS, Config, ConfigError, ProgressiveConfig, frozen_settings, load_config
from pipeline.distributed import free_port
from pretrain_launch import CONFIG, REPO
from shards.cli import main as shards_main

FINETUNE_CONFIG = str(REPO / "configs/finetune/demo.yaml")
ENTRY_POINTS = {"pretrain": (pretrain.main, CONFIG), "finetune": (finetune.main, FINETUNE_CONFIG)}


def cli_env() -> dict:
    """What a user's shell gives the command (warnings left on: they would be lines on stderr too)."""
    return child_env(OMP_NUM_THREADS="1")


def start(args: list[str], cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def one_error_line(err: str) -> str:
    """The single line a user error leaves on stderr (fails on a traceback or anything more)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_main(capsys, entry: str, overrides: list[str], config: str | None = None) -> tuple[int, str]:
    """``python -m pipeline.<entry> --config ... overrides`` in-process: (exit status, stderr)."""
    main, default = ENTRY_POINTS[entry]
    capsys.readouterr()
    try:
        rc = main(["--config", config or default, *overrides])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def write_tiny_shards(out: Path) -> Path:
    """The smallest demo pretraining shards the loader accepts (in-process: no second interpreter start)."""
    rc = shards_main(["write", "demo", "pretrain", str(out), "--classes", "2", "--per-class", "4", "--val-per-class",
                      "1", "--image-size", "32", "--shard-size", "4", "--no-progress", "--workers", "1"])
    assert rc == 0
    return out


# ---- the processes: started together, each test waits for its own -----------------------------------------

@pytest.fixture(scope="module", autouse=True)
def clis(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("config_cli")
    procs = {
        # a misspelt key through the real command line
        "typo": start([sys.executable, "-m", "pipeline.pretrain", "--config", CONFIG, "train.totl_steps=5"]),
        # 2 ranks x micro-batch 16 do not divide a global batch of 48 (24 per rank)
        "batch": start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "pipeline.pretrain", "--config", CONFIG,
                        "train.global_batch_size=48", f"train.run_dir={tmp / 'batch_run'}"]),
    }
    # a run folder with a complete checkpoint of seed 0, resumed with seed 7
    run_dir, shards = tmp / "run", write_tiny_shards(tmp / "shards")
    first = [f"data.train=[{shards}]", f"train.run_dir={run_dir}", "train.global_batch_size=8",
             "train.micro_batch_size=4", "eval.micro_batch_size=4"]  # 8 samples: a batch of them
    cfg = load_config(CONFIG, first)
    ckpt = CheckpointManager(cfg.checkpoint, run_dir, rank=0, world_size=1, settings=frozen_settings(cfg)).save(
        40, lambda directory, tag: (directory / tag).mkdir(parents=True, exist_ok=True))
    procs["resume"] = start([sys.executable, "-m", "pipeline.pretrain", "--config", CONFIG, *first, "train.seed=7"])
    yield {"tmp": tmp, "ckpt": ckpt, "procs": procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unknown_key_or_section_in_a_run_file_names_the_file(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("trian:\n  total_steps: 5\n")
    rc, err = run_main(capsys, "pretrain", [], config=str(run))
    line = one_error_line(err)
    assert rc == 2 and f"{run}: key 'trian'" in line and "Did you mean: 'train'?" in line, line


@pytest.mark.parametrize("override,expect", [
    ("=5", "override '=5': no key before '='"),
    ("train.total_steps", "override 'train.total_steps' is not key=value"),
    ("train=5", "key 'train': expected a section"),
    ("train.run_dir=${nope}", "key 'train.run_dir': Interpolation key 'nope' not found"),
    ("train.run_dir=[unclosed", "override 'train.run_dir=[unclosed': cannot parse YAML: did not find expected"),
])
def test_malformed_override_ends_in_one_line(capsys, override, expect):
    rc, err = run_main(capsys, "pretrain", [override])
    line = one_error_line(err)
    assert rc == 2 and expect in line, line


@pytest.mark.parametrize("text,expect", [
    ("- train\n- optim\n", "holds a list at the top, not sections"),
    ("train:\n", "key 'train': may not be empty (null)"),
    ("train:\n\ttotal_steps: 5\n", "line 2, column 1: cannot parse YAML: found character that cannot start any token"),
    ("train:\n  seed: 1\n  seed: 2\n", "line 3, column 3: cannot parse YAML: found duplicate key seed"),
])
def test_malformed_run_file_ends_in_one_line_naming_it(tmp_path, capsys, text, expect):
    run = tmp_path / "run.yaml"
    run.write_text(text)
    rc, err = run_main(capsys, "pretrain", [], config=str(run))
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"error: {run}") and expect in line, line


def test_wrong_type_names_the_key_and_the_type(tmp_path, capsys):
    rc, err = run_main(capsys, "pretrain", ["train.total_steps=ten"])
    line = one_error_line(err)
    assert rc == 2 and "key 'train.total_steps'" in line and "Integer" in line, line
    run = tmp_path / "run.yaml"
    run.write_text("optim:\n  betas: 0.9\n")
    rc, err = run_main(capsys, "pretrain", [], config=str(run))
    line = one_error_line(err)
    assert rc == 2 and f"{run}: key 'optim.betas': expected a list" in line, line


@pytest.mark.parametrize("low,high,values", [
    ("min_image_size", "max_image_size", (300, 64)),
    ("min_randaug", "max_randaug", (10.0, 2.0)),
    ("min_dropout", "max_dropout", (0.3, 0.1)),
    ("min_drop_path", "max_drop_path", (0.2, 0.1)),
])
def test_inverted_stage_range_is_refused_naming_both_ends(capsys, low, high, values):
    rc, err = run_main(capsys, "pretrain", [f"progressive.{low}={values[0]}", f"progressive.{high}={values[1]}"])
    line = one_error_line(err)
    assert rc == 2 and line.startswith(f"error: progressive.{low}: ") and f"progressive.{high}" in line, line
    with pytest.raises(ConfigError, match=f"progressive.{low}"):  # a section built in Python: the same rule
        ProgressiveConfig(**{low: values[0], high: values[1]})


@pytest.mark.parametrize("overrides,expect", [
    (["optim.name=lamb", "train.zero_stage=2"], "optim.name=lamb with train.zero_stage>0"),
    (["deepspeed.zero_optimization.stage=3"], "deepspeed.zero_optimization.stage=3: disagrees with "
                                              "train.zero_stage=2"),
    (["deepspeed.train_batch_size=64"], "deepspeed: 'train_batch_size' comes from train.global_batch_size"),
    (["deepspeed.zero_optimization=3"], "deepspeed.zero_optimization: must be a mapping"),
    (["deepspeed.zero_optimization.offload_param.device=cpu"], "deepspeed.zero_optimization.offload_param: "
                                                               "DeepSpeed offloads only with ZeRO stage 3"),
    (["train.zero_stage=0", "deepspeed.zero_optimization.offload_optimizer.device=cpu"],
     "would ignore it with train.zero_stage=0"),
])
def test_zero_options_that_do_not_fit_are_refused_before_any_process_group(capsys, overrides, expect):
    rc, err = run_main(capsys, "pretrain", overrides)
    line = one_error_line(err)
    assert rc == 2 and expect in line, line
    assert not dist.is_initialized()  # refused before DeepSpeed or a process group started


# ---- the generated sweep -------------------------------------------------------------------------------------

def _kind(hint) -> str:
    """'int', 'float', 'bool', 'str', 'choice', 'dict' or 'list_<kind>' for a schema field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "choice"
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        return _kind(next(a for a in args if a is not type(None)))
    if origin is list:
        return "list_" + _kind(args[0])
    if origin is dict:
        return "dict"
    return getattr(hint, "__name__", str(hint))  # a kind WRONG has no values for is left out of the sweep


def schema() -> dict[str, str]:
    """Every key of the real schema (dotted) with its kind."""
    keys = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            cls = type(getattr(Config(), f.name))
            for name, hint in typing.get_type_hints(cls).items():
                if name != "KEY":
                    keys[f"{f.name}.{name}"] = _kind(hint)
        else:
            keys[f.name] = _kind(typing.get_type_hints(Config)[f.name])
    return keys


WRONG = {
    "int": ["abc", "1.5", "[1, 2]", "{a: 1}"],
    "float": ["abc", "fast", "[0.5]", "{a: 1}"],
    "bool": ["maybe", "yess", "[true]", "{a: 1}"],
    "str": ["[1, 2]", "{a: 1}"],
    "choice": ["bogus", "[a]", "{a: 1}"],
    "dict": ["3", "[1, 2]", "abc"],
    "list_float": ["abc", "[a, b]", "{a: 1}", "0.5"],
    "list_int": ["abc", "[x]", "{a: 1}", "8"],
    "list_str": ["abc", "{a: 1}"],
}
"""Values of the wrong type for each kind of field."""

OUT_OF_RANGE = {
    "train.total_steps": "neg", "train.seed": "neg", "train.log_every": "nonpos",
    "train.collective_timeout_s": "nonpos", "train.global_batch_size": "nonpos", "train.micro_batch_size": "nonpos",
    "train.label_smoothing": "prob1", "train.epochs": "negf", "data.workers": "neg", "data.hflip": "prob",
    "data.max_bad_fraction": "prob", "data.eval_image_size": "nonpos", "data.shuffle_buffer": "neg",
    "data.cutout": "neg", "optim.lr_per_256": "nonposf", "optim.weight_decay": "negf", "optim.momentum": "prob1",
    "optim.clip_grad_norm": "negf", "optim.min_lr_ratio": "prob",
    "optim.warmup_steps": "neg", "ema.decay": "prob1", "ema.every": "nonpos", "checkpoint.every_steps": "neg",
    "checkpoint.preempt_check_every": "nonpos", "eval.every_steps": "neg", "eval.max_batches": "neg",
    "progressive.num_stages": "nonpos", "progressive.size_multiple": "nonpos", "progressive.min_image_size": "nonpos",
    "progressive.max_dropout": "prob1", "progressive.max_randaug": "negf", "model.drop_path_rate": "prob",
    "model.num_classes": "neg", "model.bn_eps": "nonposf", "model.bn_momentum": "prob",
}
"""Keys with a range, and how to leave it."""


def _out_of_range(rng: random.Random, how: str) -> str:
    return {"neg": lambda: str(-rng.randint(1, 10**6)), "nonpos": lambda: str(-rng.randint(0, 1000)),
            "negf": lambda: f"{-rng.uniform(0.01, 100):.3f}", "nonposf": lambda: f"{-rng.uniform(0, 10):.3f}",
            "prob": lambda: rng.choice([f"{rng.uniform(1.01, 50):.3f}", f"{-rng.uniform(0.01, 1):.3f}"]),
            "prob1": lambda: rng.choice([f"{rng.uniform(1, 50):.3f}", f"{-rng.uniform(0.01, 1):.3f}"])}[how]()


def _misspell(rng: random.Random, word: str, avoid: set[str]) -> str:
    """One random edit (swap, drop, double or replace a letter) that does not give a real name."""
    while True:
        i = rng.randrange(len(word))
        op = rng.choice(["swap", "drop", "double", "replace"])
        if op == "swap" and i < len(word) - 1:
            new = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == "drop" and len(word) > 2:
            new = word[:i] + word[i + 1:]
        elif op == "double":
            new = word[:i] + word[i] + word[i:]
        else:
            new = word[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[i + 1:]
        if new != word and new not in avoid and new.strip("_"):
            return new


@dataclasses.dataclass
class Case:
    entry: str  # pretrain / finetune
    via: str  # override / file
    what: str  # typo_key / typo_section / wrong_type / out_of_range
    key: str  # the dotted key as the user wrote it (misspelt for the typos)
    value: str
    suggestion: str = ""  # the name a typo came from

    @property
    def id(self) -> str:
        return f"{self.what}-{self.entry}-{self.via}-{self.key}={self.value}"


def sweep(seed: int = 14, counts=(("typo_key", 18), ("typo_section", 8), ("wrong_type", 22),
                                  ("out_of_range", 16))) -> list[Case]:
    rng = random.Random(seed)
    keys = schema()
    sections = {k.split(".")[0] for k in keys}
    # wrong types go round every kind of field in turn (a random pick over the keys would depend on how many
    # keys of each kind the schema has today)
    kinds = sorted({kind for kind in keys.values() if kind in WRONG})
    cases = []
    for what, n in counts:
        for i in range(n):
            entry, via = rng.choice(sorted(ENTRY_POINTS)), rng.choice(["override", "file"])
            if what == "typo_key":
                key = rng.choice(sorted(k for k in keys if not k.startswith("deepspeed")))
                *head, name = key.split(".")
                siblings = {k.split(".")[-1] for k in keys if k.split(".")[:-1] == head}
                bad = _misspell(rng, name, siblings | sections)
                cases.append(Case(entry, via, what, ".".join([*head, bad]), "1", suggestion=name))
            elif what == "typo_section":
                key = rng.choice(sorted(k for k in keys if "." in k))
                section, name = key.split(".")
                bad = _misspell(rng, section, sections)
                cases.append(Case(entry, via, what, f"{bad}.{name}", "1", suggestion=section))
            elif what == "wrong_type":
                key = rng.choice(sorted(k for k in keys if keys[k] == kinds[i % len(kinds)]))
                cases.append(Case(entry, via, what, key, rng.choice(WRONG[keys[key]])))
            else:
                key = rng.choice(sorted(OUT_OF_RANGE))
                cases.append(Case(entry, via, what, key, _out_of_range(rng, OUT_OF_RANGE[key])))
    return cases


CASES = sweep()


def test_the_sweep_is_large_and_covers_every_kind_of_field():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    kinds = schema()
    assert {kinds[c.key] for c in CASES if c.what == "wrong_type"} >= {"int", "float", "bool", "str", "choice"}
    assert {c.entry for c in CASES} == set(ENTRY_POINTS) and {c.via for c in CASES} == {"override", "file"}


def _as_file(path: Path, key: str, value: str) -> Path:
    *head, name = key.split(".")
    text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(head)) + f"{'  ' * len(head)}{name}: {value}\n"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_sweep_case_ends_in_one_line_naming_the_key_and_exit_2(case, tmp_path, capsys):
    if case.via == "file":
        run = _as_file(tmp_path / "run.yaml", case.key, case.value)
        rc, err = run_main(capsys, case.entry, [], config=str(run))
    else:
        rc, err = run_main(capsys, case.entry, [f"{case.key}={case.value}"])
    line = one_error_line(err)
    assert rc == 2, err
    named = case.key.split(".")[0] if case.what == "typo_section" else case.key
    assert named in line, line
    if case.via == "file" and case.what != "out_of_range":  # (a range is checked after merging: no file to name)
        assert str(tmp_path / "run.yaml") in line, line
    if case.suggestion:  # "Did you mean: 'x'?" or "Did you mean one of: 'x', 'y'?"
        assert "Did you mean" in line and f"'{case.suggestion}'" in line.split("Did you mean")[1], line
    assert not dist.is_initialized()


# ---- the command-line processes' results (last: the in-process tests above ran while they worked) --------

def test_unknown_key_exits_2_naming_it_with_a_suggestion(clis):
    rc, _, err = finish(clis["procs"]["typo"])
    line = one_error_line(err)
    assert rc == 2, err
    assert "key 'train.totl_steps'" in line and "Did you mean: 'total_steps'?" in line, line


def test_batch_that_does_not_split_over_ranks_fails_on_every_rank_before_training(clis):
    rc, out, err = finish(clis["procs"]["batch"])
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    # one line per rank that got to print it (torchrun stops the other rank when the first exits)
    assert rc != 0 and 1 <= len(ours) <= 2 and len(set(ours)) == 1, out + err
    assert "train.global_batch_size=48" in ours[0] and "train.micro_batch_size=16 x 2 ranks" in ours[0] \
        and "[12, 24]" in ours[0], ours[0]  # the fix: micro-batch sizes that divide 24
    assert "exitcode  : 2" in err, err  # torchrun's report: the ranks exited 2
    assert f'File "{REPO / "pipeline"}' not in err, err  # no traceback of ours (torchrun prints its own)
    assert not (clis["tmp"] / "batch_run").exists()  # refused before anything was written


def test_resume_with_a_changed_frozen_setting_is_refused_and_the_checkpoint_kept(clis):
    ckpt = clis["ckpt"]
    marker = read_marker(ckpt)
    assert marker is not None and checkpoint_problem(ckpt, marker) is None  # a complete, intact checkpoint
    rc, _, err = finish(clis["procs"]["resume"])
    line = one_error_line(err)
    assert rc == 2, err
    assert f"cannot resume from {ckpt}" in line and "train.seed: checkpoint 0 -> now 7" in line, line
    assert "checkpoint.resume=none" in line  # the way out
    assert read_marker(ckpt) == marker and sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]
