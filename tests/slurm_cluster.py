"""A real one-node SLURM cluster for the tests: munged + slurmctld + slurmd on this machine, started once per
test session (as root, when the Debian packages slurm-wlm and munge are installed: ``make test`` does that).

Everything lives in a private folder under /tmp (config, munge key and socket, state, logs), on free ports,
so it touches neither /etc/slurm nor a cluster the machine may already run. Every wait has a timeout.

    cluster = get_cluster()            # starts it, or returns the one this process started already
    job = cluster.sbatch(script, "--output", out)
    cluster.wait_for(job, ("COMPLETED",), timeout=60)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, NoReturn, Optional, Sequence

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
NODE = "localhost"
# Daemons of an earlier session that died without cleaning up are found (and ended) through this file.
REGISTRY = Path(tempfile.gettempdir()) / "effnetv2-test-slurm.json"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


class ClusterError(RuntimeError):
    """The cluster could not be started or a job did not reach the expected state; carries log tails."""


def fail_job(error: BaseException, *, logs: str = "", **outputs: Path) -> NoReturn:
    """Fail a test whose job did not end as expected: the error and the daemons' logs first, then each of
    ``outputs`` (name=file: the job's output, a rank's log) last, without the traceback, so that the end of a
    long CI log, the part that gets read, shows what the job printed."""
    import pytest  # noqa: PLC0415 - this module is also the multi-node cluster's command-line tool

    parts = [str(error)] + ([logs] if logs else [])
    for name, path in outputs.items():
        text = path.read_text(errors="replace") if path.exists() else "(no file)"
        parts.append(f"--- {name.replace('_', ' ')} ({path}, the last 8000 characters)\n{text[-8000:]}")
    pytest.fail("\n".join(parts), pytrace=False)


def _which(name: str) -> Optional[str]:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/usr/local/sbin")


def unavailable_reason() -> Optional[str]:
    """Why a cluster cannot be started here (None: it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM tests need Linux"
    if os.geteuid() != 0:
        return "SLURM tests start slurmd / slurmctld and need root (run the tests as root, e.g. in CI)"
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        return (f"SLURM binaries not installed ({', '.join(missing)} missing); "
                "as root: apt-get install slurm-wlm munge (make test does it)")
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class SlurmCluster:
    """One munged, one slurmctld, one slurmd on this machine, configured in ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # A job must not inherit the SLURM variables of a test run that itself runs inside a SLURM job.
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]

    # ------------------------------------------------------------------ lifecycle

    def _write_config(self, cpus: int) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a one-node test cluster.
ClusterName=effnetv2test
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
JobRequeue=1
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        # Own session: a Ctrl-C of pytest does not reach the daemons half-way; stop() ends them by pid.
        self.procs[name] = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, stdin=subprocess.DEVNULL)
        log.close()

    def _start_controller(self, timeout: float) -> None:
        """munged and slurmctld, once the config is written."""
        r = self.root
        # munged insists that everyone can reach its socket's folder.
        r.chmod(0o755)
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={r}/munge.key",
                               f"--socket={r}/munge.socket", f"--pid-file={r}/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munged.seed"])
        self._wait(lambda: (r / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False, timeout=10).returncode == 0, timeout,
                   "slurmctld does not answer scontrol ping")

    def start(self, cpus: int = 2, timeout: float = 60) -> "SlurmCluster":
        self._write_config(cpus)
        self._start_controller(timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(lambda: self.node_state() in ("idle", "mixed", "allocated"), timeout,
                   "the node did not become idle")
        REGISTRY.write_text(json.dumps({"root": str(self.root), "owner": os.getpid(),
                                        "pids": {n: p.pid for n, p in self.procs.items()}}))
        return self

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while starting the test cluster\n" + self.logs())
            try:
                if cond():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.3)
        raise ClusterError(f"test SLURM cluster: {what} within {timeout:.0f} s\n" + self.logs())

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def stop(self) -> None:
        self._stop_daemons()
        try:
            if json.loads(REGISTRY.read_text()).get("root") == str(self.root):
                REGISTRY.unlink()
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_daemons(self) -> None:
        # Reverse start order; by pid only (never by name: other clusters may run on this machine).
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.procs.clear()

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name} (last lines)\n{_tail(f)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ commands

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             env={**self.env, **(env or {})})
        if check and res.returncode != 0:
            raise ClusterError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], check=False, timeout=10).stdout.strip()
        return out.rstrip("*~#!%$@^-").lower()

    def sbatch(self, script: Path, *args: str, script_args: Sequence[str] = (), env: Optional[dict] = None,
               cwd: Optional[Path] = None) -> str:
        """Submit ``script`` with sbatch options ``args`` and its own arguments ``script_args``; the job id."""
        res = subprocess.run(["sbatch", "--parsable", *args, str(script), *script_args], capture_output=True, text=True,
                             timeout=30, env={**self.env, **(env or {})}, cwd=cwd)
        if res.returncode != 0:
            raise ClusterError(f"sbatch {script} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def job_info(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, Reason, ExitCode ...); {} if unknown."""
        res = self.run(["scontrol", "show", "job", "-o", job], check=False, timeout=15)
        info = {}
        for item in res.stdout.split():
            k, _, v = item.partition("=")
            info.setdefault(k, v)
        return info

    def job_state(self, job: str) -> str:
        return self.job_info(job).get("JobState", "UNKNOWN")

    def wait_for(self, job: str, states: Iterable[str], timeout: float, *, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (fails early when it finishes in another)."""
        want = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job)
            state = info.get("JobState", "UNKNOWN")
            if state in want:
                return info
            if state in FINISHED:  # finished, but not as wanted: no point waiting on
                break
            time.sleep(poll)
        raise ClusterError(f"job {job} is {info.get('JobState', 'UNKNOWN')} (reason {info.get('Reason')}, "
                           f"exit {info.get('ExitCode')}), expected {sorted(want)} within {timeout:.0f} s\n"
                           + self.logs())

    def wait_until(self, cond, job: str, timeout: float, what: str, *, poll: float = 0.3) -> None:
        """Wait until ``cond()`` holds while the job runs; ClusterError when it finishes first or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            state = self.job_state(job)
            if state in FINISHED:
                raise ClusterError(f"job {job} ended ({state}) before {what}\n" + self.logs())
            time.sleep(poll)
        raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what} (job {job}: {self.job_state(job)})\n"
                           + self.logs())

    def release_now(self, job: str) -> None:
        """Let a requeued job start now: SLURM holds requeued jobs back (BeginTime = now + ~2 min).

        slurmd revoked the old run's job credential when it killed it, and it refuses a new credential created
        in the same whole second as that revocation ("Job credential revoked": the restart fails at once). So
        the release waits out that second first, as SLURM's own hold would.
        """
        time.sleep(2.0)
        self.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=15)


def _end_leftovers() -> None:
    """End the daemons of an earlier test session that died before it could stop them (recorded pids whose
    command line still names that session's folder, and whose owning process is gone)."""
    try:
        old = json.loads(REGISTRY.read_text())
    except (OSError, ValueError):
        return
    owner = old.get("owner")
    if isinstance(owner, int) and _pid_alive(owner) and "python" in _cmdline(owner):
        return  # another test session is alive and uses its cluster: leave it alone
    root = old.get("root", "")
    for pid in old.get("pids", {}).values():
        if root and root in _cmdline(pid) and _pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    if root.startswith(tempfile.gettempdir()):
        time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)
    REGISTRY.unlink(missing_ok=True)


_CLUSTER: Optional[SlurmCluster] = None


def get_cluster(cpus: int = 2, timeout: float = 60) -> SlurmCluster:
    """The session's cluster: started on first use, reused afterwards, stopped at interpreter exit.

    Raises ClusterError (with the daemons' log tails) when it cannot start; call unavailable_reason() first.
    """
    global _CLUSTER
    if _CLUSTER is not None and _CLUSTER.alive():
        return _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None
    _end_leftovers()
    # Short path: the munge socket path must fit in a unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir=tempfile.gettempdir()))
    cluster = started(SlurmCluster(root), cpus, timeout)
    _CLUSTER = cluster
    atexit.register(stop_cluster)
    return cluster


def started(cluster: SlurmCluster, cpus: int, timeout: float) -> SlurmCluster:
    """``cluster`` started; or stopped again (nothing left running) and a ClusterError with the daemons' logs."""
    try:
        cluster.start(cpus=cpus, timeout=timeout)
    except ClusterError:
        cluster.stop()
        raise
    except BaseException as e:
        logs = cluster.logs()
        cluster.stop()
        raise ClusterError(f"could not start the test SLURM cluster in {cluster.root}: {e}\n{logs}") from e
    return cluster


def stop_cluster() -> None:
    global _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None


# --------------------------------------------------------------------------------------------------------------
# The job side: what the test jobs run instead of pipeline.pretrain (ENTRY=slurm_cluster, tests/ on PYTHONPATH),
# with the same command line (--config FILE key=value ...) that slurm/_launch.sh builds.


class _Probe:
    """The loop's registered checkpoint part: which rank saved it at which step."""

    def __init__(self, rank: int):
        self.state = {"rank": rank, "step": 0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def job_main(argv: Optional[Sequence[str]] = None) -> int:
    """``allreduce`` mode: init the process group from the launcher's variables and all-reduce the ranks.
    ``loop`` mode: a stand-in training loop with the real CheckpointManager and PreemptionHandler: resumes,
    runs ``total`` steps, saves every ``checkpoint.every_steps``, stops + saves + requeues on a signal."""
    import argparse
    import sys

    import torch

    from pipeline import distributed
    from pipeline.checkpoint import CheckpointManager
    from pipeline.config import frozen_settings, load_config
    from pipeline.preemption import PreemptionHandler

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    mode = os.environ.get("PROBE_MODE", "allreduce")
    out = Path(os.environ["PROBE_OUT"])
    cfg = load_config(args.config, args.overrides)
    # Signals first: a warning that arrives while torch.distributed starts up must not kill the process.
    handler = PreemptionHandler.from_config(cfg.checkpoint, rank=distributed.get_rank())
    env = distributed.init_distributed(backend="gloo", timeout_s=60)
    rank, world = env.rank, env.world_size
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")

    def say(msg: str) -> None:
        with open(out / f"rank{rank}.log", "a") as f:
            f.write(msg + "\n")

    if mode == "allreduce":
        total = distributed.all_reduce_sum(torch.tensor([float(rank + 1)]))
        say(f"rank={rank} world={world} local_rank={env.local_rank} launcher={env.launcher} "
            f"env_rank={os.environ.get('RANK')} sum={total.item():g}")
        distributed.destroy()
        return 0

    steps = int(os.environ.get("PROBE_STEPS", "40"))
    sleep = float(os.environ.get("PROBE_SLEEP", "0.2"))
    mgr = CheckpointManager(cfg.checkpoint, cfg.train.run_dir, rank=rank, world_size=world,
                            settings=frozen_settings(cfg))
    probe = _Probe(rank)
    mgr.register("probe", probe)
    point = mgr.resolve_resume()
    start = 0
    if point is not None:
        mgr.restore(point)
        start = point.step
        assert probe.state == {"rank": rank, "step": start}
    say(f"start restart={restart} from={start} world={world}")

    def save_fn(directory: Path, tag: str) -> None:  # what engine.save does: every rank writes into dir/tag
        (directory / tag).mkdir(parents=True, exist_ok=True)
        (directory / tag / f"model_rank{rank}.txt").write_text(tag)

    for step in range(start + 1, steps + 1):
        time.sleep(sleep)
        say(f"step {step}")
        probe.state = {"rank": rank, "step": step}
        if handler.should_stop():
            mgr.save(step, save_fn)
            requeued = handler.requeue()
            say(f"preempted at {step} signal={handler.received.name if handler.received else None} "
                f"requeued={requeued}")
            sys.stdout.flush()
            return 0
        if mgr.should_save(step, final=step == steps):
            mgr.save(step, save_fn)
    say(f"done {steps}")
    handler.close()
    distributed.destroy()
    return 0


if __name__ == "__main__":
    from pipeline.distributed import exit_process

    exit_process(job_main())  # as the real entry points end
