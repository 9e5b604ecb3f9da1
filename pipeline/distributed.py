"""Rank, world size and local rank from torchrun, the deepspeed launcher or SLURM; process-group helpers.

Launchers announce a process's place in different environment variables:

* torchrun and the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``, and ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (deepspeed).
* ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` / ``SLURM_NTASKS``,
  ``SLURM_LOCALID``; the rendezvous host is the first node of the step's node list and the port is derived
  from the job id, so every task of a job computes the same values without talking to the others.

Anything else is a single process (rank 0 of 1). ``init_distributed`` turns the detected environment into
an initialised ``torch.distributed`` process group (``env://``) with a timeout, so a dead rank makes the
others fail instead of hanging; the helpers below work with and without a process group.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NoReturn, Optional, TypeVar

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A launch environment that cannot work; the message names the variable and the fix."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as announced by its launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    launcher: str = "single"
    """'torchrun' (also the deepspeed launcher), 'slurm' or 'single'."""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def node_rank(self) -> int:
        return self.rank // max(1, self.local_world_size)


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; "
                               "check the launcher (torchrun / srun) command line") from None


def _first_int(text: str) -> int:
    """'4(x2),2' (SLURM_STEP_TASKS_PER_NODE style) -> 4."""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else 1


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list ('gpu[01-03,07],login1') into host names, without scontrol.

    Used when ``scontrol`` is not on the PATH (containers); handles one bracket group per name, which is what
    SLURM prints for ordinary clusters.
    """
    hosts: list[str] = []
    # split at commas that are not inside brackets
    parts, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    for part in parts:
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames`` when available, else our own parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise DistributedError(f"SLURM node list {nodelist!r} is empty; set MASTER_ADDR explicitly")
    return hosts[0]


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for a single-node launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: Optional[str]) -> int:
    """A rendezvous port every task of a job agrees on; different jobs sharing a node get different ports."""
    if not job_id or not job_id.isdigit():
        return DEFAULT_PORT
    return 15000 + int(job_id) % 20000


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the launcher's variables (``environ`` defaults to ``os.environ``); never starts a process group.

    torchrun / deepspeed variables win over SLURM ones, so ``srun torchrun ...`` (one task per node, torchrun
    spawning the GPU processes) is read correctly.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
        name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else ("LOCAL_SIZE" if "LOCAL_SIZE" in env else None)
        if name is not None:
            local_world = _int(env, name)
        else:
            local_world = torch.cuda.device_count() if torch.cuda.is_available() else world
            local_world = max(1, min(world, local_world))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        rank = _int(env, "SLURM_PROCID")
        # SLURM_STEP_NUM_TASKS: the tasks of this srun step (SLURM_NTASKS is the whole allocation's)
        world = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or \
            env.get("SLURM_NTASKS_PER_NODE") or str(world)
        local_world = max(1, min(world, _first_int(per_node)))
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if nodelist:
                addr = first_host(nodelist)
            elif world == 1:
                addr = "127.0.0.1"
            else:
                raise DistributedError("SLURM job with several tasks but no SLURM_JOB_NODELIST / SLURM_NODELIST; "
                                       "set MASTER_ADDR to the first node's host name")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID"))
        launcher = "slurm"
    else:
        return DistEnv()
    if not (0 <= rank < world):
        raise DistributedError(f"rank {rank} is outside world size {world}; check the launcher's variables "
                               "(RANK / WORLD_SIZE or SLURM_PROCID / SLURM_NTASKS)")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   master_addr=addr, master_port=port, launcher=launcher)


def launch_rank() -> int:
    """This process's rank as the launcher (torchrun, accelerate, srun) announced it, without a process group;
    0 when the variables make no sense (for "print the error on one rank only" before any group exists)."""
    try:
        return detect_env().rank
    except DistributedError:
        return 0


def init_distributed(backend: Optional[str] = None, timeout_s: int = 1800,
                     environ: Optional[Mapping[str, str]] = None, *, single_process_group: bool = False) -> DistEnv:
    """Detect the environment and, for more than one process, start the default process group (``env://``).

    ``backend`` None picks nccl when CUDA is available, else gloo. On CUDA the process's device is set to its
    local rank first. Calling it again once a group exists returns the environment without re-initialising.
    ``single_process_group``: a single process gets a one-rank group too, on an in-memory store (DeepSpeed needs
    a group; no port is opened, so concurrent single-process runs on one machine cannot collide).
    SLURM-derived MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK are exported into ``os.environ``
    so that libraries reading them (DeepSpeed, accelerate) agree with us.
    """
    env = detect_env(environ)
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                        ("LOCAL_WORLD_SIZE", env.local_world_size), ("MASTER_ADDR", env.master_addr),
                        ("MASTER_PORT", env.master_port)):
        os.environ.setdefault(name, str(value))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % max(1, torch.cuda.device_count()))
    if (env.world_size == 1 and not single_process_group) or is_initialized():
        return env
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; install a regular PyTorch wheel")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = dict(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                  timeout=datetime.timedelta(seconds=timeout_s))
    if env.world_size == 1:
        kwargs.update(init_method=None, store=dist.HashStore())
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(**kwargs)
    register_shutdown()
    return env


_SHUTDOWN_REGISTERED = False


def register_shutdown() -> None:
    """Destroy the process groups at interpreter exit, while Python is still whole (idempotent).

    Groups left to the interpreter's finalisation keep Gloo's C++ worker threads running into it, where
    releasing a finished collective's tensors needs the GIL and can abort the process. Destroying them here
    covers the groups nobody else holds; those a library still references (DeepSpeed's copy of the world
    group) keep their threads, which is why the entry points also end through :func:`exit_process`.
    """
    global _SHUTDOWN_REGISTERED
    if not _SHUTDOWN_REGISTERED:
        atexit.register(destroy)
        _SHUTDOWN_REGISTERED = True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; before ``init_distributed`` read cheaply from the launcher's variables."""
    if is_initialized():
        return dist.get_rank()
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (logs, files that one process writes)."""
    return get_rank() == 0


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if _world(group) > 1:
        dist.barrier(group=group)


def _reduce_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors
    if is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def _all_reduce(value, op, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Reduce a number or tensor across ranks; returns the same kind (float for numbers)."""
    is_tensor = torch.is_tensor(value)
    if _world(group) == 1:
        return value if is_tensor else float(value)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    orig_device = t.device
    t = t.to(_reduce_device(group))
    dist.all_reduce(t, op=op, group=group)
    if is_tensor:
        return t.to(orig_device)
    return float(t.item())


def all_reduce_sum(value, group: Optional[dist.ProcessGroup] = None):
    return _all_reduce(value, dist.ReduceOp.SUM if dist.is_available() else None, group)


def all_reduce_max(value, group: Optional[dist.ProcessGroup] = None):
    return _all_reduce(value, dist.ReduceOp.MAX if dist.is_available() else None, group)


def all_reduce_min(value, group: Optional[dist.ProcessGroup] = None):
    return _all_reduce(value, dist.ReduceOp.MIN if dist.is_available() else None, group)


def all_reduce_mean(value, group: Optional[dist.ProcessGroup] = None):
    total = all_reduce_sum(value, group)
    return total / _world(group)


def all_reduce_any(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank when it is true on any rank (preemption agreement)."""
    return all_reduce_max(1.0 if flag else 0.0, group) > 0.5


def all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """In-place sum of a tensor on its own device across ``group`` (data plane: BN statistics); no-op alone."""
    if _world(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_into_tensor(out: torch.Tensor, local: torch.Tensor,
                           group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Every rank's ``local`` concatenated into ``out`` (data plane: ZeRO-3 EMA shards)."""
    if _world(group) == 1:
        out.copy_(local.reshape(out.shape))
    else:
        dist.all_gather_into_tensor(out, local, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; the object itself without a process group."""
    if _world(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


# ---------------------------------------------------------------------------------------------- control plane

_CONTROL: dict[str, Any] = {}


def control_group() -> Optional[dist.ProcessGroup]:
    """The process group of the control plane: the preemption flag, bad-sample counts, log reductions, "rank 0
    decides" broadcasts and checkpoint barriers. Always gloo, so its collectives take CPU tensors: under NCCL
    the training step then has no host synchronisation beyond the ones it needs (a flag all-reduced on the
    default group would be a CUDA tensor and an ``.item()`` per step). None without a process group or with
    one rank (the collectives are no-ops then).

    Created on the first call, which every rank must make at the same point (``new_group`` is collective);
    the trainer calls it right after the process group starts."""
    if not is_initialized() or dist.get_world_size() == 1:
        return None
    key = f"{id(dist.group.WORLD)}"
    group = _CONTROL.get(key)
    if group is None:
        group = _CONTROL[key] = dist.new_group(backend="gloo")
    return group


def time_out_every_group(timeout_s: int) -> int:
    """Give every process group of this process the collective timeout ``timeout_s``; returns how many.

    ``init_process_group``'s timeout holds for the world group only: torch gives a group made by ``new_group``
    its own default (30 minutes for gloo), and that is where most collectives of a run go (the control group;
    DeepSpeed's gradient reductions run on its clone of the world group). A rank stopped (SIGSTOP, a hung
    node) would hold the others for 30 minutes instead of ``train.collective_timeout_s``. Call it once the
    groups exist (the trainer: after the backend is built); local, no collective."""
    if not is_initialized():
        return 0
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = list(dist.distributed_c10d._world.pg_map)  # no public list of groups; this is torch's own registry
    for group in groups:
        dist.set_timeout(timeout, group)
    return len(groups)


# What gloo and NCCL say when a peer is gone or silent (gloo raises plain RuntimeErrors)
_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
                  "gloo/transport", "NCCL")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering (not a bug of this rank)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_FAILURES)


_ROLL_CALL = "effnetv2/alive/"


def roll_call(wait_s: float, recent_s: float) -> Optional[list[int]]:
    """After a failed collective: the ranks that still answer, asked through the rendezvous store (the TCP store
    on MASTER_ADDR that every rank reached at start-up, separate from the collectives' connections).

    This rank checks in (its key holds the time), then waits up to ``wait_s`` for the others; a rank counts if it
    checked in within the last ``recent_s`` seconds (the others may have failed a little earlier or later).
    Returns the ranks that answered, this one included; None when the store cannot be reached (its host, rank 0's,
    is gone or this host lost its network) or there is no process group.
    """
    if not is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(1.0, wait_s)))
        rank, world, now = dist.get_rank(), dist.get_world_size(), time.time()
        store.set(f"{_ROLL_CALL}{rank}", repr(now))
        deadline = time.monotonic() + wait_s
        answered: list[int] = []
        while True:
            answered = [r for r in range(world) if store.check([f"{_ROLL_CALL}{r}"])
                        and float(store.get(f"{_ROLL_CALL}{r}").decode()) >= now - recent_s]
            if len(answered) == world or time.monotonic() >= deadline:
                return answered
            time.sleep(0.2)
    except Exception:  # the store is gone too (any transport error): the caller says so
        return None


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (it travels to the other ranks), else a RuntimeError with its text."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")


def on_rank0(fn: Callable[[], T], group: Optional[dist.ProcessGroup] = None) -> T:
    """Rank 0 runs ``fn``; every rank returns its result, or raises the exception rank 0 raised (same type,
    same message), so no rank waits forever for a decision that failed and every rank reports the same error.
    ``group`` defaults to the control group; without a process group ``fn`` just runs."""
    group = control_group() if group is None else group
    if _world(group) == 1:
        return fn()
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    result, remote = broadcast_object((result, None if error is None else _portable(error)), group=group)
    if error is not None:
        raise error
    if remote is not None:
        raise remote
    return result


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Destroy every process group of this process (no-op without one); local, no collective."""
    if is_initialized():
        dist.destroy_process_group()


def exit_process(code: Optional[int] = 0) -> NoReturn:
    """End a training process: run its exit handlers and flush, then leave without finalising the interpreter.

    :func:`destroy` does not stop every communication thread: Gloo keeps threads for groups that libraries
    still reference (DeepSpeed holds its own copy of the world group), and they are torn down only while the
    interpreter and the C++ runtime finalise. That teardown races with them and, now and then, aborts a
    process whose run has finished (``terminate called without an active exception``, SIGABRT), which makes
    torchrun or srun fail the whole job. Every ``atexit`` handler (our :func:`destroy`, logging's flush,
    libraries' own) still runs here, with Python whole; only the finalisation is skipped (``os._exit``).
    The entry points (``python -m pipeline.pretrain`` / ``pipeline.finetune``) end this way.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing left to save
                pass
        os._exit(0 if code is None else int(code))
