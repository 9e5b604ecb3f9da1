"""Source layouts: list the images of ImageNet-21k / -1k, image folders, `datasets` datasets and the demo set.

A source yields a `Listing`: the class list in its stable order and one `Item` per image, sorted. Workers read
an item's bytes from its `ref` alone (a file path, an offset into a class tar, a dataset row, a demo recipe),
so the listing can be cut into shards and handed to any process.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional

from . import ShardError, demo
from .demo import render_image
from .images import encode_jpeg

KINDS = ("imagenet21k", "imagenet1k", "imagefolder", "hf", "demo")
WNID_RE = re.compile(r"^n\d{8}$")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CLASS_NAME_FILES = ("LOC_synset_mapping.txt", "words.txt", "synsets.txt")


@dataclass(frozen=True)
class ClassInfo:
    name: str
    wnid: Optional[str] = None


class Item(NamedTuple):
    key: str
    """Key hint (made webdataset-safe and unique when the plan is made)."""
    id: str
    """Original id / relative path, recorded in the sample's json."""
    label: int
    """Index into Listing.classes."""
    split: Optional[str]
    """'train' / 'val' where the source defines it; None where the writer holds out its own val split."""
    ref: tuple
    """How to read the bytes: see read_bytes."""
    nbytes: int
    """Size of the source bytes (plans byte-sized shards; part of the fingerprint)."""
    labels: Optional[tuple] = None
    """All labels of a multi-label image (label is the first)."""


@dataclass
class Listing:
    kind: str
    classes: list[ClassInfo]
    items: list[Item]
    has_val: bool
    source: dict
    """Recorded in info.json: kind, path and what was detected."""
    name: str
    multi_label: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class SourceOptions:
    class_names: Optional[str] = None
    """File of `wnid name[, synonyms]` lines (LOC_synset_mapping.txt / words.txt are found automatically)."""
    val_labels: Optional[str] = None
    """imagenet1k: LOC_val_solution.csv for a flat val folder (found automatically next to train/ and val/)."""
    hf_train_split: str = "train"
    hf_val_split: Optional[str] = None
    """None: 'validation', 'val' or 'test', whichever exists."""
    hf_config: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    demo_classes: Optional[int] = None
    demo_per_class: Optional[int] = None
    demo_val_per_class: Optional[int] = None
    demo_image_size: Optional[int] = None
    workers: int = 1
    """Processes for listing (scanning 21k class tars)."""


def open_source(kind: str, src: str, opts: SourceOptions, seed: int = 0) -> Listing:
    """List a source; every user error (missing / empty source, bad column, ...) is a one-line ShardError."""
    if kind not in KINDS:
        raise ShardError(f"unknown source kind {kind!r}; choose one of: {', '.join(KINDS)}")
    demo_opts = [o for o in ("demo_classes", "demo_per_class", "demo_val_per_class", "demo_image_size")
                 if getattr(opts, o) is not None]
    if kind != "demo" and demo_opts:
        flags = ", ".join("--" + o[len("demo_"):].replace("_", "-") for o in demo_opts)
        raise ShardError(f"{flags} only apply to `write demo`")
    if kind == "demo":
        return _list_demo(src, opts, seed)
    if kind == "hf":
        return _list_hf(src, opts)
    path = Path(src)
    if not path.exists():
        raise ShardError(f"{src}: no such folder; give the {kind} source folder")
    if not path.is_dir():
        raise ShardError(f"{src}: not a folder; the {kind} source is a folder")
    if kind == "imagenet21k":
        return _list_imagenet21k(path, opts)
    if kind == "imagenet1k":
        return _list_imagenet1k(path, opts)
    return _list_imagefolder(path, opts)


# ---------------------------------------------------------------------------------------------- reading


def read_bytes(ref: tuple) -> bytes:
    """The encoded image of one item (may be short or empty: the decoder reports those as bad)."""
    kind = ref[0]
    if kind == "file":
        with open(ref[1], "rb") as f:
            return f.read()
    if kind == "tar":
        _, path, offset, size = ref
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    if kind == "hf":
        return _hf_read(ref)
    if kind == "demo":
        _, demo_kind, split, class_index, index, image_size, seed, quality = ref
        return encode_jpeg(render_image(demo_kind, class_index, index, image_size, seed, split), quality)
    raise ValueError(f"unknown item reference {ref!r}")


# ---------------------------------------------------------------------------------------------- helpers


def _map(fn: Callable, args: list, workers: int) -> list:
    """Map in a process pool when it pays (many class tars / folders), in order."""
    if workers > 1 and len(args) > 1:
        with mp.Pool(min(workers, len(args))) as pool:
            return pool.map(fn, args, chunksize=max(1, len(args) // (workers * 8)))
    return [fn(a) for a in args]


def _scan_folder(folder: str) -> list[tuple[str, int]]:
    """(relative posix path, size) of every image under folder, sorted; hidden files skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                continue
            full = os.path.join(dirpath, name)
            try:
                size = os.stat(full).st_size
            except OSError:
                size = 0  # a dangling link: read_bytes fails later and the sample is reported as bad
            found.append((os.path.relpath(full, folder).replace(os.sep, "/"), size))
    found.sort()
    return found


def _scan_tar(path: str) -> tuple[list[tuple[str, int, int]], Optional[str]]:
    """(member name, data offset, size) of every image in a class tar, and a warning if it is damaged."""
    members = []
    try:
        # Iterating reads the 512-byte headers only and seeks over the data.
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMAGE_EXTS):
                    members.append((m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        return sorted(members), f"{path}: damaged tar ({e}); kept the {len(members)} images before the damage"
    return sorted(members), None


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _class_names(explicit: Optional[str], search: Iterable[Path]) -> dict[str, str]:
    """wnid -> human name from a `wnid name, synonyms` file (the first synonym is the name)."""
    path = Path(explicit) if explicit else next((p for p in search if p.is_file()), None)
    if path is None:
        return {}
    if not path.is_file():
        raise ShardError(f"{path}: class names file not found (--class-names)")
    names = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and WNID_RE.match(parts[0]):
            names[parts[0]] = parts[1].split(",")[0].strip()
    if explicit and not names:
        raise ShardError(f"{path}: no `nXXXXXXXX name` lines; --class-names expects e.g. LOC_synset_mapping.txt")
    return names


def _wnid_classes(wnids: list[str], names: dict[str, str]) -> list[ClassInfo]:
    return [ClassInfo(name=names.get(w, w), wnid=w) for w in wnids]


def _folder_items(root: Path, class_dirs: list[str], labels: list[int], split: Optional[str],
                  id_prefix: str, workers: int, key_from_path: bool) -> list[Item]:
    """Items of class folders root/<dir>/**/image, labelled in the given order."""
    scans = _map(_scan_folder, [str(root / d) for d in class_dirs], workers)
    items = []
    for d, label, files in zip(class_dirs, labels, scans):
        for rel, size in files:
            ident = f"{id_prefix}{d}/{rel}"
            key = os.path.splitext(ident)[0] if key_from_path else _stem(rel)
            items.append(Item(key, ident, label, split, ("file", str(root / d / rel)), size))
    return items


# ---------------------------------------------------------------------------------------------- imagenet21k


def _list_imagenet21k(src: Path, opts: SourceOptions) -> Listing:
    tars, dirs = {}, {}
    for entry in os.scandir(src):
        stem = entry.name[:-4] if entry.name.endswith(".tar") else entry.name
        if not WNID_RE.match(stem):
            continue
        if entry.name.endswith(".tar") and entry.is_file():
            tars[stem] = entry.path
        elif entry.is_dir():
            dirs[stem] = entry.path
    both = sorted(tars.keys() & dirs.keys())
    if both:
        raise ShardError(f"{src}: class {both[0]} is both a tar and an extracted folder ({len(both)} such "
                         "classes); keep one of the two")
    if not tars and not dirs:
        raise ShardError(f"{src}: no class tars (nXXXXXXXX.tar) or class folders (nXXXXXXXX/) found; give the "
                         "ImageNet-21k folder, e.g. winter21_whole/")
    wnids = sorted(tars.keys() | dirs.keys())
    names = _class_names(opts.class_names, [src / f for f in CLASS_NAME_FILES] +
                         [src.parent / f for f in CLASS_NAME_FILES])
    warnings = []
    tar_wnids = [w for w in wnids if w in tars]
    tar_scans = dict(zip(tar_wnids, _map(_scan_tar, [tars[w] for w in tar_wnids], opts.workers)))
    dir_wnids = [w for w in wnids if w in dirs]
    dir_scans = dict(zip(dir_wnids, _map(_scan_folder, [dirs[w] for w in dir_wnids], opts.workers)))
    items = []
    for label, w in enumerate(wnids):
        # The id is "wnid/file name" in both layouts, so a tar and its extraction give the same shards.
        if w in tars:
            members, warning = tar_scans[w]
            if warning:
                warnings.append(warning)
            for name, offset, size in members:
                base = os.path.basename(name)
                items.append(Item(_stem(base), f"{w}/{base}", label, None, ("tar", tars[w], offset, size), size))
        else:
            for rel, size in dir_scans[w]:
                items.append(Item(_stem(rel), f"{w}/{rel}", label, None, ("file", os.path.join(dirs[w], rel)),
                                  size))
    if not items:
        raise ShardError(f"{src}: {len(wnids)} classes but no images (*.jpg/*.jpeg/*.png/*.webp) in them")
    layout = "tars" if not dirs else ("folders" if not tars else "tars+folders")
    return Listing("imagenet21k", _wnid_classes(wnids, names), items, has_val=False,
                   source={"kind": "imagenet21k", "path": str(src.resolve()), "layout": layout},
                   name="imagenet21k", warnings=warnings)


# ---------------------------------------------------------------------------------------------- imagenet1k


def _read_val_csv(path: Path) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (the first wnid of PredictionString)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e})") from None
    if not rows or "ImageId" not in rows[0] or "PredictionString" not in rows[0]:
        raise ShardError(f"{path}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)")
    labels = {}
    for row in rows:
        tokens = (row["PredictionString"] or "").split()
        if tokens and WNID_RE.match(tokens[0]):
            labels[row["ImageId"]] = tokens[0]
    return labels


def _list_imagenet1k(src: Path, opts: SourceOptions) -> Listing:
    root = src
    kaggle = src / "ILSVRC" / "Data" / "CLS-LOC"
    if not (src / "train").is_dir() and (kaggle / "train").is_dir():
        root = kaggle  # the Kaggle download: SRC/ILSVRC/Data/CLS-LOC/{train,val} + SRC/LOC_*.{csv,txt}
    train = root / "train"
    if not train.is_dir():
        raise ShardError(f"{src}: no train/ folder; expected SRC/train/nXXXXXXXX/*.JPEG (and SRC/val/)")
    wnids = sorted(e.name for e in os.scandir(train) if e.is_dir() and WNID_RE.match(e.name))
    if not wnids:
        raise ShardError(f"{train}: no class folders nXXXXXXXX/; expected train/nXXXXXXXX/*.JPEG")
    label_of = {w: i for i, w in enumerate(wnids)}
    names = _class_names(opts.class_names, [src / "LOC_synset_mapping.txt", root / "LOC_synset_mapping.txt",
                                            src / "words.txt"])
    items = _folder_items(train, wnids, list(range(len(wnids))), "train", "train/", opts.workers, False)
    if not items:
        raise ShardError(f"{train}: {len(wnids)} class folders but no images in them")

    val = root / "val"
    val_layout = None
    if val.is_dir():
        val_dirs = sorted(e.name for e in os.scandir(val) if e.is_dir() and WNID_RE.match(e.name))
        if val_dirs:
            val_layout = "class folders"
            unknown = [w for w in val_dirs if w not in label_of]
            if unknown:
                raise ShardError(f"{val / unknown[0]}: validation class has no train/{unknown[0]} folder")
            items += _folder_items(val, val_dirs, [label_of[w] for w in val_dirs], "val", "val/", opts.workers,
                                   False)
        else:
            files = [(rel, size) for rel, size in _scan_folder(str(val)) if "/" not in rel]
            if files:
                val_layout = "flat + csv"
                candidates = [Path(opts.val_labels)] if opts.val_labels else [
                    src / "LOC_val_solution.csv", root / "LOC_val_solution.csv", val / "LOC_val_solution.csv"]
                csv_path = next((p for p in candidates if p.is_file()), None)
                if csv_path is None:
                    raise ShardError(f"{val}: a flat validation folder needs LOC_val_solution.csv (looked for "
                                     f"{', '.join(str(p) for p in candidates)}); pass --val-labels FILE")
                val_labels = _read_val_csv(csv_path)
                missing = [rel for rel, _ in files if _stem(rel) not in val_labels]
                if missing:
                    raise ShardError(f"{csv_path}: no label for {len(missing)} validation images (first: "
                                     f"{missing[0]}); use the LOC_val_solution.csv that belongs to this val/")
                for rel, size in files:
                    w = val_labels[_stem(rel)]
                    if w not in label_of:
                        raise ShardError(f"{csv_path}: {_stem(rel)} has class {w}, which has no train/{w} folder")
                    items.append(Item(_stem(rel), f"val/{rel}", label_of[w], "val", ("file", str(val / rel)),
                                      size))
    source = {"kind": "imagenet1k", "path": str(src.resolve()), "val_layout": val_layout}
    warnings = [] if val_layout else [f"{root}: no val/ folder with images; no official validation split"]
    return Listing("imagenet1k", _wnid_classes(wnids, names), items, has_val=val_layout is not None,
                   source=source, name="imagenet1k", warnings=warnings)


# ---------------------------------------------------------------------------------------------- imagefolder


def _list_imagefolder(src: Path, opts: SourceOptions) -> Listing:
    top = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    val_dir = next((d for d in ("val", "validation") if d in top), None)
    split_layout = "train" in top and val_dir is not None and set(top) <= {"train", "val", "validation", "test"}
    parts = [("train", src / "train"), ("val", src / val_dir)] if split_layout else [(None, src)]
    class_sets = [sorted(e.name for e in os.scandir(p) if e.is_dir() and not e.name.startswith("."))
                  for _, p in parts]
    classes = class_sets[0]
    if not classes:
        raise ShardError(f"{parts[0][1]}: no class folders; expected class_name/*.jpg|jpeg|png|webp")
    label_of = {c: i for i, c in enumerate(classes)}
    items = []
    for (split, path), found in zip(parts, class_sets):
        unknown = [c for c in found if c not in label_of]
        if unknown:
            raise ShardError(f"{path / unknown[0]}: validation class has no train/{unknown[0]} folder")
        prefix = "" if split is None else f"{path.name}/"
        items += _folder_items(path, found, [label_of[c] for c in found], split, prefix, opts.workers, True)
    if not any(it.split != "val" for it in items):
        raise ShardError(f"{src}: no images (*.jpg/*.jpeg/*.png/*.webp) in its {len(classes)} class folders")
    names = _class_names(opts.class_names, [src / f for f in CLASS_NAME_FILES]) if any(
        WNID_RE.match(c) for c in classes) else {}
    class_list = [ClassInfo(name=names.get(c, c), wnid=c) if WNID_RE.match(c) else ClassInfo(name=c)
                  for c in classes]
    return Listing("imagefolder", class_list, items, has_val=split_layout,
                   source={"kind": "imagefolder", "path": str(src.resolve()),
                           "layout": "train/val" if split_layout else "classes"},
                   name=src.resolve().name)


# ---------------------------------------------------------------------------------------------- hf datasets

_HF_CACHE: dict[tuple, Any] = {}  # per process: opened datasets (by spec) and image-column views


def _hf_spec(src: str, opts: SourceOptions) -> tuple:
    path = Path(src)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return ("disk", str(path.resolve()))
        return ("files", str(path.resolve()))
    if path.is_file():
        return ("files", str(path.resolve()))
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise ShardError(f"{src}: no such dataset folder or file (give a save_to_disk folder, parquet / arrow "
                         "files, or a hub name already in the local cache)")
    return ("hub", src, opts.hf_config)


def _hf_open(spec: tuple):
    if spec in _HF_CACHE:
        return _HF_CACHE[spec]
    # Never download: a hub name must already be in the local cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets  # noqa: PLC0415 - datasets: ~0.7 s, hf sources only; after the offline switches above
    except ImportError:
        raise ShardError("the hf source needs the `datasets` package: pip install datasets") from None
    try:
        if spec[0] == "disk":
            ds = datasets.load_from_disk(spec[1])
        elif spec[0] == "files":
            path = Path(spec[1])
            if path.is_file():
                builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
                if builder is None:
                    raise ShardError(f"{path}: not a .parquet / .arrow file or a dataset folder")
                ds = datasets.load_dataset(builder, data_files={"train": str(path)})
            else:
                ds = datasets.load_dataset(str(path))
        else:
            ds = datasets.load_dataset(spec[1], spec[2]) if spec[2] else datasets.load_dataset(spec[1])
    except ShardError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFound...)
        where = spec[1] if spec[0] != "hub" else f"hub dataset {spec[1]!r} (not in the local cache; load it " \
                                                 "once with internet, or save_to_disk and pass the folder)"
        raise ShardError(f"{where}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    _HF_CACHE[spec] = ds
    return ds


def _hf_split(ds, split: str, spec: tuple):
    import datasets  # noqa: PLC0415 - datasets: hf sources only

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ShardError(f"{spec[1]}: no split {split!r} (has: {', '.join(ds)}); pass --hf-train-split / "
                             "--hf-val-split")
        return ds[split]
    if split != "train":
        raise ShardError(f"{spec[1]}: a single dataset without splits; it can only serve as the train split")
    return ds


def _hf_read(ref: tuple) -> bytes:
    _, spec, split, column, row = ref
    view = _HF_CACHE.get((spec, split, column))
    if view is None:  # the image column alone, rows as arrow (no decoding), kept per process
        view = _hf_split(_hf_open(spec), split, spec).select_columns([column]).with_format("arrow")
        _HF_CACHE[(spec, split, column)] = view
    cell = view[row].column(0)[0].as_py()
    if isinstance(cell, dict):  # an Image feature: {"bytes": ..., "path": ...}
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        with open(cell, "rb") as f:
            return f.read()
    return b""


def _pick_column(ds, wanted: Optional[str], flag: str, accept: Callable, what: str, where: str) -> str:
    columns = list(ds.features)
    if wanted is not None:
        if wanted not in ds.features:
            raise ShardError(f"{where}: column {wanted!r} does not exist (columns: {', '.join(columns)}); "
                             f"pass {flag} NAME")
        return wanted
    found = [c for c in columns if accept(ds.features[c])]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ShardError(f"{where}: no {what} column found (columns: {', '.join(columns)}); pass {flag} NAME")
    raise ShardError(f"{where}: several {what} columns ({', '.join(found)}); pick one with {flag} NAME")


def _list_hf(src: str, opts: SourceOptions) -> Listing:
    import datasets  # noqa: PLC0415 - datasets: hf sources only

    spec = _hf_spec(src, opts)
    ds_all = _hf_open(spec)
    where = spec[1] if spec[0] != "hub" else f"hub dataset {spec[1]}"
    train = _hf_split(ds_all, opts.hf_train_split, spec)
    val_split = opts.hf_val_split
    if val_split is None and isinstance(ds_all, datasets.DatasetDict):
        val_split = next((s for s in ("validation", "val", "test") if s in ds_all and s != opts.hf_train_split),
                         None)
    splits = [("train", opts.hf_train_split, train)]
    if val_split is not None:
        splits.append(("val", val_split, _hf_split(ds_all, val_split, spec)))

    image_col = _pick_column(train, opts.image_column, "--image-column",
                             lambda f: isinstance(f, datasets.Image), "image", where)

    def is_label(f):
        return isinstance(f, datasets.ClassLabel) or isinstance(_list_inner(f), datasets.ClassLabel)

    label_col = _pick_column(train, opts.label_column, "--label-column", is_label, "label (ClassLabel)", where)
    for _, name, ds in splits[1:]:
        for col, flag in ((image_col, "--image-column"), (label_col, "--label-column")):
            if col not in ds.features:
                raise ShardError(f"{where}: split {name!r} has no column {col!r} (columns: "
                                 f"{', '.join(ds.features)}); pass {flag}")

    feat = train.features[label_col]
    inner = _list_inner(feat)
    multi = inner is not None
    class_feat = inner if multi else feat
    raw_labels = {name: ds[label_col] for _, name, ds in splits}
    if isinstance(class_feat, datasets.ClassLabel):
        classes = [ClassInfo(name=n) for n in class_feat.names]
        to_index = {i: i for i in range(len(classes))}
    else:  # plain int / string labels: classes are the sorted distinct values
        values = sorted({v for labels in raw_labels.values() for x in labels for v in (x if multi else [x])
                         if v is not None and v != -1}, key=lambda v: (str(type(v)), v))
        if not values:
            raise ShardError(f"{where}: column {label_col!r} holds no labels")
        classes = [ClassInfo(name=str(v)) for v in values]
        to_index = {v: i for i, v in enumerate(values)}

    items = []
    for split, name, ds in splits:
        if len(ds) == 0:
            continue
        nbytes = _hf_sizes(ds, image_col)
        for row, (lab, size) in enumerate(zip(raw_labels[name], nbytes)):
            labs = [lab] if not multi else list(lab or [])
            if not labs or labs[0] is None or labs[0] == -1:
                continue  # unlabelled rows (e.g. a hidden test split with label -1) cannot be trained on
            try:
                idx = tuple(to_index[v] for v in labs)
            except KeyError as e:
                raise ShardError(f"{where}: split {name!r} row {row}: label {e.args[0]!r} is outside the "
                                 f"{len(classes)} classes of column {label_col!r}") from None
            items.append(Item(f"{name}_{row:07d}", f"{name}/{row}", idx[0],
                              split if val_split is not None else None,
                              ("hf", spec, name, image_col, row), size, idx if multi else None))
    if not any(it.split != "val" for it in items):
        raise ShardError(f"{where}: split {opts.hf_train_split!r} has no labelled rows")
    ident = spec[1] if spec[0] == "hub" else Path(spec[1]).name
    return Listing("hf", classes, items, has_val=val_split is not None,
                   source={"kind": "hf", "path": spec[1], "config": opts.hf_config, "train_split":
                           opts.hf_train_split, "val_split": val_split, "image_column": image_col,
                           "label_column": label_col},
                   name=re.sub(r"[^A-Za-z0-9_.-]+", "_", ident), multi_label=multi)


def _list_inner(feature):
    """The element feature of a list-valued feature (List / Sequence / LargeList / [feature]), else None."""
    import datasets  # noqa: PLC0415 - datasets: hf sources only

    if isinstance(feature, list):
        return feature[0] if feature else None
    kinds = tuple(t for t in (getattr(datasets, n, None) for n in ("List", "Sequence", "LargeList"))
                  if isinstance(t, type))
    return getattr(feature, "feature", None) if isinstance(feature, kinds) else None


def _hf_sizes(ds, column: str) -> list[int]:
    """Encoded byte size of each row's image, from the arrow data without decoding anything."""
    import pyarrow as pa  # noqa: PLC0415 - pyarrow: comes with datasets, hf sources only
    import pyarrow.compute as pc  # noqa: PLC0415 - pyarrow

    sizes = []
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=4096):
        col = batch.column(0)
        if hasattr(col.type, "get_field_index") and col.type.get_field_index("bytes") >= 0:
            col = pc.struct_field(col, "bytes")
        if col.type in (pa.binary(), pa.large_binary()):
            sizes += [0 if v is None else v for v in pc.binary_length(col).to_pylist()]
        else:
            sizes += [0] * len(col)
    return sizes


# ---------------------------------------------------------------------------------------------- demo


def _list_demo(src: str, opts: SourceOptions, seed: int) -> Listing:
    if src not in demo.KINDS:
        raise ShardError(f"unknown demo set {src!r}; choose one of: {', '.join(demo.KINDS)}")
    d = demo.DEFAULTS[src]
    num_classes = opts.demo_classes if opts.demo_classes is not None else d["num_classes"]
    per_class = opts.demo_per_class if opts.demo_per_class is not None else d["per_class"]
    val_per_class = opts.demo_val_per_class if opts.demo_val_per_class is not None else d["val_per_class"]
    image_size = opts.demo_image_size if opts.demo_image_size is not None else d["image_size"]
    names = demo.class_names(src, num_classes)  # validates num_classes
    if per_class < 1 or val_per_class < 0 or image_size < 32:
        raise ShardError("demo: --per-class must be >= 1, --val-per-class >= 0, --image-size >= 32")
    # Demo images are drawn, then JPEG-encoded at quality 90 by the reader; estimate for byte-sized shards.
    estimate = image_size * image_size // 4
    items = []
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(num_classes):
            for i in range(count):
                items.append(Item(f"{split}_{c:04d}_{i:05d}", f"{src}/{split}/{names[c]}/{i:05d}", c, split,
                                  ("demo", src, split, c, i, image_size, seed, 90), estimate))
    return Listing("demo", [ClassInfo(name=n) for n in names], items, has_val=val_per_class > 0,
                   source={"kind": "demo", "set": src, "num_classes": num_classes, "per_class": per_class,
                           "val_per_class": val_per_class, "image_size": image_size},
                   name=f"demo-{src}")
