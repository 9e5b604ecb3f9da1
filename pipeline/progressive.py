"""Progressive learning: the stage table (image size and regularization per stage) as a pure function of the step.

EfficientNetV2 trains in M stages (M = 4 in the paper); every stage inherits the weights, and image size,
RandAugment magnitude, mixup / cutmix alpha and dropout rise from stage to stage. Everything about the current
stage follows from the optimizer step, so a resumed run needs nothing but the step::

    schedule = StageSchedule.from_config(cfg.progressive, total_steps=100_000)
    stage = schedule.stage_at(step)          # Stage(index=1, image_size=185, randaug=8.33, ...)
    print(schedule.format_table(cfg.train.global_batch_size))

Two presets, with the exact formulas of ``../shared/reference/efficientnetv2.md`` section 3:

``paper`` (Table 6)
    stage i of M gets ``min + (max - min) * i / (M - 1)`` for every scheduled value: the first stage runs at the
    minimum, the last at the maximum. Image size, RandAugment, mixup, cutmix and dropout are scheduled
    (drop-path too when both of its bounds are set).
``official`` (the released TF code)
    image size ``int(min + (max - min) * (i + 1) / M)`` (the first stage is already above the minimum);
    RandAugment, mixup and cutmix ``linspace(min, max, M)[i]``; dropout (and drop-path, if set) is NOT
    scheduled: every stage uses the maximum.

In both, stage i covers the steps ``[int(i / M * total), int((i + 1) / M * total))``; steps past the end stay in
the last stage. Image sizes are truncated like the reference's ``int()`` and then rounded down to
``progressive.size_multiple``. Its default, 1, keeps the reference numbers exactly (paper S: 128/185/242/300;
official L: 192/256/320/384); on GPUs 16 (or 8) gives tensor-core friendly shapes, e.g. paper L becomes
128/208/288/368 instead of 128/212/296/380.

With ``progressive.enabled: false`` there is one stage at the maximum values (dropout: ``default_dropout`` when
given, i.e. the model's own dropout, else ``max_dropout``).

``model_presets(variant, preset)`` gives the ProgressiveConfig values of paper Table 6 / the released code for
S, M, L and XL (XL uses L's ranges); ``configs/pretrain/*.yaml`` carry these values.

Command line: print the stage table of a run config::

    python -m pipeline.progressive configs/pretrain/xl_in21k.yaml [key=value ...] [--train-samples N]
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import ConfigError, ProgressiveConfig, TrainConfig, choices, load_config
from pipeline.data.protocol import Stage  # the loader's input; defined with the reader -> loader protocol
from pipeline.data.shards import DataError, is_url, load_split

PRESETS = choices(ProgressiveConfig, "preset")

# ImageNet training-set sizes, for previewing a schedule when the shards are not on this machine.
KNOWN_TRAIN_SAMPLES = {"in21k": 12_720_000, "in1k": 1_281_167}


# Per-variant ranges: (image size, RandAugment, mixup, dropout), each as (min, max).
# Paper Table 6 (cutmix is not used there). XL is not in the table: it reuses L's ranges.
_PAPER = {
    "s": dict(image=(128, 300), randaug=(5, 15), mixup=(0.0, 0.0), dropout=(0.1, 0.3)),
    "m": dict(image=(128, 380), randaug=(5, 20), mixup=(0.0, 0.2), dropout=(0.1, 0.4)),
    "l": dict(image=(128, 380), randaug=(5, 25), mixup=(0.0, 0.4), dropout=(0.1, 0.5)),
}
# Released code (effnetv2_configs.py / hparams.py): train size, max RandAugment, max mix alpha (mixup and cutmix
# alike), fixed dropout. The dropout minimum is irrelevant there (not scheduled) and set equal to the maximum.
_OFFICIAL = {
    "s": dict(image=(128, 300), randaug=(5, 10), mixup=(0.0, 0.0), dropout=(0.2, 0.2)),
    "m": dict(image=(128, 384), randaug=(5, 15), mixup=(0.0, 0.2), dropout=(0.3, 0.3)),
    "l": dict(image=(128, 384), randaug=(5, 20), mixup=(0.0, 0.5), dropout=(0.4, 0.4)),
}


def model_presets(variant: str, preset: str = "paper") -> dict:
    """ProgressiveConfig values (a dict of its keys) for EfficientNetV2 S / M / L / XL in a preset.

    ``variant`` is 's', 'm', 'l', 'xl' or a model name ending in one of them (``efficientnetv2_xl``).
    """
    v = variant.lower().rsplit("_", 1)[-1]
    if preset not in PRESETS:
        raise ValueError(f"preset '{preset}' is not one of {PRESETS}")
    table = _PAPER if preset == "paper" else _OFFICIAL
    key = "l" if v == "xl" else v
    if key not in table:
        raise ValueError(f"no progressive preset for variant '{variant}'; known: s, m, l, xl")
    r = table[key]
    # The paper schedules mixup only; the released code uses the same alpha for cutmix on the other half.
    cutmix = r["mixup"] if preset == "official" else (0.0, 0.0)
    return dict(
        enabled=True, preset=preset, num_stages=4,
        min_image_size=r["image"][0], max_image_size=r["image"][1],
        min_randaug=float(r["randaug"][0]), max_randaug=float(r["randaug"][1]),
        min_mixup=r["mixup"][0], max_mixup=r["mixup"][1],
        min_cutmix=cutmix[0], max_cutmix=cutmix[1],
        min_dropout=r["dropout"][0], max_dropout=r["dropout"][1],
    )


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _round_size(size: float, multiple: int) -> int:
    s = int(size)  # the reference's truncation
    if multiple > 1:
        s = max(multiple, s // multiple * multiple)
    return s


class StageSchedule:
    """An immutable table of stages covering steps [0, total_steps); ``stage_at(step)`` looks one up."""

    def __init__(self, stages: Sequence[Stage], total_steps: int):
        if not stages:
            raise ValueError("a stage schedule needs at least one stage")
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.total_steps = total_steps
        self._starts = [s.start_step for s in self.stages]

    @classmethod
    def from_config(cls, cfg: ProgressiveConfig, total_steps: int, *,
                    default_dropout: Optional[float] = None) -> "StageSchedule":
        """Build the table for ``total_steps`` optimizer steps.

        ``default_dropout`` is the dropout used when progressive learning is disabled (the trainer passes the
        model's dropout); None falls back to ``cfg.max_dropout``.
        """
        if total_steps < 1:
            raise ConfigError(f"total steps is {total_steps}; set train.total_steps, or train.epochs with a "
                              "dataset whose info.json gives the sample count")
        scheduled_drop_path = cfg.min_drop_path is not None and cfg.max_drop_path is not None
        micro = list(cfg.stage_micro_batch)

        if not cfg.enabled:
            dropout = cfg.max_dropout if default_dropout is None else default_dropout
            stage = Stage(index=0, start_step=0, end_step=total_steps,
                          image_size=_round_size(cfg.max_image_size, cfg.size_multiple),
                          randaug=float(cfg.max_randaug), mixup=float(cfg.max_mixup),
                          cutmix=float(cfg.max_cutmix), dropout=float(dropout),
                          drop_path=float(cfg.max_drop_path) if scheduled_drop_path else None,
                          micro_batch_size=micro[-1] if micro else None)
            return cls([stage], total_steps)

        m = cfg.num_stages  # the section checked m >= 1 and one micro-batch per stage (or none)
        if total_steps < m:
            raise ConfigError(f"train.total_steps ({total_steps}) is smaller than progressive.num_stages ({m}); "
                              "every stage needs at least one step")
        stages = []
        for i in range(m):
            # Position of stage i on the min..max line for values that reach max in the last stage.
            t_lin = i / (m - 1) if m > 1 else 1.0
            if cfg.preset == "paper":
                size = _lerp(cfg.min_image_size, cfg.max_image_size, t_lin)
                dropout = _lerp(cfg.min_dropout, cfg.max_dropout, t_lin)
                drop_path = _lerp(cfg.min_drop_path, cfg.max_drop_path, t_lin) if scheduled_drop_path else None
            else:
                size = cfg.min_image_size + (cfg.max_image_size - cfg.min_image_size) * (i + 1) / m
                dropout = cfg.max_dropout
                drop_path = cfg.max_drop_path if scheduled_drop_path else None
            stages.append(Stage(
                index=i,
                # Exact integer form of int((i + 1) / M * total): no float error on huge step counts.
                start_step=i * total_steps // m,
                end_step=(i + 1) * total_steps // m,
                image_size=_round_size(size, cfg.size_multiple),
                randaug=float(_lerp(cfg.min_randaug, cfg.max_randaug, t_lin)),
                mixup=float(_lerp(cfg.min_mixup, cfg.max_mixup, t_lin)),
                cutmix=float(_lerp(cfg.min_cutmix, cfg.max_cutmix, t_lin)),
                dropout=float(dropout),
                drop_path=None if drop_path is None else float(drop_path),
                micro_batch_size=micro[i] if micro else None,
            ))
        return cls(stages, total_steps)

    def stage_at(self, step: int) -> Stage:
        """The stage that holds at optimizer step ``step`` (0-based); steps past the end stay in the last one."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.stages[bisect.bisect_right(self._starts, step) - 1]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def format_table(self, global_batch_size: int) -> str:
        """A plain-text table: one row per stage with steps, size, regularization and images seen."""
        head = ["stage", "steps", "image", "RandAug", "mixup", "cutmix", "dropout", "drop-path", "micro-bs",
                "images"]
        rows = []
        for s in self.stages:
            rows.append([
                str(s.index), f"{s.start_step:,}-{s.end_step:,}", f"{s.image_size}px", f"{s.randaug:.2f}",
                f"{s.mixup:.3f}", f"{s.cutmix:.3f}", f"{s.dropout:.3f}",
                "model" if s.drop_path is None else f"{s.drop_path:.3f}",
                "-" if s.micro_batch_size is None else str(s.micro_batch_size),
                _human(s.num_steps * global_batch_size),
            ])
        widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
        line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append(f"{self.total_steps:,} steps x {global_batch_size:,} images = "
                   f"{_human(self.total_steps * global_batch_size)} images")
        return "\n".join(out)


def build_schedule(cfg: ProgressiveConfig, total_steps: int, *,
                   default_dropout: Optional[float] = None) -> StageSchedule:
    """Same as ``StageSchedule.from_config``."""
    return StageSchedule.from_config(cfg, total_steps, default_dropout=default_dropout)


def _human(n: int) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def resolve_total_steps(train: TrainConfig, train_samples: Optional[int]) -> int:
    """train.total_steps if set, else ceil(train.epochs * train_samples / train.global_batch_size)."""
    if train.total_steps > 0:
        return train.total_steps
    if train.epochs <= 0:
        raise ConfigError("train.total_steps and train.epochs are both 0; set one of them "
                          "(e.g. train.total_steps=100000 or train.epochs=60)")
    if not train_samples:
        raise ConfigError("train.total_steps is 0 and the training-set size is unknown, so train.epochs cannot "
                          "be turned into steps; set train.total_steps or give the sample count")
    return math.ceil(train.epochs * train_samples / train.global_batch_size)


def _samples_from_info(folders: Sequence[str], split: str) -> Optional[int]:
    """Training samples listed in the shard folders' info.json; None when a folder (or its info.json) is absent
    (a preview on a machine without the data). A present but broken info.json raises its DataError."""
    total = 0
    for folder in folders:
        if not is_url(folder) and not Path(folder, "info.json").is_file() and not Path(folder).is_file():
            return None
        total += load_split(folder, split, check_files=False).samples
    return total


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.progressive",
                                description="Print the progressive-learning stage table of a run config.")
    p.add_argument("config", help="run config, e.g. configs/pretrain/xl_in21k.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.total_steps=1000")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training-set size used to turn train.epochs into steps (default: the data's info.json; "
                        "if the shards are not here: 12,720,000 for *_in21k configs, 1,281,167 for *_in1k)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        samples = args.train_samples
        source = "--train-samples"
        if samples is None and cfg.train.total_steps <= 0:
            samples = _samples_from_info(cfg.data.train, cfg.data.train_split) if cfg.data.train else None
            source = "info.json"
            if samples is None:
                stem = Path(args.config).stem
                known = [n for tag, n in KNOWN_TRAIN_SAMPLES.items() if stem.endswith("_" + tag)]
                samples = known[0] if known else None
                source = f"the known size for '{stem}'"
        total = resolve_total_steps(cfg.train, samples)
        schedule = StageSchedule.from_config(cfg.progressive, total, default_dropout=cfg.model.drop_rate)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p_cfg = cfg.progressive
    mode = f"preset '{p_cfg.preset}'" if p_cfg.enabled else "progressive learning off"
    print(f"{args.config}: {cfg.model.name}, {mode}, {len(schedule)} stage(s), size multiple {p_cfg.size_multiple}")
    if cfg.train.total_steps <= 0:
        print(f"total steps from train.epochs {cfg.train.epochs:g} x {samples:,} samples ({source}) / "
              f"global batch {cfg.train.global_batch_size:,} = {total:,}")
    print(schedule.format_table(cfg.train.global_batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
