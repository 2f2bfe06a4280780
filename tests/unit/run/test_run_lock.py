"""One writer per fold: the lock names its holder, a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.run import run_lock
from pipeline.run.run_lock import LOCK_FILE, LockHeld, acquire, hold_lock, is_stale, release
from tests.conftest import REPO


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    fold = tmp_path / "fold_0"
    with hold_lock(fold, "segmentation fold 0"):
        holder = json.loads((fold / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockHeld, match="already locked by this process"):
            acquire(fold, "segmentation fold 0")
        # Another live process on this host holds it: the parent of this test, say.
        holder["pid"] = os.getppid()
        (fold / LOCK_FILE).write_text(json.dumps(holder))
        with pytest.raises(LockHeld, match=rf"being written by pid {os.getppid()} on host"):
            acquire(fold, "segmentation fold 0")
        holder["pid"] = os.getpid()
        (fold / LOCK_FILE).write_text(json.dumps(holder))
    assert not (fold / LOCK_FILE).exists()
    assert not fold.exists()  # made for the lock and left empty: removed


def test_a_dead_or_silent_holder_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    here = {"host": socket.gethostname(), "pid": dead.pid, "started": now, "refreshed": now}
    assert is_stale(here)
    elsewhere = {"host": "other-node", "pid": 1, "started": now, "refreshed": now}
    assert not is_stale(elsewhere, now + 10)
    assert is_stale(elsewhere, now + run_lock.STALE_S + 1)
    (tmp_path / LOCK_FILE).write_text(json.dumps(here))
    mine = acquire(tmp_path, "fold 1")
    assert mine["pid"] == os.getpid() and "taking over the stale lock" in caplog.text
    release(tmp_path)
    (tmp_path / LOCK_FILE).write_text("not json")  # a torn file is no holder
    acquire(tmp_path, "fold 1")
    release(tmp_path)


def test_the_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "REFRESH_S", 0.05)
    with hold_lock(tmp_path, "fold 2"):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["refreshed"]
        deadline = time.time() + 30
        while json.loads((tmp_path / LOCK_FILE).read_text())["refreshed"] == first:
            assert time.time() < deadline, "the lock was never refreshed"
            time.sleep(0.05)


PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = '''
    import sys, time
    from pipeline.run.process import guard_job_process
    guard_job_process()
    print("armed", flush=True)
    time.sleep(120)
    '''
    env = {**os.environ, "FOLDSEG_JOB": str(os.getpid())}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "armed"  # the guard is set: now we may die
    print(proc.pid, flush=True)
    time.sleep(120)
    """
)


def test_a_fold_job_dies_with_its_parent_even_on_sigkill():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())  # printed once the child's guard is armed
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while _alive(child):
        assert time.time() < deadline, f"fold job {child} outlived its killed parent"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
