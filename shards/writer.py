"""Write a listing as WebDataset shards: parallel, resumable, byte-identical for the same inputs and options.

Each shard is written to a hidden temporary name, synced, and renamed into place; its result (counts, bytes,
bad images) is stored in OUT/.work first, so a shard under its final name is always complete and known. A rerun
with the same arguments keeps those shards and writes the rest; info.json is written last and marks the end
(timm's `_info.json` just before it, see `add_timm_info`).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from . import ShardError, __version__
from .format import (
    BAD_NAME,
    CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    INFO_NAME,
    SHARD_RE,
    SPLITS,
    TIMM_INFO_NAME,
    WORK_DIR,
    add_sample_digests,
    dumps_canonical,
    file_sha256,
    read_info,
    timm_info,
    timm_info_difference,
    write_json_atomic,
)
from .images import BadImage, reduce_image
from .plan import Plan, PlanOptions, ShardTask, make_plan
from .sources import Listing, read_bytes

# Test hook: the writer of this shard stops half-way through it (after flushing) and sleeps, so a test can kill
# the write at a known point. Never set outside tests.
STALL_ENV = "SHARDS_TEST_STALL_IN"


@dataclass(frozen=True)
class WriteOptions:
    max_side: int = 512
    """Downscale images whose longer side exceeds this (0: keep every size)."""
    quality: int = 90
    """JPEG quality of re-encoded images (originals that fit keep their bytes)."""
    small_copy: int = 0
    """Max side of the extra `jpg_small` copy (0: none)."""
    plan: PlanOptions = field(default_factory=PlanOptions)
    max_bad_fraction: float = 0.01
    workers: int = 1
    progress: bool = True
    overwrite: bool = False
    name: Optional[str] = None

    def recorded(self) -> dict:
        """The options stored in info.json."""
        return {"max_side": self.max_side, "quality": self.quality, "small_copy": self.small_copy,
                **asdict(self.plan), "max_bad_fraction": self.max_bad_fraction}


@dataclass(frozen=True)
class _Context:
    """What every shard writer needs besides its task (sent once per worker process)."""
    out: str
    max_side: int
    quality: int
    small_copy: int
    class_fields: tuple
    """Per label: ("wnid", value) or ("class_name", value) for the sample json."""
    fingerprint: str
    stall: Optional[str]


class _Progress:
    """Images done, counted by the shard writers: a shared counter across processes, or a direct callback."""

    def __init__(self, value=None, callback=None):
        self.value, self.callback = value, callback

    def add(self, n: int) -> None:
        if self.value is not None:
            with self.value.get_lock():
                self.value.value += n
        else:
            self.callback(n)


_WORKER: dict = {}


def _init_worker(ctx: _Context, counter) -> None:
    _WORKER["ctx"] = ctx
    _WORKER["progress"] = _Progress(value=counter)


def _worker_task(task: ShardTask) -> dict:
    return write_shard(task, _WORKER["ctx"], _WORKER["progress"])


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the archive bytes depend on the samples only (no clock, user or umask).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(task: ShardTask, ctx: _Context, progress: _Progress) -> dict:
    """Write one shard (temp name, fsync, rename) and return its result; bad images are skipped and listed."""
    out = Path(ctx.out)
    final, tmp = out / task.name, out / f".{task.name}.{os.getpid()}.tmp"
    bad, class_counts = [], {}
    samples = small_samples = small_bytes = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, s in enumerate(task.samples):
                if ctx.stall == task.name and i == len(task.samples) // 2:
                    f.flush()
                    (out / WORK_DIR / "stalled").touch()
                    time.sleep(3600)
                try:
                    red = reduce_image(read_bytes(s.ref), ctx.max_side, ctx.quality, ctx.small_copy)
                except ShardError:
                    raise  # the source itself is unusable (e.g. a dataset that no longer opens): not one image
                except Exception as e:  # one odd file must not end a 13M-image write: count it, report it
                    reason = str(e) if isinstance(e, BadImage) else (
                        f"unreadable ({e.strerror or e})" if isinstance(e, OSError) else
                        f"failed ({type(e).__name__}: {e})")
                    bad.append([s.id, reason])
                    progress.add(1)
                    continue
                field_name, value = ctx.class_fields[s.label]
                meta = {"id": s.id, field_name: value, "size": list(red.size)}
                if s.labels is not None and len(s.labels) > 1:
                    meta["labels"] = list(s.labels)
                members = [("cls", str(s.label).encode()), ("jpg", red.jpg)]
                if red.small is not None:
                    members.append(("jpg_small", red.small))
                    small_samples += 1
                    small_bytes += len(red.small)
                members.append(("json", dumps_canonical(add_sample_digests(meta, dict(members)))))
                for ext, data in members:
                    tar.addfile(_tarinfo(f"{s.key}.{ext}", len(data)), io.BytesIO(data))
                samples += 1
                class_counts[s.label] = class_counts.get(s.label, 0) + 1
                progress.add(1)
        f.flush()
        os.fsync(f.fileno())
    result = {"name": task.name, "split": task.split, "index": task.index, "samples": samples,
              "bytes": tmp.stat().st_size, CHECKSUM: file_sha256(tmp),  # read back: what is on disk
              "small_samples": small_samples, "small_bytes": small_bytes,
              "bad": bad, "class_counts": sorted(class_counts.items()), "fingerprint": ctx.fingerprint}
    # The result first, then the shard: a shard under its final name always has a result beside it.
    write_json_atomic(out / WORK_DIR / f"{task.name}.json", result, indent=None)
    os.replace(tmp, final)
    return result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _remove_outputs(out: Path) -> None:
    for p in out.iterdir():
        if SHARD_RE.match(p.name) or p.name in (INFO_NAME, TIMM_INFO_NAME, BAD_NAME):
            p.unlink()
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Check OUT against this plan; True when it already holds exactly this write (nothing to do)."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a folder; choose another OUT")
    out.mkdir(parents=True, exist_ok=True)
    info_path, plan_path = out / INFO_NAME, out / WORK_DIR / "plan.json"
    if not overwrite:
        if info_path.is_file():
            try:
                existing = json.loads(info_path.read_text())
                previous, version = existing.get("fingerprint"), existing.get("version")
            except (OSError, ValueError, AttributeError):
                previous = version = None
            if previous == fingerprint:
                return True
            if isinstance(version, int) and version < FORMAT_VERSION:
                raise ShardError(f"{out}: holds shards of format version {version} (no checksums); pass --overwrite "
                                 f"to rewrite them as version {FORMAT_VERSION}, or choose another OUT")
            raise ShardError(f"{out}: already holds a shard set written from another source or with other "
                             "options; pass --overwrite to replace it, or choose another OUT")
        if plan_path.is_file():
            try:
                previous = json.loads(plan_path.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                previous = None
            if previous != fingerprint:
                raise ShardError(f"{out}: holds an unfinished write with another source or other options; rerun "
                                 "that command to finish it, or pass --overwrite to start over")
        elif any(SHARD_RE.match(p.name) for p in out.iterdir()):
            raise ShardError(f"{out}: holds shard files but no info.json; pass --overwrite to replace them, or "
                             "choose an empty OUT")
    else:
        _remove_outputs(out)
    # Temporary files of an interrupted run: never under a final name, safe to drop.
    for folder in (out, out / WORK_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and p.name.endswith(".tmp"):
                    p.unlink()
    (out / WORK_DIR).mkdir(exist_ok=True)
    (out / WORK_DIR / "stalled").unlink(missing_ok=True)
    write_json_atomic(plan_path, {"fingerprint": fingerprint})
    return False


def _finished(out: Path, plan: Plan, uploaded: Optional[dict[str, int]] = None) -> dict[str, dict]:
    """Results of the shards a previous run of this plan completed (on disk, or uploaded: name -> size)."""
    done = {}
    for t in plan.tasks:
        meta, tar = out / WORK_DIR / f"{t.name}.json", out / t.name
        size = tar.stat().st_size if tar.is_file() else (uploaded or {}).get(t.name)
        if not meta.is_file() or size is None:
            continue
        try:
            result = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if result.get("fingerprint") == plan.fingerprint and result.get("bytes") == size and CHECKSUM in result:
            done[t.name] = result
    return done


def _write_bad_report(out: Path, results: list[dict]) -> int:
    bad = sorted((r["split"], item[0], item[1]) for r in results for item in r["bad"])
    path = out / BAD_NAME
    if not bad:
        path.unlink(missing_ok=True)
        return 0
    tmp = out / f".{BAD_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("# split\tid\treason (images skipped by `python -m shards write`)\n")
        for split, ident, reason in bad:
            f.write(f"{split}\t{ident}\t{reason}\n")
    os.replace(tmp, path)
    return len(bad)


def _check_bad(out: Path, results: list[dict], total: int, max_fraction: float) -> None:
    bad = sum(len(r["bad"]) for r in results)
    if bad > max_fraction * total:
        _write_bad_report(out, results)
        raise ShardError(f"{bad} of {total} images ({100 * bad / total:.1f}%) could not be used, above "
                         f"--max-bad-fraction {max_fraction}; see {out / BAD_NAME} (raise --max-bad-fraction "
                         "and rerun to keep the finished shards and write the rest)")


def _run(tasks: list[ShardTask], ctx: _Context, opts: WriteOptions, total: int, initial: int,
         on_result) -> None:
    from tqdm import tqdm  # noqa: PLC0415 - tqdm: progress bars only

    def bar():
        tty = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, unit="img", unit_scale=True, dynamic_ncols=True, smoothing=0.05,
                    disable=not opts.progress, mininterval=0.5 if tty else 30.0, file=sys.stderr)

    if opts.workers <= 1 or len(tasks) <= 1:
        with bar() as b:
            progress = _Progress(callback=b.update)
            for t in tasks:
                on_result(write_shard(t, ctx, progress))
        return
    counter = mp.Value("q", 0)
    # The pool starts before the progress bar, whose monitor thread must not be forked.
    with mp.Pool(min(opts.workers, len(tasks)), initializer=_init_worker, initargs=(ctx, counter)) as pool:
        results = pool.imap_unordered(_worker_task, tasks)
        with bar() as b:
            remaining, shown = len(tasks), 0
            while remaining:
                try:
                    result = results.next(timeout=0.5)
                except mp.TimeoutError:
                    result = None
                b.update(counter.value - shown)
                shown = counter.value
                if result is not None:
                    remaining -= 1
                    on_result(result)


def write(listing: Listing, out: str | os.PathLike, opts: WriteOptions = WriteOptions(), publish=None) -> dict:
    """Write the listing's images as shards into OUT and return the info.json contents.

    ``publish`` (a :class:`shards.remote.S3Publisher`): OUT is a local staging folder; every finished shard is
    uploaded and its local copy dropped, info.json (and timm's index) go up last."""
    out = Path(out)
    if not 1 <= opts.quality <= 100:
        raise ShardError(f"--quality {opts.quality}: give a JPEG quality between 1 and 100")
    if opts.max_side < 0 or opts.small_copy < 0:
        raise ShardError("--max-side and --small-copy must be 0 (off) or a positive size in pixels")
    if opts.small_copy and opts.max_side and opts.small_copy >= opts.max_side:
        raise ShardError(f"--small-copy {opts.small_copy} must be below --max-side {opts.max_side}")
    options = opts.recorded()
    # the format version is part of the fingerprint: a write begun by another version is never mixed into this one
    header = {"tool_version": __version__, "format_version": FORMAT_VERSION, "source": listing.source,
              "options": {k: v for k, v in options.items() if k != "max_bad_fraction"}}
    plan = make_plan(listing, opts.plan, header)
    for note in plan.notes:
        _log(f"note: {note}")
    if publish is not None:
        existing = publish.existing_info()
        if existing is not None and not opts.overwrite:
            try:
                previous = json.loads(existing).get("fingerprint")
            except (ValueError, AttributeError):
                previous = None
            if previous == plan.fingerprint:
                _log(f"{publish.root}: already complete (same source and options); nothing to do")
                return json.loads(existing)
            raise ShardError(f"{publish.root}: already holds a shard set written from another source or with "
                             "other options; pass --overwrite to replace it, or choose another prefix")
        if existing is not None:  # --overwrite: the old index goes first, so no reader pairs it with new shards
            publish.delete(INFO_NAME)
    if _prepare_out(out, plan.fingerprint, opts.overwrite) and publish is None:
        info = json.loads((out / INFO_NAME).read_text())
        if (out / TIMM_INFO_NAME).is_file():
            _log(f"{out}: already complete (same source and options); nothing to do")
        else:  # written before the toolkit wrote timm's index, or stopped between the two files
            try:
                add_timm_info(out, info)
                _log(f"{out}: already complete (same source and options); added {TIMM_INFO_NAME}")
            except ShardError as e:
                _log(f"{out}: already complete (same source and options); note: {e}")
        return info

    total = sum(len(t.samples) for t in plan.tasks)
    done = _finished(out, plan, publish.uploaded() if publish is not None else None)
    if publish is not None:  # finished here before the last run could upload them
        for name, r in done.items():
            if (out / name).is_file():
                publish.shard(out / name, r["bytes"])
    results = list(done.values())
    todo = [t for t in plan.tasks if t.name not in done]
    counts = plan.split_samples()
    _log(f"{listing.kind}: {len(plan.classes)} classes, " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
         f" images -> {len(plan.tasks)} shards in {publish.root if publish is not None else out}" +
         (f" ({len(done)} already written, resuming)" if done else ""))
    _check_bad(out, results, total, opts.max_bad_fraction)

    ctx = _Context(str(out), opts.max_side, opts.quality, opts.small_copy,
                   tuple(("wnid", c.wnid) if c.wnid else ("class_name", c.name) for c in plan.classes),
                   plan.fingerprint, os.environ.get(STALL_ENV))

    def on_result(result: dict) -> None:
        if publish is not None:
            publish.shard(out / result["name"], result["bytes"])
        results.append(result)
        _check_bad(out, results, total, opts.max_bad_fraction)

    start = time.perf_counter()
    _run(todo, ctx, opts, total, sum(r["samples"] + len(r["bad"]) for r in results), on_result)
    elapsed = time.perf_counter() - start

    info = _info(listing, plan, opts, results)
    bad = _write_bad_report(out, results)
    if publish is not None:
        if bad:
            publish.put(BAD_NAME, (out / BAD_NAME).read_bytes())
        publish.put(TIMM_INFO_NAME, json.dumps(timm_info(info), indent=1).encode())
        publish.put(INFO_NAME, json.dumps(info, indent=1).encode())  # last: marks the end
        shutil.rmtree(out, ignore_errors=True)
    else:
        add_timm_info(out, info)
        write_json_atomic(out / INFO_NAME, info)
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    written = sum(len(t.samples) for t in todo)
    rate = f", {written / elapsed:.0f} images/s" if written and elapsed > 0 else ""
    extra = f", small copies +{info['small_copy']['extra_bytes'] / 2**20:.1f} MiB" if info["small_copy"] else ""
    where = publish.root if publish is not None else str(out)
    _log(f"wrote {where}: " + ", ".join(f"{s} {v['samples']} samples in {len(v['shards'])} shards "
                                      f"({v['bytes'] / 2**20:.1f} MiB)" for s, v in info["splits"].items()) +
         f"{extra}; {bad} bad images skipped" + (f" (listed in {where.rstrip('/')}/{BAD_NAME})" if bad else "") + rate)
    return info


def add_timm_info(out: str | os.PathLike, info: Optional[dict] = None) -> bool:
    """Write OUT/_info.json, timm's index of the shards (`shards.format.timm_info`), from OUT/info.json.

    True when written; False when the file already says the same (idempotent). Refuses (ShardError) when
    info.json is missing or invalid, or when a shard it lists is absent (timm would stop on it mid-epoch).
    """
    out = Path(out)
    if info is None:
        info = read_info(out)
    missing = [e["name"] for s in info["splits"].values() for e in s["shards"] if not (out / e["name"]).is_file()]
    if missing:
        raise ShardError(f"{out}: {len(missing)} shard(s) listed in info.json are missing ("
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); restore or rewrite them "
                         f"before adding {TIMM_INFO_NAME}")
    content = timm_info(info)
    path = out / TIMM_INFO_NAME
    if path.is_file():
        try:
            if timm_info_difference(content, json.loads(path.read_text())) is None:
                return False
        except (OSError, ValueError):
            pass  # unreadable: replaced below
    write_json_atomic(path, content)
    return True


def _info(listing: Listing, plan: Plan, opts: WriteOptions, results: list[dict]) -> dict:
    by_name = {r["name"]: r for r in results}
    splits = {}
    for split in SPLITS:
        tasks = [t for t in plan.tasks if t.split == split]
        if not tasks:
            continue
        rs = [by_name[t.name] for t in tasks]
        class_counts = [0] * len(plan.classes)
        for r in rs:
            for label, n in r["class_counts"]:
                class_counts[label] += n
        splits[split] = {"samples": sum(r["samples"] for r in rs), "bytes": sum(r["bytes"] for r in rs),
                         "bad_samples": sum(len(r["bad"]) for r in rs),
                         "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"],
                                     CHECKSUM: r[CHECKSUM]} for r in rs],
                         "class_counts": class_counts}
    small = None
    if opts.small_copy:
        small = {"max_side": opts.small_copy, "extra_bytes": sum(r["small_bytes"] for r in results),
                 "samples": sum(r["small_samples"] for r in results)}
    return {"format": FORMAT, "version": FORMAT_VERSION, "name": opts.name or listing.name,
            "source": listing.source, "seed": opts.plan.seed, "options": opts.recorded(),
            "tool_version": __version__, "num_classes": len(plan.classes),
            "classes": [{"index": i, "wnid": c.wnid, "name": c.name} for i, c in enumerate(plan.classes)],
            "splits": splits, "small_copy": small, "multi_label": listing.multi_label, "checksums": CHECKSUM,
            "fingerprint": plan.fingerprint}
