"""One writer per fold (and per run-level stage): a lock file naming its holder.

A second ``train --fold K``, a second ``--all``, or a fold job on another machine that
shares the runs directory must not train a fold that is being trained: both would write
the same checkpoint, weights and OOF store. The holder writes ``<dir>/.lock`` (host,
pid, when taken, when last refreshed) and refreshes it every ``REFRESH_S`` while it
works. Another process is refused with the holder named, unless the lock is stale:
on the same host when the holder's pid is gone, on another host when it has not been
refreshed for ``STALE_S``. Pure Python; no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text
from pipeline.core.layout import LOCK as LOCK_FILE

log = logging.getLogger(__name__)

REFRESH_S = 30.0
STALE_S = 180.0


class LockHeld(FileExistsError):
    """Another live process holds the lock; the message names it."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when there is no (readable) lock."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def is_stale(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether a lock's holder is gone (same host: its pid; else: no refresh lately)."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = holder.get("pid")
        return not isinstance(pid, int) or not pid_alive(pid)
    refreshed = holder.get("refreshed")
    return not isinstance(refreshed, (int, float)) or now - refreshed > STALE_S


def describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    since = time.strftime("%H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {since})"


def _write(path: Path, holder: dict[str, Any]) -> None:
    write_text(path, json.dumps(holder))


def acquire(directory: Path, what: str) -> dict[str, Any]:
    """Take ``directory``'s lock for ``what`` (e.g. "fold 0"); LockHeld if a live
    process has it. Returns the holder record written."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    now = time.time()
    mine = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "refreshed": now,
        "what": what,
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder is not None and not is_stale(holder):
                if holder.get("pid") == os.getpid() and holder.get("host") == mine["host"]:
                    raise LockHeld(f"{what} is already locked by this process ({path})") from None
                raise LockHeld(
                    f"{what} is being written by {describe(holder)} ({path}); wait for it "
                    f"to finish or stop it. A lock left by a crashed process on another "
                    f"host is taken over after {STALE_S:.0f} s without refresh"
                ) from None
            if holder is not None:
                log.warning("taking over the stale lock of %s: %s", what, describe(holder))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(mine))
        return mine
    raise LockHeld(f"could not take the lock of {what} ({path}): another process races for it")


def release(directory: Path) -> None:
    """Remove the lock if this process holds it."""
    path = directory / LOCK_FILE
    holder = read_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def hold_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the block, refreshing it from a daemon thread.

    A directory made for the lock is removed again if the block left it empty (a
    rejected command leaves nothing behind).
    """
    created = not directory.exists()
    holder = acquire(directory, what)
    path = directory / LOCK_FILE
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(REFRESH_S):
            current = read_holder(path)
            if not current or current.get("pid") != holder["pid"]:
                return  # taken over (we were thought dead): leave it alone
            holder["refreshed"] = time.time()
            try:
                _write(path, holder)
            except OSError as exc:
                log.warning("could not refresh %s: %s", path, exc)

    thread = threading.Thread(target=refresh, name=f"lock {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        release(directory)
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
