"""Shards from remote storage against real servers: nginx (Debian package) and moto's S3 server, started once per
session on free loopback ports, with a fault-injecting TCP proxy in front (connections cut at a random byte,
bursts of 503, a server slower than the read timeout) and a server killed and restarted mid-epoch. Every fault
must cost retries, never data: each rank's key sequence equals the local-disk run's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.shards import DataError
from pipeline.progressive import Stage
from remote_servers import NGINX, FaultProxy, MotoS3, Nginx
from shards import remote
from shards.format import file_sha256

REPO = Path(__file__).resolve().parent.parent
BUCKET = "shards"
FAST_RETRIES = {"remote_retries": 30, "remote_backoff_s": 0.01, "remote_backoff_max_s": 0.1,
                "remote_timeout_s": 1.0}


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """Generated shards (20 train shards of 12 samples, 2 val shards), the same as the pretraining tests use."""
    from pretrain_launch import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("remote") / "demo")


@pytest.fixture(scope="session")
def nginx(demo, tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed and could not be (`make sysdeps` installs it as root: apt-get install "
                    "nginx)")
    server = Nginx(demo.parent, tmp_path_factory.mktemp("nginx")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory):
    """moto's S3 server with a bucket; AWS_* credentials in the environment (loader workers inherit them)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        remote.s3_client(remote.RemoteOptions(s3_endpoint_url=server.url)).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shards_cli(*args, endpoint: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "shards", *args, "--endpoint-url", endpoint], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def s3_demo(s3_env, tmp_path_factory) -> str:
    """The demo shards written straight to s3://shards/demo/ by `python -m shards write`."""
    url = f"s3://{BUCKET}/demo/"
    staging = tmp_path_factory.mktemp("staging") / "demo"
    shards_cli("write", "demo", "pretrain", url, "--classes", "10", "--per-class", "24", "--val-per-class", "4",
               "--image-size", "64", "--shard-size", "12", "--no-progress", "--workers", "1", "--staging",
               str(staging), endpoint=s3_env.url)
    return url


@pytest.fixture
def proxy(nginx):
    p = FaultProxy(nginx.port, seed=1)
    yield p
    p.close()


# ------------------------------------------------------------------------------------------------ helpers


def stage(mbs=4) -> Stage:
    return Stage(index=0, start_step=0, end_step=10**9, image_size=32, randaug=2.0, mixup=0.0, cutmix=0.0,
                 dropout=0.0, drop_path=None, micro_batch_size=mbs)


def data_cfg(root, **kw) -> DataConfig:
    kw.setdefault("workers", 2)
    kw.setdefault("shuffle_buffer", 16)
    return DataConfig(train=[str(root)], **kw)


def keys_by_rank(cfg: DataConfig, batches: int, world: int = 2, during=None) -> tuple[list[list[str]], list]:
    """Each rank's batch keys over ``batches`` batches (more than an epoch: 60 samples per reader and epoch),
    and the loaders' stats; ``during(rank, i)`` runs before batch i of each rank."""
    out, stats = [], []
    for rank in range(world):
        ld = build_train_loader(cfg, stage=stage(), micro_batch_size=4, num_classes=0, label_smoothing=0.0,
                                seed=3, rank=rank, world_size=world)
        try:
            keys = []
            for i in range(batches):
                if during is not None:
                    during(rank, i)
                keys.append(list(next(ld)["key"]))
            out.append(keys)
            stats.append({**ld.stats(), "bad_samples": ld.bad_samples})
        finally:
            ld.close()
    return out, stats


BATCHES = 40  # 40 batches of 4 on 2 readers per rank: 160 samples, more than the 120 an epoch gives a rank


@pytest.fixture(scope="session")
def local_keys(demo):
    return keys_by_rank(data_cfg(demo), BATCHES)[0]


# ---------------------------------------------------------------------------------------------- HTTP


def test_http_folder_streams_the_local_sequence_and_resumes_exactly(nginx, demo, local_keys):
    keys, stats = keys_by_rank(data_cfg(f"{nginx.url}/demo/"), BATCHES)
    assert keys == local_keys
    assert all(s["bad_samples"] == 0 and s["remote_retries"] == 0 and s["remote_bytes"] > 0 for s in stats)
    # a resume mid-epoch fast-forwards through the remote shards to the same next batches
    cfg = data_cfg(f"{nginx.url}/demo/")
    build = dict(stage=stage(), micro_batch_size=4, num_classes=0, label_smoothing=0.0, seed=3, rank=1, world_size=2)
    first = build_train_loader(cfg, **build)
    for _ in range(11):
        next(first)
    state = first.state_dict()
    first.close()
    again = build_train_loader(cfg, **build)
    again.load_state_dict(state)
    try:
        assert [list(next(again)["key"]) for _ in range(BATCHES - 11)] == local_keys[1][11:]
    finally:
        again.close()


def test_http_folder_verify_and_stats(nginx, demo):
    out = subprocess.run([sys.executable, "-m", "shards", "verify", f"{nginx.url}/demo/", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and f"verify {nginx.url}/demo/: OK" in out.stdout, out.stdout + out.stderr
    (demo.parent / "damaged").mkdir()
    for p in demo.iterdir():
        if p.is_file():
            shutil.copy(p, demo.parent / "damaged" / p.name)
    with open(demo.parent / "damaged" / "train-000004.tar", "r+b") as f:  # one byte of an image flipped
        f.seek(3000)
        byte = f.read(1)
        f.seek(3000)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = subprocess.run([sys.executable, "-m", "shards", "verify", f"{nginx.url}/damaged/", "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "train-000004.tar" in out.stdout, out.stdout + out.stderr
    st = subprocess.run([sys.executable, "-m", "shards", "stats", f"{nginx.url}/demo/", "--json", "--no-progress"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    local = subprocess.run([sys.executable, "-m", "shards", "stats", str(demo), "--json", "--no-progress"],
                           cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(st.stdout)["splits"] == json.loads(local.stdout)["splits"]


@pytest.mark.parametrize("fault", ["cut", "503", "slow"])
def test_http_faults_cost_retries_not_samples(fault, proxy, local_keys):
    """Connections reset at a random byte, bursts of 503, a server silent for longer than the read timeout:
    every rank's key sequence is the local-disk one, nothing counted bad, the retries counted."""
    during = None
    if fault == "cut":
        proxy.cut_probability, proxy.cut_max = 0.5, 40_000  # shards are ~35-45 KB: cut inside them
    elif fault == "503":
        def during(rank, i):  # a burst of 4 every 5 batches; in between, the server answers
            if i % 5 == 0:
                proxy.fail_next = 4
    else:  # 6 connections go silent for 30 s; the 1 s read timeout must end each wait, not the proxy
        proxy.stall_next, proxy.stall_s, proxy.cut_max = 6, 30.0, 30_000
    start = time.monotonic()
    keys, stats = keys_by_rank(data_cfg(proxy.url + "/demo/", **FAST_RETRIES), BATCHES, during=during)
    elapsed = time.monotonic() - start
    assert keys == local_keys
    assert [s["bad_samples"] for s in stats] == [0, 0]
    assert sum(s["remote_retries"] for s in stats) > 0
    happened = {"cut": proxy.cuts, "503": proxy.failed, "slow": proxy.stalls}[fault]
    assert happened > 0, f"the proxy injected no {fault} fault"
    if fault == "slow":
        assert proxy.stalls == 6 and elapsed < 30, elapsed


def test_http_server_killed_and_restarted_mid_epoch(demo, tmp_path, local_keys):
    server = Nginx(demo.parent, tmp_path / "nginx").start()
    restarted = threading.Event()

    def during(rank, i):
        if i == 6:  # the readers have opened their first shards and have more to read
            server.kill()
            threading.Timer(1.0, lambda: (server.start(), restarted.set())).start()

    try:
        cfg = data_cfg(server.url + "/demo/", **{**FAST_RETRIES, "remote_retries": 60, "remote_backoff_max_s": 0.2})
        keys, stats = keys_by_rank(cfg, BATCHES, during=during)
        assert restarted.wait(30)
    finally:
        restarted.wait(30)
        server.stop()
    assert keys == local_keys
    assert [s["bad_samples"] for s in stats] == [0, 0]
    assert all(s["remote_retries"] > 0 for s in stats), stats


def _with_unreachable_shard(demo: Path, tmp: Path, nginx: Nginx) -> tuple[str, str]:
    """An info.json on nginx whose shard 3 points at a port where nothing listens."""
    from remote_servers import free_port

    info = json.loads((demo / "info.json").read_text())
    entry = info["splits"]["train"]["shards"][3]
    dead = f"http://127.0.0.1:{free_port()}/{entry['name']}"
    entry["name"] = dead
    folder = demo.parent / f"unreachable-{tmp.name}"
    folder.mkdir()
    for p in demo.iterdir():
        if p.suffix == ".tar":
            os.link(p, folder / p.name)
    (folder / "info.json").write_text(json.dumps(info))
    return f"{nginx.url}/{folder.name}/", dead


def test_unreachable_shard_is_counted_and_warned_once(nginx, demo, tmp_path, capfd):
    url, dead = _with_unreachable_shard(demo, tmp_path, nginx)
    retries = {"remote_retries": 2, "remote_backoff_s": 0.01, "remote_backoff_max_s": 0.02, "remote_timeout_s": 1.0}
    cfg = data_cfg(url, workers=2, max_bad_fraction=0.2, **retries)  # new worker processes every epoch
    ld = build_train_loader(cfg, stage=stage(), micro_batch_size=4, num_classes=0, label_smoothing=0.0, seed=3,
                            rank=0, world_size=1)
    try:
        for _ in range(120):  # two epochs of 240 samples
            next(ld)
    finally:
        ld.close()
    assert ld.samples_seen == 480 and ld.bad_samples == 2 * 12  # the shard's 12 samples, in each epoch
    err = capfd.readouterr().err
    assert err.count(f"warning: {dead}: gave up after 3 failed tries") == 1, err[-2000:]
    # above the threshold: stops with one message naming the shard and the setting
    cfg = data_cfg(url, workers=0, max_bad_fraction=0.01, **retries)
    ld = build_train_loader(cfg, stage=stage(), micro_batch_size=4, num_classes=0, label_smoothing=0.0, seed=3,
                            rank=0, world_size=1)
    with pytest.raises(DataError, match=r"above data.max_bad_fraction=0.01.*" + re.escape(dead)):
        for _ in range(61):
            next(ld)
    ld.close()


def test_eval_reads_every_sample_through_faults_or_says_so(proxy, demo, capfd):
    proxy.cut_probability, proxy.cut_max = 0.5, 40_000
    cfg = data_cfg(proxy.url + "/demo/", **FAST_RETRIES)
    ev = build_eval_loader(cfg, image_size=32, micro_batch_size=8, workers=2)
    valid = sum(int(b.valid.sum()) for b in ev)
    assert valid == 40 and ev.bad_samples == 0  # 10 classes x 4 validation images, every one
    proxy.reset_faults()
    # validation shards that cannot be read are left out of the metrics, with a warning (never silently)
    cfg = data_cfg(demo, val=f"{proxy.url}/demo/", remote_retries=1, remote_backoff_s=0.01, remote_timeout_s=1.0)
    ev = build_eval_loader(cfg, image_size=32, micro_batch_size=8, workers=0)
    proxy.close()  # the storage goes away after the start (connections refused)
    valid = sum(int(b.valid.sum()) for b in ev)
    assert valid == 0 and ev.bad_samples == 40
    assert "evaluation read 0 of 40 validation samples" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------------ cache


def _read_all(args) -> list[str]:
    urls, shas, folder, limit = args
    opts = remote.RemoteOptions(cache_dir=folder, cache_bytes=limit, backoff_s=0.01)
    for url, sha in zip(urls, shas):
        with remote.open_remote(url, opts, sha) as f:
            while f.read(1 << 16):
                pass
    return sorted(p.name for p in Path(folder).iterdir())


def test_cache_serves_later_epochs_and_stays_bounded(proxy, demo, tmp_path, local_keys):
    cache = tmp_path / "cache"
    cfg = data_cfg(proxy.url + "/demo/", cache_dir=str(cache), cache_gb=1.0, **FAST_RETRIES)
    proxy.cut_probability, proxy.cut_max = 0.3, 40_000
    keys, stats = keys_by_rank(cfg, BATCHES)
    assert keys == local_keys  # filled through cuts: every cached shard is whole (sha256 checked on fill)
    cached = sorted(cache.glob("*" + remote.CACHE_SUFFIX))
    info = json.loads((demo / "info.json").read_text())
    digests = {s["sha256"] for s in info["splits"]["train"]["shards"]}
    assert len(cached) == 20 and {file_sha256(p) for p in cached} == digests
    before = proxy.connections
    keys, stats = keys_by_rank(cfg, BATCHES)
    assert keys == local_keys
    assert proxy.connections - before <= 2  # info.json only (once per loader): no shard fetched again
    assert all(s["remote_cache_hits"] > 0 and s["remote_bytes"] == 0 for s in stats)

    # four processes filling one small cache at once: every entry whole, the bound kept
    shards = info["splits"]["train"]["shards"]
    urls = [f"{proxy.url}/demo/{s['name']}" for s in shards]
    shas = [s["sha256"] for s in shards]
    limit = sum(s["bytes"] for s in shards[:5])
    small = tmp_path / "small"
    small.mkdir()
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_read_all, [(urls[i::2] + urls, shas[i::2] + shas, str(small), limit) for i in range(4)]))
    entries = list(small.glob("*" + remote.CACHE_SUFFIX))
    assert 0 < sum(p.stat().st_size for p in entries) <= limit
    assert {file_sha256(p) for p in entries} <= set(shas)
    assert not list(small.glob(".tmp-*"))


# -------------------------------------------------------------------------------------------------- S3


def test_s3_write_verify_stats(s3_env, s3_demo, demo):
    """`shards write` uploaded every shard (multipart above --multipart-size), info.json last; verify and stats
    read the remote folder; a rerun finds the set complete."""
    listing = remote.list_sizes(s3_demo, remote.RemoteOptions(s3_endpoint_url=s3_env.url))
    local = json.loads((demo / "info.json").read_text())
    names = [s["name"] for sp in local["splits"].values() for s in sp["shards"]]
    assert set(names) | {"info.json", "_info.json"} <= set(listing)
    remote_info = json.loads(remote.read_bytes(s3_demo + "info.json",
                                               remote.RemoteOptions(s3_endpoint_url=s3_env.url)))
    assert remote_info["fingerprint"] == local["fingerprint"]  # the same bytes as the local writer's
    assert [s["sha256"] for s in remote_info["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in local["splits"]["train"]["shards"]]
    out = shards_cli("verify", s3_demo, "--workers", "2", "--no-progress", endpoint=s3_env.url)
    assert f"verify {s3_demo}: OK" in out.stdout
    st = json.loads(shards_cli("stats", s3_demo, "--json", "--no-progress", endpoint=s3_env.url).stdout)
    st_local = json.loads(subprocess.run([sys.executable, "-m", "shards", "stats", str(demo), "--json",
                                          "--no-progress"], cwd=REPO, capture_output=True, text=True,
                                         check=True).stdout)
    assert st["splits"] == st_local["splits"]
    again = shards_cli("write", "demo", "pretrain", s3_demo, "--classes", "10", "--per-class", "24",
                       "--val-per-class", "4", "--image-size", "64", "--shard-size", "12", "--no-progress",
                       "--workers", "1", endpoint=s3_env.url)
    assert "already complete" in again.stderr


def test_s3_write_multipart_and_resume(s3_env, tmp_path):
    """A write killed half-way resumes: the shards already uploaded stay, the rest go up, multipart above the
    threshold (moto's real multipart API: the ETag of a multipart object ends in -<parts>)."""
    url = f"s3://{BUCKET}/resume/"
    staging = tmp_path / "staging"
    opts = remote.RemoteOptions(s3_endpoint_url=s3_env.url)
    args = [sys.executable, "-m", "shards", "write", "demo", "pretrain", url, "--classes", "4", "--per-class",
            "40", "--val-per-class", "2", "--image-size", "96", "--shard-size", "40", "--no-progress", "--workers",
            "1", "--staging", str(staging), "--multipart-size", "100KB", "--endpoint-url", s3_env.url]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "SHARDS_TEST_STALL_IN": "train-000002.tar"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (staging / ".work" / "stalled").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the write did not reach the stall point"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(30)
    first = remote.list_sizes(url, opts)
    assert "info.json" not in first and {"train-000000.tar", "train-000001.tar"} <= set(first)
    client = remote.s3_client(opts)
    etag_before = client.head_object(Bucket=BUCKET, Key="resume/train-000000.tar")["ETag"]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 already written, resuming" in out.stderr
    head = client.head_object(Bucket=BUCKET, Key="resume/train-000000.tar")
    assert head["ETag"] == etag_before and head["ETag"].strip('"').endswith("-1")  # multipart, not re-sent
    assert head["ContentLength"] > 100_000
    assert not staging.exists()  # the staging folder goes once info.json is up
    verify = shards_cli("verify", url, "--no-progress", "--no-decode", endpoint=s3_env.url)
    assert "OK" in verify.stdout
    # another shard set over it: refused, then replaced with --overwrite (the old info.json removed first)
    other = [a if a != "40" else "20" for a in args]  # --per-class 20, --shard-size 20
    refused = subprocess.run(other, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
    replaced = subprocess.run([*other, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    info = json.loads(remote.read_bytes(url + "info.json", opts))
    assert info["splits"]["train"]["samples"] == 4 * 20
    assert "OK" in shards_cli("verify", url, "--no-progress", "--no-decode", endpoint=s3_env.url).stdout


@pytest.fixture
def s3_proxy(s3_env):
    p = FaultProxy(s3_env.port, seed=2)
    yield p
    p.close()


def test_s3_faults_cost_retries_not_samples(s3_demo, s3_proxy, local_keys):
    """Ranged GETs through cuts at random bytes, 503 bursts and reads stalled beyond the timeout."""
    s3_proxy.cut_probability, s3_proxy.cut_max = 0.4, 40_000
    s3_proxy.fail_next = 3
    s3_proxy.stall_next, s3_proxy.stall_s = 3, 30.0  # the 3 connections after the 503s; cuts after those
    cfg = data_cfg(s3_demo, s3_endpoint_url=s3_proxy.url, **FAST_RETRIES)
    start = time.monotonic()
    keys, stats = keys_by_rank(cfg, BATCHES)
    assert keys == local_keys
    assert [s["bad_samples"] for s in stats] == [0, 0]
    assert s3_proxy.cuts > 0 and s3_proxy.failed == 3 and s3_proxy.stalls == 3
    assert sum(s["remote_retries"] for s in stats) > 0 and time.monotonic() - start < 30


def test_s3_server_killed_and_restarted_mid_epoch(s3_env, demo, tmp_path, local_keys):
    """The S3 server behind the endpoint is killed with SIGKILL mid-epoch and a new one takes its place a second
    later. moto keeps objects in memory, so the new server gets the same bytes before the endpoint (the proxy,
    standing in for the store's load balancer) points at it, as a real store's data outlives its frontends."""
    objects = [p for p in sorted(demo.iterdir()) if p.suffix in (".tar", ".json")]
    servers: list[MotoS3] = []

    def serve() -> MotoS3:
        server = MotoS3(tmp_path / f"moto{len(servers)}").start()
        client = remote.s3_client(remote.RemoteOptions(s3_endpoint_url=server.url))
        client.create_bucket(Bucket=BUCKET)
        for p in objects:
            client.put_object(Bucket=BUCKET, Key=f"restart/{p.name}", Body=p.read_bytes())
        servers.append(server)
        return server

    front = FaultProxy(serve().port, seed=3)
    restarted = threading.Event()

    def replace() -> None:
        front.upstream = serve().port
        restarted.set()

    def during(rank, i):
        if rank == 0 and i == 6:  # the readers have opened their first shards and have more to read
            servers[0].stop()
            threading.Timer(1.0, replace).start()

    try:
        cfg = data_cfg(f"s3://{BUCKET}/restart/", s3_endpoint_url=front.url,
                       **{**FAST_RETRIES, "remote_retries": 200, "remote_backoff_max_s": 0.2})
        keys, stats = keys_by_rank(cfg, BATCHES, during=during)
        assert restarted.wait(60)
    finally:
        restarted.wait(60)
        front.close()
        for server in servers:
            server.stop()
    assert len(servers) == 2
    assert keys == local_keys
    assert [s["bad_samples"] for s in stats] == [0, 0]
    assert stats[0]["remote_retries"] > 0, stats


@pytest.mark.parametrize("where", ["http", "s3"])
def test_connections_cut_inside_the_response_headers_are_retried(where, proxy, s3_demo, s3_proxy, local_keys):
    """Half the connections cut within their first 400 bytes, i.e. inside the response headers: http.client then
    ends the headers at the cut, so the response looks complete but has no length (and an empty body), or a
    header value cut short (a Date botocore cannot parse, an ETag that matches nothing). Each is a retry, never an
    empty shard (this used to end shards "after 0 samples" and fail the pretraining test now and then)."""
    fault = proxy if where == "http" else s3_proxy
    fault.cut_probability, fault.cut_max = 0.5, 400
    cfg = (data_cfg(proxy.url + "/demo/", **FAST_RETRIES) if where == "http"
           else data_cfg(s3_demo, s3_endpoint_url=s3_proxy.url, **FAST_RETRIES))
    keys, stats = keys_by_rank(cfg, BATCHES)
    assert keys == local_keys
    assert [s["bad_samples"] for s in stats] == [0, 0]
    assert fault.cuts > 0 and sum(s["remote_retries"] for s in stats) > 0


# ------------------------------------------------------------------------------------------------- pipe


def test_pipe_root_of_the_user_runs_but_pipe_names_in_info_json_do_not(demo, tmp_path):
    """data.train=pipe:... is the user's own command (info.json and shards read through it); a pipe: name inside
    someone's info.json is refused unless data.allow_pipe=true."""
    cfg = data_cfg(f"pipe:cat {demo}/info.json", workers=0)
    ld = build_train_loader(cfg, stage=stage(), micro_batch_size=4, num_classes=0, label_smoothing=0.0, seed=3,
                            rank=0, world_size=1)
    ref = build_train_loader(data_cfg(demo, workers=0), stage=stage(), micro_batch_size=4, num_classes=0,
                             label_smoothing=0.0, seed=3, rank=0, world_size=1)
    assert [next(ld)["key"] for _ in range(5)] == [next(ref)["key"] for _ in range(5)]
    ld.close()
    ref.close()
    info = json.loads((demo / "info.json").read_text())
    marker = tmp_path / "ran"
    info["splits"]["train"]["shards"][0]["name"] = f"pipe:touch {marker}; cat {demo}/train-000000.tar"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"is a shell command \(pipe:\); refused"):
        build_train_loader(data_cfg(evil, workers=0), stage=stage(), micro_batch_size=4, num_classes=0,
                           label_smoothing=0.0, seed=3, rank=0, world_size=1)
    assert not marker.exists()



# ------------------------------------------------------------------------------------------ pretraining


@pytest.mark.slow
def test_pretraining_from_remote_storage_gives_the_local_losses(demo, s3_demo, s3_env, proxy, tmp_path):
    """8 steps of tiny_cpu pretraining on 2 ranks (one torchrun launch, three runs): from local disk, from nginx
    through connections cut at random bytes, and from S3 through cuts and 503 bursts: the same loss at every
    step, and the final evaluation (from the same storage) sees every validation image."""
    import pretrain_launch as launch

    s3_proxy = FaultProxy(s3_env.port, seed=5)
    try:
        proxy.cut_probability, proxy.cut_max = 0.5, 40_000
        s3_proxy.cut_probability, s3_proxy.cut_max, s3_proxy.fail_next = 0.5, 40_000, 3
        retry = ["data.remote_retries=30", "data.remote_backoff_s=0.01", "data.remote_backoff_max_s=0.1",
                 "data.remote_timeout_s=5"]
        steps = ["train.total_steps=8", "eval.every_steps=8", "data.workers=2"]
        runs = {"local": [f"data.train=[{demo}]"],
                "http": [f"data.train=[{proxy.url}/demo/]", *retry],
                "s3": [f"data.train=[{s3_demo}]", f"data.s3_endpoint_url={s3_proxy.url}", *retry]}
        launch.run(tmp_path, 2, [{"overrides": [*over, *steps, f"train.run_dir={tmp_path / name}"]}
                                 for name, over in runs.items()])
        assert proxy.cuts > 0 and s3_proxy.cuts > 0 and s3_proxy.failed > 0
    finally:
        s3_proxy.close()
    losses = {name: launch.losses_by_step(tmp_path / name) for name in runs}
    assert sorted(losses["local"]) == list(range(1, 9))
    assert losses["http"] == losses["local"] and losses["s3"] == losses["local"], losses
    for name in runs:
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["eval"]["raw"]["samples"] == 40, (name, summary["eval"])
    # the retries reach TensorBoard (totals of both ranks' readers): some over the cut connections, none locally
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def last(name: str, tag: str) -> float:
        acc = EventAccumulator(str(tmp_path / name / "tb"))
        acc.Reload()
        return acc.Scalars(tag)[-1].value

    assert last("local", "data/remote_retries") == 0 and last("local", "data/remote_bytes") == 0
    for name in ("http", "s3"):
        assert last(name, "data/remote_retries") > 0 and last(name, "data/remote_bytes") > 0, name


def test_a_shard_replaced_while_it_is_read_is_not_spliced(nginx, demo, proxy):
    """The connection breaks after the shard was replaced on the server: the reopen asks for the version it began
    with (If-Match on the ETag), gets 412, and gives up on the rest instead of joining two files' bytes."""
    folder = demo.parent / "replaced"
    folder.mkdir()
    path = folder / "train-000000.tar"
    shutil.copy(demo / "train-000000.tar", path)
    proxy.cut_probability, proxy.cut_max = 1.0, 20_000  # the first connection breaks inside the shard
    stream = remote.RemoteStream(f"{proxy.url}/replaced/train-000000.tar", remote.RemoteOptions(backoff_s=0.01))
    assert len(stream.read(1000)) == 1000 and stream.etag  # the version is taken once the body delivers bytes
    tmp = folder / ".new"
    tmp.write_bytes(path.read_bytes() + b"\0" * 1024)  # another version: other size, other ETag
    os.replace(tmp, path)
    proxy.cut_probability = 0.0
    with pytest.raises(remote.RemoteError, match="changed while it was being read"):
        while stream.read(1 << 16):
            pass
    assert proxy.cuts == 1
    stream.close()


def test_cache_drops_the_temporary_files_of_dead_fills(tmp_path):
    """A worker killed in the middle of filling the cache leaves its temporary file; the next eviction removes it
    once its process is gone and it has not grown for a while. A live fill's file stays."""
    cache = remote.ShardCache(str(tmp_path), 10**6)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-0000abcd"
    live = tmp_path / f".tmp-{os.getpid()}-0000abcd"
    recent = tmp_path / f".tmp-{dead.pid}-0000ef01"
    for p in (stale, live, recent):
        p.write_bytes(b"x" * 100)
    old = time.time() - remote.STALE_FILL_S - 60
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    cache.evict()
    assert not stale.exists() and live.exists() and recent.exists()


def test_s3_without_credentials_fails_at_once_naming_them(s3_env, s3_demo, tmp_path):
    """Missing credentials are not retried (no backoff for minutes): one line saying what to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "shards", "stats", s3_demo, "--endpoint-url", s3_env.url],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "AWS_ACCESS_KEY_ID" in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and time.monotonic() - start < 20
