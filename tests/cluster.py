"""A real multi-node SLURM cluster on one machine: one network namespace, hostname and slurmd per node.

Each node is a network namespace with its own loopback, its own address on a private bridge (a veth pair whose
host end is enslaved to the bridge) and its own UTS namespace (``hostname`` is the node name), running
``slurmd -N NODE``. One munged and one slurmctld run in the machine's own namespace, reachable from the nodes
at the bridge's address; the munge socket is a file, shared by all. Node names resolve on every node through
``/etc/netns/NS/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts`` inside the namespace. So a job's
ranks on node 2 reach the rendezvous on node 1 over the bridge, never over loopback, exactly as on a real
cluster, and ``tc`` / the veth byte counters see all of that traffic.

Names (bridge, namespaces, veths, nodes), the subnet and the ports carry a per-cluster id, so two clusters never
collide; everything a cluster creates is recorded in a registry file under /tmp, so a crashed test session's
leftovers are removed by the next one (or by ``down``).

For people, to rehearse a multi-node job before spending cluster hours (as root, with slurm-wlm and munge
installed; `make test` installs them)::

    python tests/cluster.py up --nodes 2        # prints SLURM_CONF and an sbatch example
    SLURM_CONF=... sbatch --nodes=2 --ntasks-per-node=2 ... slurm/pretrain_xl.sh ...
    python tests/cluster.py down                # stops every cluster it started

In the tests: ``get_multinode(2)`` starts one per session (or returns it); it is stopped at exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import ClusterError, SlurmCluster, _cmdline, _pid_alive, _which, fail_job, started  # noqa: E402,F401
from slurm_cluster import unavailable_reason as _slurm_unavailable  # noqa: E402

REGISTRY_DIR = Path(tempfile.gettempdir())
REGISTRY_GLOB = "effnetv2-multinode-*.json"
NETNS_ETC = Path("/etc/netns")


def unavailable_reason() -> Optional[str]:
    """Why a multi-node cluster cannot be started here (None: it can)."""
    why = _slurm_unavailable()
    if why:
        return why
    for tool in ("ip", "unshare", "nsenter", "hostname"):
        if _which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"ev2probe{os.getpid() % 10000}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no route on this machine uses yet."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(200, 208)}.{rng.randrange(256)}.0/24")
        if str(net.network_address)[:-2] not in used:
            return net
    raise ClusterError("no free 10.200.0.0/13 subnet for the test cluster's bridge")


class MultiNodeCluster(SlurmCluster):
    """``nodes`` network-namespace nodes, one slurmd each, one slurmctld and munged in the root namespace."""

    def __init__(self, root: Path, nodes: int, cpus: int = 2, cid: Optional[str] = None):
        super().__init__(root)
        rng = random.Random()
        self.cid = cid or f"{rng.randrange(16 ** 4):04x}"
        self.nodes = [f"ev2{self.cid}n{i}" for i in range(1, nodes + 1)]
        self.netns = [f"ev2-{self.cid}-n{i}" for i in range(1, nodes + 1)]
        self.veths = [f"ev2{self.cid}v{i}" for i in range(1, nodes + 1)]
        self.bridge = f"ev2{self.cid}br"
        self.cpus = cpus
        self.subnet = _free_subnet(rng)
        hosts = list(self.subnet.hosts())
        self.controller_addr = str(hosts[0])
        self.addrs = {node: str(hosts[10 + i]) for i, node in enumerate(self.nodes)}
        self.registry = REGISTRY_DIR / f"effnetv2-multinode-{self.cid}.json"
        self.controller = os.uname().nodename.split(".")[0]

    # ------------------------------------------------------------------ network

    def _network_up(self) -> None:
        self._record()  # before creating anything: a crash half-way is still cleaned up
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.controller_addr}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + f"{self.controller_addr} {self.controller}\n" + "".join(
            f"{addr} {node}\n" for node, addr in self.addrs.items())
        for node, ns, veth in zip(self.nodes, self.netns, self.veths):
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{self.addrs[node]}/{self.subnet.prefixlen}", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def _network_down(self) -> None:
        for ns in self.netns:
            _ip("netns", "del", ns, check=False)  # takes the veth pair with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        try:
            NETNS_ETC.rmdir()  # only if no other namespace config is left
        except OSError:
            pass

    # ------------------------------------------------------------------ slurm

    def _write_config(self, cpus: int) -> None:
        super()._write_config(cpus)
        r = self.root
        text = self.conf.read_text()
        keep = [line for line in text.splitlines()
                if not line.startswith(("SlurmctldHost=", "SlurmdPidFile=", "SlurmdLogFile=", "SlurmdSpoolDir=",
                                        "NodeName=", "PartitionName=", "# Written by"))]
        nodes = "".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={self.cpus} State=UNKNOWN\n"
                        for n, a in self.addrs.items())
        self.conf.write_text(
            f"# Written by tests/cluster.py: a {len(self.nodes)}-node test cluster in network namespaces.\n"
            f"SlurmctldHost={self.controller}({self.controller_addr})\n"
            + "\n".join(keep) + "\n"
            + f"SlurmdPidFile={r}/slurmd-%n.pid\nSlurmdLogFile={r}/log/slurmd-%n.log\nSlurmdSpoolDir={r}/spool/%n\n"
            + nodes
            + f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP "
              "OverSubscribe=NO\n")

    def start(self, cpus: int = 2, timeout: float = 90) -> "MultiNodeCluster":
        self.cpus = cpus
        self._network_up()
        self._write_config(cpus)
        self._start_controller(timeout)
        r = self.root
        for node, ns in zip(self.nodes, self.netns):
            (r / "spool" / node).mkdir(parents=True, exist_ok=True)
            # nsenter --net: the node's network (unlike `ip netns exec`, it keeps /sys and with it the cgroup
            # file systems slurmd needs); unshare --mount --uts: its own /etc/hosts (bind-mounted, private to the
            # node) and its own hostname. Each program execs the next, so the Popen pid ends up being slurmd's.
            self._spawn(f"slurmd-{node}", [
                _which("nsenter"), f"--net=/run/netns/{ns}", _which("unshare"), "--mount", "--uts", "sh", "-c",
                f"mount --bind {NETNS_ETC / ns / 'hosts'} /etc/hosts && hostname {node} && "
                f"exec {_which('slurmd')} -D -N {node} -f {self.conf}"])
        self._record()
        self._wait(lambda: all(self.node_state(n) in ("idle", "mixed", "allocated") for n in self.nodes), timeout,
                   "the nodes did not become idle")
        return self

    def node_state(self, node: Optional[str] = None) -> str:
        node = node or self.nodes[0]
        out = self.run(["sinfo", "-h", "-n", node, "-o", "%T"], check=False, timeout=10).stdout.strip()
        return out.rstrip("*~#!%$@^-").lower()

    def stop(self) -> None:
        self._stop_daemons()
        self._network_down()
        self.registry.unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _record(self) -> None:
        self.registry.write_text(json.dumps({
            "root": str(self.root), "owner": os.getpid(), "pids": {n: p.pid for n, p in self.procs.items()},
            "netns": self.netns, "veths": self.veths, "bridge": self.bridge, "conf": str(self.conf),
            "nodes": self.addrs, "controller": [self.controller, self.controller_addr]}))

    # ------------------------------------------------------------------ faults

    def lose_node(self, node: str) -> list[int]:
        """The node fails as a machine does: its link goes down first (so nothing it held gets a FIN or a reset
        out), then every process in its namespace (slurmd, the job's step daemons, tasks, loader workers) is
        killed with SIGKILL. The other nodes and the controller only see silence. Returns the pids killed."""
        i = self.nodes.index(node)
        _ip("link", "set", self.veths[i], "down")
        pids = [int(p) for p in _ip("netns", "pids", self.netns[i]).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    # ------------------------------------------------------------------ measurements

    def bytes_sent(self) -> dict[str, int]:
        """Bytes each node has sent into the bridge so far (its veth's receive counter on the host side)."""
        out = {}
        for node, veth in zip(self.nodes, self.veths):
            out[node] = int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())
        return out


def _end_leftovers(everything: bool = False) -> list[str]:
    """Stop clusters whose owning process is gone (or all with ``everything``): daemons by recorded pid (when the
    pid still runs a command naming that cluster's folder), namespaces, veths, bridge, files."""
    ended = []
    for reg in sorted(REGISTRY_DIR.glob(REGISTRY_GLOB)):
        try:
            old = json.loads(reg.read_text())
        except (OSError, ValueError):
            reg.unlink(missing_ok=True)
            continue
        owner = old.get("owner")
        if not everything and (owner is None  # started by `up` for a person: only `down` stops it
                               or (isinstance(owner, int) and _pid_alive(owner) and "python" in _cmdline(owner))):
            continue
        root = old.get("root", "")
        for pid in old.get("pids", {}).values():
            if root and root in _cmdline(pid) and _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(root in _cmdline(p) and _pid_alive(p)
                                                  for p in old.get("pids", {}).values()):
            time.sleep(0.2)
        for ns in old.get("netns", []):
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        for veth in old.get("veths", []):
            _ip("link", "del", veth, check=False)
        if old.get("bridge"):
            _ip("link", "del", old["bridge"], check=False)
        if root.startswith(tempfile.gettempdir()):
            shutil.rmtree(root, ignore_errors=True)
        reg.unlink(missing_ok=True)
        ended.append(root)
    return ended


_CLUSTER: Optional[MultiNodeCluster] = None


def get_multinode(nodes: int = 2, cpus: int = 2, timeout: float = 90) -> MultiNodeCluster:
    """The session's multi-node cluster: started on first use (or when the node count changes), stopped at exit."""
    import atexit

    global _CLUSTER
    if _CLUSTER is not None and _CLUSTER.alive() and len(_CLUSTER.nodes) == nodes:
        return _CLUSTER
    stop_multinode()
    _end_leftovers()
    root = Path(tempfile.mkdtemp(prefix="mn-", dir=tempfile.gettempdir()))
    _CLUSTER = started(MultiNodeCluster(root, nodes, cpus), cpus, timeout)
    atexit.register(stop_multinode)
    return _CLUSTER


def stop_multinode() -> None:
    global _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and leave it running")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus", type=int, default=2, help="CPUs each node advertises")
    sub.add_parser("down", help="stop every cluster started by `up` (and leftovers of crashed test sessions)")
    args = p.parse_args(argv)
    if args.cmd == "down":
        ended = _end_leftovers(everything=True)
        print(f"stopped {len(ended)} cluster(s)" + "".join(f"\n  {r}" for r in ended))
        return 0
    why = unavailable_reason()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    _end_leftovers()
    cluster = MultiNodeCluster(Path(tempfile.mkdtemp(prefix="mn-", dir=tempfile.gettempdir())), args.nodes, args.cpus)
    try:
        cluster.start(cpus=args.cpus)
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        cluster.stop()
        raise
    cluster.procs.clear()  # leave the daemons running; `down` finds them through the registry
    data = json.loads(cluster.registry.read_text())
    data["owner"] = None  # no owner process: only `down` (or a later crashed-session cleanup with it) stops it
    cluster.registry.write_text(json.dumps(data))
    print(f"cluster {cluster.cid}: {len(cluster.nodes)} nodes "
          + ", ".join(f"{n} ({a})" for n, a in cluster.addrs.items())
          + f"; controller {cluster.controller} ({cluster.controller_addr})\n"
          f"  export SLURM_CONF={cluster.conf}\n"
          f"  sinfo\n"
          f"  sbatch --nodes={len(cluster.nodes)} --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 "
          f"--time=10 --output=job-%j.out slurm/pretrain_xl.sh train.run_dir=runs/rehearsal ...\n"
          f"  python tests/cluster.py down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
