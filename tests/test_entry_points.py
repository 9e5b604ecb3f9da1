"""Every entry point of the installed project runs from a folder that holds ``shards/`` and ``pipeline/`` folders
of its own, as a user's data folder does (``cd /data`` with /data/shards/in21k).

``python -m`` puts the working directory first on sys.path, where an ``__init__``-less folder is a namespace
package; the install must still win over it (a regular package on any path entry does; setuptools' editable import
hook did not). The children get no PYTHONPATH: what is tested is the install, not the source tree on the path.
"""

import os
import re
import subprocess
import sys
from importlib import metadata
from multiprocessing.pool import ThreadPool
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DIST = "effnetv2-pipeline"

# module -> a phrase of its --help (case-insensitive)
MODULES = {
    "pipeline.pretrain": "pretraining",
    "pipeline.finetune": "fine-tune",
    "pipeline.export": "safetensors",
    "pipeline.demo": "end-to-end demo",
    "pipeline.models": "summary",
    "pipeline.progressive": "stage table",
    "pipeline.engine": "to-universal",
    "pipeline.config": "base.yaml",
    "pipeline.evaluate": "--sizes",
    "shards": "webdataset shards",
}

_MAIN_GUARD = re.compile(r"^if __name__ == ['\"]__main__['\"]:", re.M)


def _runnable_modules() -> set[str]:
    """The modules of pipeline/ and shards/ that ``python -m`` runs: a ``__main__`` guard or a ``__main__.py``."""
    found = set()
    for pkg in ("pipeline", "shards"):
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                found.add(".".join(parts[:-1]))
            elif _MAIN_GUARD.search(path.read_text(encoding="utf-8")):
                found.add(".".join(parts))
    return found


def _console_scripts() -> list[str]:
    return sorted(ep.name for ep in metadata.distribution(DIST).entry_points if ep.group == "console_scripts")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """A user's folder: empty ``shards/`` (with ``in21k/``) and ``pipeline/`` folders, no ``__init__.py``."""
    root = tmp_path_factory.mktemp("data")
    (root / "shards" / "in21k").mkdir(parents=True)
    (root / "pipeline").mkdir()
    return root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def test_every_runnable_module_is_listed():
    """A new or renamed ``python -m`` entry point joins MODULES, so the test below runs it."""
    assert _runnable_modules() == set(MODULES)


def test_entry_points_run_from_a_folder_with_shards_and_pipeline_folders(data_folder):
    bin_dir = Path(sys.executable).parent
    commands = {m: [sys.executable, "-m", m, "--help"] for m in MODULES}
    commands.update({s: [str(bin_dir / s), "--help"] for s in _console_scripts()})
    with ThreadPool(4) as pool:
        results = dict(zip(commands, pool.map(lambda c: _run(c, data_folder), commands.values())))
    failed = [f"{name} --help from {data_folder}: exit {r.returncode}\n{(r.stdout + r.stderr)[-2000:]}"
              for name, r in results.items()
              if r.returncode != 0 or "usage:" not in r.stdout
              or (name in MODULES and MODULES[name] not in r.stdout.lower())]
    assert not failed, "\n\n".join(failed)
