"""Launcher environment parsing (torchrun / deepspeed, SLURM, single process) and the collective helpers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline import distributed as D


def test_single_process_defaults():
    env = D.detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")
    assert not env.is_distributed


def test_torchrun_variables():
    env = D.detect_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                        "MASTER_ADDR": "node7", "MASTER_PORT": "29411"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.launcher, env.node_rank) == ("node7", 29411, "torchrun", 1)


def test_deepspeed_launcher_variables():
    env = D.detect_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_SIZE": "2",
                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (env.rank, env.local_rank, env.local_world_size, env.node_rank) == (2, 0, 2, 1)


def test_torchrun_wins_over_slurm():
    # `srun torchrun ...`: SLURM describes the node task, torchrun the GPU process
    env = D.detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                        "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher) == (3, 4, "torchrun")


def test_slurm_variables_and_rendezvous(monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda name: None)  # no scontrol: our own node-list parser
    env = D.detect_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
                        "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
                        "SLURM_JOB_NODELIST": "gpu[007-008,010]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert env.master_addr == "gpu007" and env.master_port == 15000 + 123456 % 20000
    assert env.launcher == "slurm" and env.node_rank == 1


def test_slurm_uses_scontrol_when_present(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="hostA\nhostB\n", stderr="")

    monkeypatch.setattr(D.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(D.subprocess, "run", fake_run)
    env = D.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "host[A-B]"})
    assert env.master_addr == "hostA" and calls == [["scontrol", "show", "hostnames", "host[A-B]"]]


def test_expand_nodelist():
    assert D.expand_nodelist("a[01-03],b7,c[9,11]") == ["a01", "a02", "a03", "b7", "c9", "c11"]
    assert D.expand_nodelist("single") == ["single"]


def test_bad_values_are_clear_errors():
    with pytest.raises(D.DistributedError, match="RANK='x' is not an integer"):
        D.detect_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(D.DistributedError, match="rank 4 is outside world size 4"):
        D.detect_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_helpers_without_a_process_group():
    assert D.all_reduce_sum(3) == 3.0 and D.all_reduce_max(2.5) == 2.5
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.all_reduce_any(True) and not D.all_reduce_any(False)
    D.barrier()


def _two_ranks(script, subprocess_env) -> list[tuple[int, str, str]]:
    """Run ``script`` as ranks 0 and 1 of a torchrun-style job on this machine: (exit code, stdout, stderr)."""
    port = str(D.free_port())
    procs = []
    for rank in range(2):
        env = dict(subprocess_env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append((p.returncode, out, err))
    return results


def test_two_process_gloo_group(tmp_path, subprocess_env):
    """init_distributed from torchrun-style variables, then the reductions, in two real processes."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from pipeline import distributed as D
        env = D.init_distributed("gloo", timeout_s=60)
        r = env.rank
        assert D.all_reduce_sum(r + 1) == 3.0
        assert D.all_reduce_max(r) == 1.0 and D.all_reduce_min(r) == 0.0
        assert D.all_reduce_mean(torch.tensor([2.0 * r])).item() == 1.0
        assert D.all_reduce_any(r == 1)
        assert D.all_gather_object(r * 10) == [0, 10]
        assert D.is_main() == (r == 0)
        D.barrier()
        D.destroy()
        print("ok", r)
    """))
    for rank, (code, out, err) in enumerate(_two_ranks(script, subprocess_env)):
        assert code == 0, out + err
        assert f"ok {rank}" in out


def test_rank0_decides_and_every_rank_raises_its_error(tmp_path, subprocess_env):
    """on_rank0: only rank 0 runs the function; every rank gets its result, or raises rank 0's exception with
    its own type and message (a FileNotFoundError stays one; an exception that does not pickle arrives as a
    RuntimeError naming it); the control group is a gloo group of its own."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from pipeline import distributed as D

        class Odd(Exception):
            def __init__(self, a, b):  # pickles, but cannot be rebuilt from its args
                super().__init__(f"{a}-{b}")

        env = D.init_distributed("gloo", timeout_s=60)
        r = env.rank
        group = D.control_group()
        assert group is not None and group is not dist.group.WORLD and dist.get_backend(group) == "gloo"
        assert D.control_group() is group
        ran = []
        assert D.on_rank0(lambda: ran.append(r) or "decided") == "decided"
        assert ran == ([0] if r == 0 else [])

        def fail():
            raise FileNotFoundError("checkpoint folder /x does not exist")

        for fn, want in ((fail, FileNotFoundError), (lambda: (_ for _ in ()).throw(Odd(1, 2)), (Odd, RuntimeError))):
            try:
                D.on_rank0(fn)
            except Exception as e:
                assert isinstance(e, want[r] if isinstance(want, tuple) else want), (r, type(e))
                print(r, type(e).__name__, str(e), flush=True)
            else:
                raise AssertionError("no error")
        D.destroy()
        print("ok", r)
    """))
    results = _two_ranks(script, subprocess_env)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, out + err
        assert f"{rank} FileNotFoundError checkpoint folder /x does not exist" in out and f"ok {rank}" in out
    assert "1 RuntimeError rank 0 failed: Odd: 1-2" in results[1][1]


def test_groups_destroyed_at_exit_without_explicit_destroy(tmp_path, subprocess_env):
    """A run that ends without calling destroy() still tears its groups down before the interpreter finalises.

    Gloo's worker threads running into the interpreter's finalisation can abort a finished run (SIGABRT). The
    check is an atexit hook registered before the group exists, so it runs after ours (atexit is LIFO).
    """
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import atexit, os, sys
        import torch.distributed as dist
        from pipeline import distributed as D

        def check():
            print("alive at exit:", dist.is_initialized(), flush=True)

        atexit.register(check)
        env = D.init_distributed("gloo", timeout_s=60)
        assert D.all_reduce_sum(env.rank + 1) == 3.0
        print("reduced", env.rank, flush=True)
    """))
    for rank, (code, out, err) in enumerate(_two_ranks(script, subprocess_env)):
        assert code == 0, out + err
        assert f"reduced {rank}" in out and "alive at exit: False" in out, out


def test_one_process_engine_group_destroyed_at_exit(tmp_path, subprocess_env):
    """The in-memory one-rank group DeepSpeed needs is torn down at exit too."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import atexit
        import torch.distributed as dist
        from pipeline.distributed import init_distributed

        atexit.register(lambda: print("alive at exit:", dist.is_initialized(), flush=True))
        env = init_distributed(timeout_s=60, single_process_group=True)
        print((env.rank, env.world_size, dist.get_world_size()), flush=True)
    """))
    env = {k: v for k, v in subprocess_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(0, 1, 1)" in out.stdout and "alive at exit: False" in out.stdout, out.stdout + out.stderr


def test_exit_process_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path, subprocess_env):
    """The entry points end through exit_process: exit handlers (the group teardown among them) and buffered
    output are not lost by skipping the interpreter's finalisation, and the exit code survives."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import atexit, sys
        import torch.distributed as dist
        from pipeline import distributed as D

        atexit.register(lambda: print("group alive in the last handler:", dist.is_initialized()))
        env = D.init_distributed("gloo", timeout_s=60)
        assert D.all_reduce_sum(1) == 2.0
        sys.stdout.write("buffered, no newline")  # stdout is a pipe here: block-buffered
        D.exit_process(3)
    """))
    for code, out, err in _two_ranks(script, subprocess_env):
        assert code == 3, out + err
        assert out.startswith("buffered, no newline") and "group alive in the last handler: False" in out, out
