"""Test hooks of the trainer and the export, off unless their environment variables are set.

tests/faults sets them to stop a real run at an exact moment (to signal or kill it there) or to make a step
non-finite; users never do, and with the variables unset every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


class TestHooks:
    """Test hooks, off unless their environment variables are set (tests/faults set them; users never do):

    - ``EFFNETV2_TEST_PAUSE=eval,stage,startup,save,exit,export`` with ``EFFNETV2_TEST_PAUSE_DIR=DIR``: the first
      time this process reaches a named point (an evaluation; a stage change within the launch, before the loader
      switches; the start of a resume, before the checkpoint loads; a save, after the backend's files and before
      the rank files and COMPLETE.json; the end of the training loop, preempted or not; an export, between its
      weights file and its model.json), each rank creates
      ``DIR/POINT.rankR`` and waits until ``DIR/POINT.go`` exists, so that a test can signal or kill the job at
      exactly that moment. ``EFFNETV2_TEST_PAUSE_RANKS=1,...``: only those ranks pause (default every rank).
    - ``EFFNETV2_TEST_NONFINITE=RANK:STEP,STEP,...``: on that rank, the images of those steps (numbered as they
      are logged, from 1) are multiplied by inf before the forward: a real non-finite loss and gradient.
    - ``EFFNETV2_TEST_KEYS=DIR``: each rank appends the sample keys of every micro-batch it trains on to
      ``DIR/keys.rankR.jsonl`` (``{"step": S, "epoch": E, "keys": [...]}``, S numbered as logged, from 1), so
      that a test can check that a resumed run neither repeats nor skips a sample.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, rank: int):
        self.rank = rank
        self.pause_dir = os.environ.get("EFFNETV2_TEST_PAUSE_DIR")
        self.pause_points = set(filter(None, os.environ.get("EFFNETV2_TEST_PAUSE", "").split(",")))
        only = os.environ.get("EFFNETV2_TEST_PAUSE_RANKS", "")
        if only and str(rank) not in only.split(","):
            self.pause_points = set()
        spec = os.environ.get("EFFNETV2_TEST_NONFINITE", "")
        r, _, steps = spec.partition(":")
        self.nonfinite_steps = {int(x) for x in steps.split(",") if x} if spec and int(r) == rank else set()
        keys_dir = os.environ.get("EFFNETV2_TEST_KEYS")
        self.keys_file = Path(keys_dir) / f"keys.rank{rank}.jsonl" if keys_dir else None

    def pause(self, point: str) -> None:
        if point not in self.pause_points or not self.pause_dir:
            return
        self.pause_points.discard(point)
        folder = Path(self.pause_dir)
        (folder / f"{point}.rank{self.rank}").touch()
        deadline = time.monotonic() + 600
        while not (folder / f"{point}.go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def record_keys(self, step: int, loader, batch) -> None:
        """The keys of ``batch`` and the epoch ``loader`` is in (read only when the hook is on)."""
        if self.keys_file is not None:
            with open(self.keys_file, "a") as f:
                record = {"step": step, "epoch": getattr(loader, "epoch", 0), "keys": list(batch["key"])}
                f.write(json.dumps(record) + "\n")

    def poison(self, step: int, images: torch.Tensor) -> torch.Tensor:
        return images * float("inf") if step in self.nonfinite_steps else images
