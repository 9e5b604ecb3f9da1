"""Remote shard folders: http(s):// and s3:// streams that survive broken connections, a node-local shard cache,
and the uploads of ``python -m shards write ... s3://bucket/prefix/``.

A shard is streamed, never downloaded whole first. :class:`RemoteStream` is a raw binary stream over one object
that counts the bytes it has delivered; when the connection breaks (reset, timeout, a 5xx, a body shorter than
announced) it reopens the object at that byte (an HTTP ``Range`` request, an S3 ranged GET) after a capped
exponential backoff with jitter, so the reader above it (the tar reader) sees one uninterrupted byte stream and
the loader continues at the very next sample. After ``retries`` failed tries in a row it raises
:class:`RemoteError` (an ``OSError``, which the shard reader turns into bad samples for the rest of the shard,
with one warning naming the URL).

The protocols are spoken by well-kept libraries: ``requests`` (urllib3) for HTTP, ``boto3`` for S3, which also
finds credentials and endpoints the standard way (``AWS_*`` environment, ``~/.aws``, ``AWS_ENDPOINT_URL``);
:attr:`RemoteOptions.s3_endpoint_url` overrides the endpoint (MinIO, Ceph, a GCS S3 endpoint). Neither library's
own retries are used (they would restart a body from byte 0); the retry loop here owns them.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional
from urllib.parse import urlparse

import requests
import urllib3

from . import ShardError
from .format import INFO_NAME, parse_info

_CHUNK = 1 << 20
CACHE_SUFFIX = ".shard"
_TMP_PREFIX = ".tmp-"
STALE_FILL_S = 600.0
_DRAIN_AT_CLOSE = 1 << 20  # a reader that stops at the end-of-archive blocks leaves < 10 KB: read it for the cache


class RemoteError(OSError):
    """A remote object could not be read (given up after the retries, or an error that no retry fixes)."""


class _Retryable(Exception):
    """A failure that a reopen at the same byte may fix (connection, timeout, 5xx, short body)."""


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read; the loader builds it from the ``data`` config section."""

    retries: int = 8
    """Failed tries in a row (without a byte of progress) before the rest of a shard is given up."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled per further failure (with jitter: x0.5-1.0), capped below."""
    backoff_max_s: float = 30.0
    timeout_s: float = 60.0
    """Connect and read timeout of one request (a read that stalls this long is a failure and is retried)."""
    s3_endpoint_url: Optional[str] = None
    """S3-compatible endpoint (None: boto3's own resolution: AWS_ENDPOINT_URL, ~/.aws/config, AWS)."""
    cache_dir: Optional[str] = None
    """Node-local shard cache folder (None: no cache)."""
    cache_bytes: int = 0
    """Size bound of the cache (least recently used shards are evicted)."""


# Per-process counters (each loader worker has its own; the loader ships deltas with every batch).
COUNTERS = {"retries": 0, "bytes": 0, "wait_s": 0.0, "failures": 0, "cache_hits": 0}


def counters_snapshot() -> dict:
    return dict(COUNTERS)


def counters_delta(before: dict) -> dict:
    return {k: COUNTERS[k] - before.get(k, 0) for k in COUNTERS}


def counters_since(mark: dict) -> dict:
    """The counters' growth since ``mark`` (a :func:`counters_snapshot`), which then moves on to now."""
    delta = counters_delta(mark)
    mark.update(COUNTERS)
    return delta


def scheme(url: str) -> str:
    return urlparse(url).scheme.lower() if "://" in url else ""


def is_remote(url: str) -> bool:
    """URLs this module streams with retries (others, like ``pipe:``, go to webdataset's gopen)."""
    return scheme(url) in ("http", "https", "s3")


# -------------------------------------------------------------------------------------------- clients

_clients: dict = {}


def _session():
    """One requests session per process (a forked loader worker must not share its parent's sockets)."""
    key = ("http", os.getpid())
    if key not in _clients:
        _clients[key] = requests.Session()
    return _clients[key]


def s3_client(options: RemoteOptions):
    """A boto3 S3 client per process and endpoint; botocore's retries off (ours restart at the byte)."""
    import boto3  # noqa: PLC0415 - boto3 takes ~0.3 s to import: only for s3 data
    from botocore.config import Config  # noqa: PLC0415 - botocore: only for s3 data (see s3_client)

    key = ("s3", os.getpid(), options.s3_endpoint_url, options.timeout_s)
    if key not in _clients:
        cfg = Config(connect_timeout=options.timeout_s, read_timeout=options.timeout_s,
                     retries={"max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"})
        _clients[key] = boto3.session.Session().client("s3", endpoint_url=options.s3_endpoint_url or None,
                                                       config=cfg)
    return _clients[key]


def split_s3(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if not p.netloc:
        raise ShardError(f"{url}: an s3 URL needs a bucket: s3://bucket/prefix/")
    return p.netloc, p.path.lstrip("/")


class _Body:
    """An open response body: ``read(n)`` and ``close()``; ``size`` is the whole object's size when known, ``etag``
    its version (a reopen asks for the same version: bytes of a shard replaced meanwhile are never spliced in)."""

    def __init__(self, read: Callable[[int], bytes], close: Callable[[], None], size: Optional[int],
                 etag: Optional[str] = None):
        self.read, self.close, self.size, self.etag = read, close, size, etag


def _changed(url: str) -> RemoteError:
    return RemoteError(f"{url}: the object changed while it was being read (another version); the rest of this "
                       "shard cannot be joined to what was read")


def _total_from_range(content_range: Optional[str]) -> Optional[int]:
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return None


def _open_http(url: str, offset: int, options: RemoteOptions, etag: Optional[str] = None) -> _Body:
    # identity: byte offsets are the file's own, never those of a compressed transfer encoding
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    if etag:
        headers["If-Match"] = etag
    try:
        r = _session().get(url, headers=headers, stream=True, timeout=(options.timeout_s, options.timeout_s))
    except requests.RequestException as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from None
    if r.status_code >= 500 or r.status_code in (408, 429):
        r.close()
        raise _Retryable(f"HTTP {r.status_code}")
    if r.status_code == 416 and offset:  # nothing left past the offset
        r.close()
        return _Body(lambda n: b"", lambda: None, offset, etag)
    if r.status_code == 412:
        r.close()
        raise _changed(url)
    if r.status_code not in (200, 206):
        r.close()
        raise RemoteError(f"{url}: HTTP {r.status_code} {r.reason}")
    size = _total_from_range(r.headers.get("Content-Range"))
    if size is None and r.headers.get("Content-Length", "").isdigit():
        size = int(r.headers["Content-Length"]) + (offset if r.status_code == 206 else 0)
    if size is None and "chunked" not in r.headers.get("Transfer-Encoding", "").lower():
        # http.client ends the headers at the end of the stream: a connection cut inside them looks like a
        # response without a length whose body is empty. File servers (nginx, S3, CDNs) always send a length.
        r.close()
        raise _Retryable("response without Content-Length (the connection was cut inside its headers?)")
    raw = r.raw

    def read(n: int) -> bytes:
        try:
            return raw.read(n, decode_content=False)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None

    body = _Body(read, r.close, size, r.headers.get("ETag"))
    if r.status_code == 200 and offset:  # the server ignored the range: drop what was read already
        left = offset
        while left:
            got = read(min(left, _CHUNK))
            if not got:
                raise _Retryable("body ended before the resume offset")
            left -= len(got)
    return body


_S3_RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestTimeTooSkewed"}


def _s3_error(e: Exception) -> Exception:
    from botocore import exceptions as bx  # noqa: PLC0415 - botocore: only for s3 data (see s3_client)

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500 or err.get("Code") in _S3_RETRY_CODES:
            return _Retryable(f"S3 {err.get('Code')} (HTTP {status})")
        return RemoteError(f"S3 {err.get('Code')}: {err.get('Message')}")
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return RemoteError(f"{e}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or write "
                           "~/.aws/credentials")
    transient = (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError)
    # ValueError: botocore parsing a header value cut short with the connection (e.g. 'Invalid timestamp')
    if isinstance(e, (*transient, OSError, ValueError)) or "urllib3" in type(e).__module__:
        return _Retryable(f"{type(e).__name__}: {e}")
    return RemoteError(f"{type(e).__name__}: {e}")  # unknown: not retried, but still a readable shard error


def _open_s3(url: str, offset: int, options: RemoteOptions, etag: Optional[str] = None) -> _Body:
    bucket, key = split_s3(url)
    try:
        kw = {"Range": f"bytes={offset}-"} if offset else {}
        if etag:
            kw["IfMatch"] = etag
        r = s3_client(options).get_object(Bucket=bucket, Key=key, **kw)
    except Exception as e:
        from botocore.exceptions import ClientError  # noqa: PLC0415 - botocore: only for s3 data (see s3_client)

        code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else None
        if offset and code == "InvalidRange":
            return _Body(lambda n: b"", lambda: None, offset, etag)
        if code in ("PreconditionFailed", "412"):
            raise _changed(url) from None
        err = _s3_error(e)
        raise (RemoteError(f"{url}: {err}") if isinstance(err, RemoteError) else err) from None
    stream = r["Body"]
    size = _total_from_range(r.get("ContentRange"))
    if size is None and r.get("ContentLength") is not None:
        size = int(r["ContentLength"]) + offset
    if size is None:  # S3 always sends the length: the connection was cut inside the headers (see _open_http)
        stream.close()
        raise _Retryable("S3 response without Content-Length (the connection was cut inside its headers?)")

    def read(n: int) -> bytes:
        try:
            return stream.read(n)
        except Exception as e:
            err = _s3_error(e)
            raise err from None

    return _Body(read, stream.close, size, r.get("ETag"))


_OPENERS = {"http": _open_http, "https": _open_http, "s3": _open_s3}


# ------------------------------------------------------------------------------------------- streams


def _jitter() -> random.Random:
    """A per-process RNG for the backoff jitter: not the global one (the loader seeds it per sample for the
    augmentation), and not one inherited through fork (every worker would wait the same "random" times)."""
    key = ("jitter", os.getpid())
    if key not in _clients:
        _clients[key] = random.Random(os.getpid() ^ time.time_ns())
    return _clients[key]


class RemoteStream(io.RawIOBase):
    """A read-once byte stream of one remote object that reopens at its position after a failure."""

    def __init__(self, url: str, options: RemoteOptions, offset: int = 0):
        super().__init__()
        if scheme(url) not in _OPENERS:
            raise RemoteError(f"{url}: no retrying reader for this scheme (http, https and s3 have one)")
        self.url, self.options = url, options
        self.position = offset
        self.size: Optional[int] = None
        self.etag: Optional[str] = None
        self._open_fn = _OPENERS[scheme(url)]
        self._body: Optional[_Body] = None
        self._with_retries(self._reopen)

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self._drop()
        self._body = self._open_fn(self.url, self.position, self.options, self.etag)
        if self._body.size is not None:
            self.size = self._body.size

    def _drop(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:
                pass  # a broken connection may fail to close: it is dropped either way
            self._body = None

    def _with_retries(self, fn):
        """``fn()`` until it succeeds; a retryable failure drops the connection, waits and tries again (``fn``
        reconnects at ``self.position``). Failures count in a row: any success starts the count afresh."""
        failures = 0
        while True:
            try:
                return fn()
            except _Retryable as e:
                self._drop()
                failures += 1
                if failures > self.options.retries:
                    COUNTERS["failures"] += 1
                    where = f"at byte {self.position}" + (f" of {self.size}" if self.size else "")
                    raise RemoteError(f"{self.url}: gave up after {failures} failed tries {where} ({e})") from None
                wait = min(self.options.backoff_max_s, self.options.backoff_s * 2 ** (failures - 1))
                wait *= _jitter().uniform(0.5, 1.0)
                COUNTERS["retries"] += 1
                COUNTERS["wait_s"] += wait
                time.sleep(wait)
            except RemoteError:
                COUNTERS["failures"] += 1
                raise

    def readinto(self, buf) -> int:
        want = len(buf)
        if want == 0 or (self.size is not None and self.position >= self.size):
            return 0

        def read_some() -> bytes:
            if self._body is None:
                self._reopen()
            data = self._body.read(want)
            if not data and (self.size is None or self.position < self.size):
                if self.size is None:
                    return data  # no announced size (chunked): a clean end is the end
                raise _Retryable(f"connection closed at byte {self.position} of {self.size}")
            if self.etag is None and self._body.etag and not self._body.etag.startswith("W/"):
                # the version this stream reads, taken once its body has delivered bytes (a header cut short
                # with its connection is never trusted); strong validators only: If-Match never matches a weak one
                self.etag = self._body.etag
            return data

        data = self._with_retries(read_some)
        n = len(data)
        buf[:n] = data
        self.position += n
        COUNTERS["bytes"] += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_remote(url: str, options: RemoteOptions = RemoteOptions(), sha256: Optional[str] = None) -> BinaryIO:
    """A buffered, forward-only binary stream of a remote object (through the node-local cache when set)."""
    if options.cache_dir and options.cache_bytes > 0:
        return ShardCache(options.cache_dir, options.cache_bytes).open(url, options, sha256)
    return io.BufferedReader(RemoteStream(url, options), _CHUNK)


def read_bytes(url: str, options: RemoteOptions = RemoteOptions()) -> bytes:
    with open_remote(url, options) as f:
        return f.read()


# --------------------------------------------------------------------------------------------- cache


class _TeeStream(io.RawIOBase):
    """Passes a remote stream through and writes its bytes to a temporary file; when the whole object went
    through (and its sha256 matches the recorded one), the file is renamed into the cache."""

    def __init__(self, src: RemoteStream, cache: "ShardCache", final: Path, sha256: Optional[str]):
        super().__init__()
        self._src, self._cache, self._final, self._sha = src, cache, final, sha256
        self._tmp = final.parent / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        self._out = open(self._tmp, "wb")
        self._hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._src.readinto(buf)
        if n:
            view = memoryview(buf)[:n]
            self._out.write(view)
            self._hash.update(view)
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            src = self._src
            complete = src.size is not None and src.position >= src.size
            if not complete and src.size is not None and src.size - src.position <= _DRAIN_AT_CLOSE:
                buf = bytearray(_CHUNK)
                try:
                    while self.readinto(buf):
                        pass
                    complete = src.position >= src.size
                except OSError:
                    complete = False
            self._out.close()
            if complete and (self._sha is None or self._hash.hexdigest() == self._sha):
                os.replace(self._tmp, self._final)
                self._cache.evict(keep=self._final)
        finally:
            self._tmp.unlink(missing_ok=True)
            self._src.close()
            super().close()


class ShardCache:
    """A size-bounded, least-recently-used cache of whole shards in a node-local folder.

    Safe with several workers and ranks on a node: a shard enters under a unique temporary name and is renamed
    into place only when complete and matching its recorded sha256 (concurrent fills of one shard each rename a
    complete copy); a hit refreshes the file's mtime (the LRU clock); eviction runs under an exclusive
    ``flock`` on ``.lock`` and unlinks the oldest files, which readers that have them open keep reading.
    """

    def __init__(self, folder: str, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, url: str, sha256: Optional[str]) -> Path:
        digest = hashlib.blake2b(f"{url}|{sha256 or ''}".encode(), digest_size=16).hexdigest()
        return self.folder / (digest + CACHE_SUFFIX)

    def open(self, url: str, options: RemoteOptions, sha256: Optional[str] = None) -> BinaryIO:
        path = self.path_for(url, sha256)
        try:
            f = open(path, "rb", buffering=_CHUNK)
        except FileNotFoundError:
            return io.BufferedReader(_TeeStream(RemoteStream(url, options), self, path, sha256), _CHUNK)
        COUNTERS["cache_hits"] += 1
        try:
            os.utime(path)
        except FileNotFoundError:
            pass  # evicted just now by another process: the open file stays readable
        return f

    def entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.folder.iterdir():
            if p.name.endswith(CACHE_SUFFIX):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _drop_stale_fills(self) -> None:
        """Temporary files of fills whose process died (killed worker, lost node's rank): the pid is gone from
        this node and the file has not grown for ``STALE_FILL_S`` (a live fill writes continuously)."""
        now = time.time()
        for p in self.folder.glob(_TMP_PREFIX + "*"):
            pid = p.name[len(_TMP_PREFIX):].split("-", 1)[0]
            try:
                stale = now - p.stat().st_mtime > STALE_FILL_S and not Path(f"/proc/{pid}").exists()
            except FileNotFoundError:
                continue
            if stale:
                p.unlink(missing_ok=True)

    def evict(self, keep: Optional[Path] = None) -> None:
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._drop_stale_fills()
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, p in entries:
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                p.unlink(missing_ok=True)
                total -= size


# -------------------------------------------------------------------------------------------- uploads


def join_url(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def upload_file(path: str | os.PathLike, url: str, options: RemoteOptions = RemoteOptions(),
                multipart_bytes: int = 64 << 20) -> None:
    """Upload a local file to ``s3://bucket/key`` (multipart above ``multipart_bytes``, boto3's transfer
    manager with its own retries per part)."""
    from boto3.s3.transfer import TransferConfig  # noqa: PLC0415 - botocore: only for s3 data (see s3_client)

    bucket, key = split_s3(url)
    cfg = TransferConfig(multipart_threshold=multipart_bytes, multipart_chunksize=max(5 << 20, multipart_bytes),
                         max_concurrency=4)
    s3_client(options).upload_file(str(path), bucket, key, Config=cfg)


def put_bytes(data: bytes, url: str, options: RemoteOptions = RemoteOptions()) -> None:
    bucket, key = split_s3(url)
    s3_client(options).put_object(Bucket=bucket, Key=key, Body=data)


def list_sizes(root: str, options: RemoteOptions = RemoteOptions()) -> dict[str, int]:
    """{name: size} of the objects directly under an s3 prefix."""
    bucket, prefix = split_s3(join_url(root, ""))
    out: dict[str, int] = {}
    for page in s3_client(options).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            name = obj["Key"][len(prefix):]
            if "/" not in name:
                out[name] = int(obj["Size"])
    return out



class S3Publisher:
    """Where ``python -m shards write`` puts a finished shard when OUT is ``s3://bucket/prefix/``: the writer
    writes each shard into a local staging folder as usual (temp name, fsync, rename), then this uploads it
    (multipart above ``multipart_bytes``), checks the object's size and drops the local copy. A rerun finds the
    uploaded shards in the bucket (name and size, against the results kept in the staging folder) and writes
    only the rest; info.json goes up last and marks the end, as in a local folder."""

    def __init__(self, root: str, options: RemoteOptions = RemoteOptions(), multipart_bytes: int = 64 << 20):
        self.root = join_url(root, "")
        split_s3(self.root)
        self.options, self.multipart_bytes = options, multipart_bytes

    def url(self, name: str) -> str:
        return join_url(self.root, name)

    def uploaded(self) -> dict[str, int]:
        return list_sizes(self.root, self.options)

    def existing_info(self) -> Optional[bytes]:
        from botocore.exceptions import ClientError  # noqa: PLC0415 - botocore: only for s3 data (see s3_client)

        bucket, key = split_s3(self.url("info.json"))
        try:
            return s3_client(self.options).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                raise ShardError(f"{self.root}: bucket {bucket!r} does not exist; create it first "
                                 f"(aws s3 mb s3://{bucket})") from None
            raise

    def shard(self, path: Path, size: int) -> None:
        url = self.url(path.name)
        upload_file(path, url, self.options, self.multipart_bytes)
        bucket, key = split_s3(url)
        got = s3_client(self.options).head_object(Bucket=bucket, Key=key)["ContentLength"]
        if got != size:
            raise ShardError(f"{url}: uploaded {got} bytes, the shard has {size}; rerun the same command")
        path.unlink()

    def put(self, name: str, data: bytes) -> None:
        put_bytes(data, self.url(name), self.options)

    def delete(self, name: str) -> None:
        bucket, key = split_s3(self.url(name))
        s3_client(self.options).delete_object(Bucket=bucket, Key=key)


# ------------------------------------------------------------------------------ verify / stats of a remote folder


def read_remote_info(root: str, options: RemoteOptions = RemoteOptions()) -> dict:
    url = join_url(root, INFO_NAME)
    try:
        text = read_bytes(url, options)
    except OSError as e:
        raise ShardError(f"{url}: cannot read ({e}); check the URL and the credentials / endpoint "
                         "(AWS_* environment, ~/.aws, AWS_ENDPOINT_URL)") from None
    return parse_info(text, url)


def object_sizes(root: str, names: list[str], options: RemoteOptions = RemoteOptions()) -> dict[str, int]:
    """Sizes of the named objects that exist under ``root`` (s3: one listing, also of unlisted objects;
    http(s): a HEAD request per name)."""
    if scheme(root) == "s3":
        return list_sizes(root, options)
    out = {}
    for name in names:
        r = _session().head(join_url(root, name), timeout=options.timeout_s, allow_redirects=True)
        if r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
            out[name] = int(r.headers["Content-Length"])
    return out


def download(url: str, dest: Path, options: RemoteOptions = RemoteOptions()) -> Path:
    """Stream ``url`` into ``dest`` (with the retries of :class:`RemoteStream`)."""
    with io.BufferedReader(RemoteStream(url, options), _CHUNK) as src, open(dest, "wb") as f:
        shutil.copyfileobj(src, f, _CHUNK)
    return dest
