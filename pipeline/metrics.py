"""Run metrics: TensorBoard scalars and images, the console progress bar, throughput and per-stage accounting."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torchvision.utils import make_grid

from pipeline import distributed


class Throughput:
    """Images/s over a sliding window of steps (wall time between calls, so loader stalls count)."""

    def __init__(self, window: int = 20):
        self.window = window
        self._marks: list[tuple[float, int]] = []

    def update(self, images: int) -> None:
        total = (self._marks[-1][1] if self._marks else 0) + images
        self._marks.append((time.perf_counter(), total))
        if len(self._marks) > self.window + 1:
            self._marks.pop(0)

    def reset(self) -> None:
        self._marks.clear()

    @property
    def rate(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


class StageAccounting:
    """Wall time, steps and images per stage, for the end-of-run summary (stage index -> totals)."""

    def __init__(self):
        self.stages: dict[int, dict] = {}
        self._t = None
        self._stage = None

    def start(self, stage_index: int, image_size: int) -> None:
        self._flush()
        self._stage = stage_index
        self._t = time.perf_counter()
        self.stages.setdefault(stage_index, {"image_size": image_size, "seconds": 0.0, "images": 0, "steps": 0})

    def step(self, images: int) -> None:
        s = self.stages[self._stage]
        s["images"] += images
        s["steps"] += 1

    def _flush(self) -> None:
        if self._stage is not None and self._t is not None:
            self.stages[self._stage]["seconds"] += time.perf_counter() - self._t
            self._t = time.perf_counter()

    def summary(self) -> dict:
        self._flush()
        out = {}
        for i, s in sorted(self.stages.items()):
            out[i] = dict(s, images_per_s=s["images"] / s["seconds"] if s["seconds"] > 0 else 0.0)
        return out


class MetricsLogger:
    """TensorBoard + console on the main process; every method is a no-op elsewhere."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 subdir: str = "tb"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - tensorboard: the main process only
        from tqdm.auto import tqdm  # noqa: PLC0415 - tqdm: progress bar, main process only

        self.tb_dir = self.run_dir / subdir
        self.writer = SummaryWriter(log_dir=str(self.tb_dir))
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step",
                        mininterval=1.0, smoothing=0.1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.writer.add_scalar(k, float(v), step)

    def image_grid(self, step: int, tag: str, images: torch.Tensor, mean, std, nrow: int = 8) -> None:
        """Log de-normalised augmented training images (B, C, H, W) as one grid."""
        if not self.enabled:
            return
        x = images[: nrow * 2].detach().float().cpu()
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        self.writer.add_image(tag, make_grid(x.clamp(0, 1), nrow=nrow), step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, **fields) -> None:
        if not self.enabled:
            return
        self.bar.n = step
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()},
                             refresh=False)
        self.bar.refresh()

    def print(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate_topk(forward: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, *,
                  device: torch.device | str = "cpu", max_batches: int = 0, group: Any = None) -> dict:
    """Top-1 / top-5 (percent) of ``forward`` over an eval loader (:class:`pipeline.data.loader.EvalLoader`
    batches), every sample once across the ranks of ``group`` (padding samples, ``valid`` False, do not count);
    precision@1 too for multi-label data. ``max_batches`` 0: the whole loader; every rank has the same number of
    batches, so all stop together. ``group`` None without a process group (or the default group).

    Returns ``{"top1", "top5", "samples"}`` (+ ``"precision_at_1"``), the same on every rank; a collective when
    there is a process group, so every rank of ``group`` must call it.
    """
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, precision@1 hits, samples
    multi_label = False
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        logits = forward(batch["image"].to(device, non_blocking=True)).float().cpu()
        valid = batch["valid"]
        totals[0:2] += torch.tensor(topk_correct(logits[valid], batch["label"][valid], (1, 5)), dtype=torch.float64)
        if "labels" in batch:  # multi-label data: the top-1 prediction is one of the image's labels
            multi_label = True
            top1 = logits[valid].topk(1, dim=1).indices
            totals[2] += batch["labels"][valid].bool().gather(1, top1).sum()
        totals[3] += valid.sum()
    totals = distributed.all_reduce_sum(totals, group)
    n = max(float(totals[3]), 1.0)
    out = {"top1": 100 * float(totals[0]) / n, "top5": 100 * float(totals[1]) / n, "samples": int(totals[3])}
    if multi_label:
        out["precision_at_1"] = 100 * float(totals[2]) / n
    return out


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def gpu_memory_gb() -> Optional[float]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None
