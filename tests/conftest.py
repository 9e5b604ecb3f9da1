"""Shared test setup: CPU DeepSpeed, the gpu marker, small thread counts on the 2-core CI machine."""

import os
import sys
from pathlib import Path

import pytest

from ds_launch import both_worlds, child_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def subprocess_env():
    """Environment for child processes (torchrun, accelerate, python -m ...): the source tree importable."""
    return child_env()


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """The two ds_worker.py launches test_engine and test_ema assert on: {world size: output folder}."""
    return both_worlds(tmp_path_factory.getbasetemp() / "ds_runs")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend on the shared 2-core machine (100x slower here). Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm():
    """The one-node SLURM cluster (tests/slurm_cluster.py): started once, reused by every test of the session
    (test_slurm.py, the srun cases of test_resume_matrix.py), stopped when the session ends."""
    import slurm_cluster

    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    yield slurm_cluster.get_cluster()
    slurm_cluster.stop_cluster()
