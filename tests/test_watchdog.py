"""pipeline.watchdog: a rank that stops making progress prints its threads' stacks, once per stall, and a rank
that keeps beating prints nothing. (End to end: the SIGSTOP fault in tests/faults/test_training_faults.py, where
the waiting rank's report shows it inside the collective.)"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

from pipeline.watchdog import Watchdog, child_pids


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def blocked_in_a_test_function(event: threading.Event, seconds: float) -> None:
    event.wait(seconds)  # blocks without the GIL, as a collective or a loader queue does


def test_a_stall_is_reported_once_with_every_threads_stack(tmp_path):
    out = (tmp_path / "stderr.txt").open("w+")
    dog = Watchdog(0.3, rank=3, file=out, check_s=0.05)
    try:
        dog.beat("step 12")
        blocked_in_a_test_function(threading.Event(), 1.0)  # three intervals: still one report
        assert dog.reports == 1
        dog.beat("step 13")
        assert _wait_for(lambda: dog.reports == 2, 5.0)  # a new stall after progress: a new report
    finally:
        dog.close()
    out.seek(0)
    text = out.read()
    first = text.split("watchdog: ")[1]
    assert first.startswith("rank 3 (host ") and "The stacks of its threads follow." in first
    idle = re.search(r"has made no progress for ([0-9.]+) s since step 12;", first)
    assert idle and float(idle.group(1)) >= 0.3, first[:300]
    assert "blocked_in_a_test_function" in first and "test_watchdog.py" in first  # the main thread's stack
    assert "since step 13" in text.split("watchdog: ")[2]


def test_regular_beats_print_nothing(tmp_path):
    out = (tmp_path / "stderr.txt").open("w+")
    with Watchdog(0.3, rank=0, file=out, check_s=0.05) as dog:
        for i in range(20):
            dog.beat(f"step {i}")
            time.sleep(0.05)
    out.seek(0)
    assert dog.reports == 0 and out.read() == ""


def test_the_report_names_the_loader_workers(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids()  # (with a loader's fork server and resource tracker, if any)
        out = (tmp_path / "stderr.txt").open("w+")
        with Watchdog(0.2, rank=0, file=out, check_s=0.05) as dog:
            assert _wait_for(lambda: dog.reports == 1, 5.0)
        out.seek(0)
        first = out.read().strip().splitlines()[0]
        listed = re.search(r"child processes \(loader workers, their fork server\) ([0-9, ]+) \(py-spy", first)
        assert listed and str(child.pid) in listed.group(1).split(", "), first
    finally:
        child.kill()
        child.wait()
