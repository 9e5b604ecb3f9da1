"""Real servers for the remote-storage tests and the benchmark: nginx (the Debian package) serving a folder, moto's
S3 server, and a fault-injecting TCP proxy in front of either. Each starts on a free loopback port with its own
config and temp folder; every wait ends on a condition or a timeout; ``stop()`` always ends what was started."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: Optional[subprocess.Popen], timeout: float, what: str) -> None:
    """Until ``127.0.0.1:port`` accepts a connection; fails fast if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def wait_closed(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} still accepts connections {timeout} s after the server was killed")


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------ nginx

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

_NGINX_CONF = """
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    keepalive_requests 100000;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class Nginx:
    """nginx serving ``root`` (read-only, byte ranges) on a free loopback port; ``kill()`` / ``start()`` again."""

    def __init__(self, root: Path, workdir: Path, port: Optional[int] = None):
        if NGINX is None:
            raise RuntimeError("nginx is not installed (make sysdeps installs it as root: apt-get install nginx)")
        self.root, self.dir = Path(root), Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        user = "user root;" if os.geteuid() == 0 else ""  # the workers must read pytest's 0700 temp folders
        (self.dir / "nginx.conf").write_text(_NGINX_CONF.format(user=user, dir=self.dir, port=self.port,
                                                                 root=self.root))
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e",
                                      str(self.dir / "error.log"), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "ab"),
                                     start_new_session=True)
        wait_port(self.port, self.proc, 30, "nginx")
        return self

    def kill(self) -> None:
        """SIGKILL to the master and its workers (the whole process group), as a crashed server."""
        if self.proc is not None:
            _kill_group(self.proc)
            wait_closed(self.port, 30)

    stop = kill


# ------------------------------------------------------------------------------------------------- moto


class MotoS3:
    """moto's S3-compatible server (``python -m moto.server``) on a free loopback port."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(self.dir / "moto.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_port(self.port, self.proc, 60, "moto server")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


# ------------------------------------------------------------------------------------------------ proxy


class FaultProxy:
    """A TCP proxy on a free loopback port in front of ``127.0.0.1:upstream``, with faults a test switches on:

    - ``cut_probability`` / ``cut_max``: a new connection is, with that probability, cut (RST) after a random number
      of response bytes in [0, cut_max);
    - ``fail_next``: the next N connections get ``503 Service Unavailable`` without reaching the server;
    - ``stall_next`` / ``stall_s``: the next N connections stop forwarding after a random number of response bytes
      and hold the connection silent for ``stall_s`` (beyond the client's read timeout), then close it;
    - ``latency_s``: each request waits this long before it is forwarded (a round trip of a far-away server).

    Counters (``connections``, ``cuts``, ``failed``, ``stalls``) let a test check that the faults happened.
    """

    def __init__(self, upstream: int, seed: int = 0):
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.cut_probability, self.cut_max = 0.0, 1 << 16
        self.fail_next = 0
        self.stall_next, self.stall_s = 0, 5.0
        self.latency_s = 0.0
        self.connections = self.cuts = self.failed = self.stalls = 0
        self._closed = threading.Event()
        self._socks: set[socket.socket] = set()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(128)
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset_faults(self) -> None:
        with self.lock:
            self.cut_probability, self.fail_next, self.stall_next, self.latency_s = 0.0, 0, 0, 0.0

    def close(self) -> None:
        self._closed.set()
        self._srv.close()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._srv.accept()
            except socket.timeout:
                continue  # a closed listening socket does not wake accept(): look at the flag every 0.2 s
            except OSError:
                return
            client.settimeout(None)
            with self.lock:
                self.connections += 1
                fail = self.fail_next > 0
                self.fail_next -= fail
                stall = not fail and self.stall_next > 0
                self.stall_next -= stall
                cut = not fail and not stall and self.rng.random() < self.cut_probability
                limit = self.rng.randrange(self.cut_max) if (cut or stall) else None
                self.cuts += cut
                self.stalls += stall
                self.failed += fail
                self._socks.add(client)
            threading.Thread(target=self._serve, args=(client, fail, stall, limit), daemon=True).start()

    def _serve(self, client: socket.socket, fail: bool, stall: bool, limit: Optional[int]) -> None:
        upstream = None
        try:
            if fail:
                _read_request_head(client)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            upstream.settimeout(None)
            with self.lock:
                self._socks.add(upstream)
            t = threading.Thread(target=self._pump_requests, args=(client, upstream), daemon=True)
            t.start()
            if limit is None and hasattr(os, "splice"):
                _splice(upstream, client)  # no fault on this connection: forward in the kernel, no copies
                return
            sent = 0
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    client.sendall(data[:limit - sent])
                    if stall:  # silent, then closed: the client's read timeout must fire first
                        self._closed.wait(self.stall_s)
                    else:  # a reset, as a dropped connection or a crashed middlebox gives
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    _close(s)
                    with self.lock:
                        self._socks.discard(s)

    def _pump_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    upstream.shutdown(socket.SHUT_WR)
                    return
                if self.latency_s:
                    self._closed.wait(self.latency_s)
                upstream.sendall(data)
        except OSError:
            return


def _splice(src: socket.socket, dst: socket.socket) -> None:
    """Forward ``src`` to ``dst`` until ``src`` ends, through a pipe with os.splice (the bytes stay in the kernel:
    the proxy costs the benchmark's 2 cores little CPU)."""
    r, w = os.pipe()
    try:
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: 1 MB per move
        except OSError:
            pass
        while True:
            n = os.splice(src.fileno(), w, 1 << 20)
            if n == 0:
                return
            while n:
                n -= os.splice(r, dst.fileno(), n)
    finally:
        os.close(r)
        os.close(w)


def _read_request_head(sock: socket.socket) -> None:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 1 << 16:
        more = sock.recv(4096)
        if not more:
            return
        data += more


def _close(s: socket.socket) -> None:
    # shutdown first: a process forked while the connection was open (a loader worker, a pool worker) holds a
    # copy of the descriptor, and close() alone would leave the connection open until that copy goes too
    for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
        try:
            end()
        except OSError:
            pass


def main(argv: Optional[list[str]] = None) -> int:
    """``python tests/remote_servers.py proxy UPSTREAM_PORT [--latency-ms 10]``: a proxy in its own process (the
    benchmark keeps its threads off the measured process); prints its port, serves until SIGTERM / SIGKILL."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["proxy"])
    p.add_argument("upstream", type=int)
    p.add_argument("--latency-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    proxy = FaultProxy(args.upstream)
    proxy.latency_s = args.latency_ms / 1000
    print(proxy.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
