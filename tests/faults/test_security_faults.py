"""Security faults: weights handed to other people are safetensors (no pickle anywhere in an export); a pickle
file as the fine-tuning ``init`` is refused unless finetune.allow_pickle is set, and even then a pickle that would
run code does not; a config file (or override) with a python/* YAML tag is refused and runs nothing.

Every payload here is shown to work first (loaded unsafely it does create its marker file), so "the marker was
never created" means the safe path stopped it, not that the payload was a dud.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_config_faults import finish, one_error_line, run_main, start, write_tiny_shards

from pipeline import finetune_lib as fl
from pipeline.evaluate import main as evaluate_main
from pipeline.export import ExportError, architecture_meta, load_model, save_exports, timm_export_dir
from pipeline.models import create_model


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def yaml_payload(marker: Path, tag: str = "python/object/apply:os.system") -> str:
    return f"!!{tag} ['touch {marker}']"


@pytest.fixture(scope="module", autouse=True)
def yaml_cli(tmp_path_factory):
    """``python -m pipeline.pretrain --config EVIL.yaml`` for real, started first (it overlaps the other tests)."""
    tmp = tmp_path_factory.mktemp("yaml_cli")
    marker, config = tmp / "yaml-ran", tmp / "evil.yaml"
    config.write_text(f"train:\n  total_steps: 4\n  run_dir: {yaml_payload(marker)}\n")
    proc = start([sys.executable, "-m", "pipeline.pretrain", "--config", str(config)])
    yield {"proc": proc, "marker": marker, "config": config}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def transfer(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("security") / "shards")


# ---- YAML ----------------------------------------------------------------------------------------------------

def test_yaml_payload_would_run_under_an_unsafe_loader(tmp_path):
    marker = tmp_path / "ran"
    yaml.unsafe_load(yaml_payload(marker))
    assert marker.exists()  # the payload is real


@pytest.mark.parametrize("tag", ["python/object/apply:os.system", "python/object/new:os.system",
                                 "python/name:os.system"])
@pytest.mark.parametrize("where", ["file", "override"])
def test_python_tags_are_refused_in_files_and_overrides(tmp_path, capsys, tag, where):
    marker = tmp_path / "ran"
    if where == "file":
        run = tmp_path / "run.yaml"
        run.write_text(f"{yaml_payload(marker, tag)}\n")
        rc, err = run_main(capsys, "pretrain", [], config=str(run))
    else:
        rc, err = run_main(capsys, "pretrain", [f"train.run_dir={yaml_payload(marker, tag)}"])
    line = one_error_line(err)
    assert rc == 2 and tag in line and "python/* tags are refused" in line, line
    assert not marker.exists()


def anchor_bomb(depth: int = 9) -> str:
    """A flow list of ``depth`` levels, each ten aliases of the one before ("billion laughs"): its last level is
    10**depth strings once expanded."""
    levels = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, depth)]
    return "[" + ", ".join(levels) + "]"


def _expanded(node, memo: dict) -> int:
    """Leaves of a safely loaded YAML value with every alias expanded (PyYAML shares aliased nodes)."""
    if id(node) not in memo:
        memo[id(node)] = sum(_expanded(v, memo) for v in node) if isinstance(node, list) else 1
    return memo[id(node)]


def test_anchor_bombs_are_refused_in_files_and_overrides(tmp_path, capsys):
    """A config whose aliases expand to 10**9 values would take the loader's memory (the config is merged and
    copied node by node); it ends in one line at once, in a file and in an override."""
    bomb = anchor_bomb()
    assert _expanded(yaml.safe_load(bomb)[-1], {}) == 10**9  # the payload is real: its last level alone
    run = tmp_path / "run.yaml"
    run.write_text(f"train:\n  run_dir: {bomb}\n")
    for config, overrides in ((str(run), []), (None, [f"train.run_dir={bomb}"])):
        rc, err = run_main(capsys, "pretrain", overrides, config=config)
        line = one_error_line(err)
        assert rc == 2 and "expansion exceeds" in line, line
        assert (str(run) if config else "override 'train.run_dir=") in line, line


# ---- pickle inits --------------------------------------------------------------------------------------------

def _pickles(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """{kind: (file, marker)}: a torch.save file and a bare pickle, each carrying a payload."""
    out = {}
    for name in ("model.pth", "pytorch_model.bin"):
        path, marker = tmp_path / name, tmp_path / f"{name}-ran"
        if name.endswith(".pth"):
            torch.save({"state_dict": Payload(marker)}, path)
        else:
            path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
        out[name] = (path, marker)
    return out


def test_pickle_payloads_would_run_under_an_unsafe_load(tmp_path):
    for path, marker in _pickles(tmp_path).values():
        if path.suffix == ".pth":
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.exists(), path  # the payload is real


def test_pickle_init_is_refused_unless_allowed_and_never_runs_code(tmp_path):
    for path, marker in _pickles(tmp_path).values():
        src = fl.classify_init(str(path))
        with pytest.raises(fl.FinetuneError, match=r"a pickle file, refused .* finetune\.allow_pickle=true"):
            fl.load_init(src)
        # allowed: read by the weights-only unpickler, which refuses the payload without calling it
        with pytest.raises(fl.FinetuneError, match="holds pickled objects other than tensors .*Pass a .safetensors"):
            fl.load_init(src, allow_pickle=True)
        assert not marker.exists(), path


def test_a_plain_tensor_pickle_loads_when_allowed(tmp_path):
    path = tmp_path / "weights.pth"
    state = create_model("efficientnetv2_test", num_classes=3).state_dict()
    torch.save(state, path)
    with pytest.raises(fl.FinetuneError, match="a pickle file, refused"):
        fl.load_init(fl.classify_init(str(path)))
    init = fl.load_init(fl.classify_init(str(path)), allow_pickle=True)
    assert init.state_dict.keys() == state.keys()


@pytest.mark.parametrize("allow", [False, True])
def test_finetune_command_refuses_a_pickle_init_in_one_line(tmp_path, capsys, transfer, allow):
    path, marker = _pickles(tmp_path)["model.pth"]
    run_dir = tmp_path / "run"
    rc, err = run_main(capsys, "finetune", [f"init={path}", f"data.train=[{transfer}]", f"train.run_dir={run_dir}",
                                            "model.name=efficientnetv2_test", f"finetune.allow_pickle={allow}"])
    line = one_error_line(err)
    assert rc == 2 and f"init={path}" in line, line
    assert ("holds pickled objects other than tensors" if allow else "finetune.allow_pickle=true") in line, line
    assert not marker.exists() and not run_dir.exists()


# ---- exports -------------------------------------------------------------------------------------------------

def _safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, checked to describe the whole file (8-byte length, JSON, tensor data)."""
    raw = path.read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK", f"{path} starts like a pickle / torch.save zip"
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert 8 + n + end == len(raw), f"{path}: bytes beyond the tensors the header lists"
    return header


def export_meta(model, num_classes: int, size: int) -> dict:
    """The model.json content of an export of ``model`` (what a run's export writes)."""
    return {"architecture": architecture_meta(model),
            "classes": [{"index": i, "name": str(i)} for i in range(num_classes)],
            "image_size": {"train": size, "eval": size}, "mean": [0.5] * 3, "std": [0.5] * 3, "eval_crop_threshold": 0,
            "source": {"run_dir": "test", "tag": "step-00000000", "step": 0, "weights": "raw"}}


@pytest.mark.parametrize("name,fmt", [("efficientnetv2_test", "ours"), ("efficientnetv2_b0", "both")])
def test_exports_are_safetensors_and_json_only(tmp_path, name, fmt):
    model = create_model(name, num_classes=5)
    meta = export_meta(model, 5, 64)
    out = tmp_path / "export"
    folders = save_exports(model.state_dict(), meta, out, fmt)
    assert set(folders) == ({"ours", "timm"} if fmt == "both" else {"ours"})
    for kind, folder in folders.items():
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["config.json" if kind == "timm" else "model.json", "model.safetensors"]
        header = _safetensors_header(folder / "model.safetensors")
        for f in files:
            if f.endswith(".json"):
                json.loads((folder / f).read_text())
        weights = load_file(str(folder / "model.safetensors"))
        assert len(weights) == len(header) - ("__metadata__" in header)
    loaded, _ = load_model(out if fmt == "ours" else timm_export_dir(out))
    assert torch.equal(loaded.state_dict()["stem.conv.weight"], model.state_dict()["stem.conv.weight"])


def test_timm_folder_with_only_a_pickle_is_refused_unless_allowed(tmp_path, transfer, capsys):
    """A timm hub folder whose weights are only pytorch_model.bin: `python -m pipeline.evaluate` refuses it in one
    line unless --allow-pickle; allowed, a payload is refused by the tensors-only reader and plain weights load."""
    model = create_model("efficientnetv2_b0", num_classes=2)
    meta = export_meta(model, 2, 32)
    folder = save_exports(model.state_dict(), meta, tmp_path / "export", "timm")["timm"]
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "bin-ran"
    bin_file = folder / "pytorch_model.bin"
    bin_file.write_bytes(pickle.dumps({**weights, "extra": Payload(marker)}))
    for allow in ([], ["--allow-pickle"]):
        capsys.readouterr()
        rc = evaluate_main([str(folder), "--data", str(transfer), "--sizes", "32", "--device", "cpu", *allow])
        line = one_error_line(capsys.readouterr().err)
        assert rc == 2 and str(bin_file) in line, line
        assert ("--allow-pickle" in line) if not allow else ("other than tensors" in line), line
        assert not marker.exists()
    torch.save(weights, bin_file)  # plain tensors: read when allowed, the same weights as the safetensors file
    with pytest.raises(ExportError, match="--allow-pickle"):
        load_model(folder)
    loaded, _ = load_model(folder, allow_pickle=True)
    assert torch.equal(loaded.state_dict()["stem.conv.weight"], model.state_dict()["stem.conv.weight"])


# ---- the command-line process (last: it ran while the tests above did) ------------------------------------

def test_config_file_with_a_python_tag_is_refused_by_the_command_and_runs_nothing(yaml_cli):
    rc, _, err = finish(yaml_cli["proc"])
    line = one_error_line(err)
    assert rc == 2, err
    assert f"{yaml_cli['config']}, line 3, column 12: cannot parse YAML" in line, line
    assert "python/object/apply:os.system" in line and "python/* tags are refused" in line, line
    assert not yaml_cli["marker"].exists()
