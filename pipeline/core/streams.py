"""Ordered streams that overlap I/O and GIL-releasing work with their consumer (pure)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_ahead(
    function: Callable[[Item], Result], items: Iterable[Item], workers: int, depth: int
) -> Iterator[Result]:
    """``map(function, items)`` in order, on ``workers`` threads, at most ``depth`` ahead.

    For work that releases the GIL (numpy, OpenCV). Memory is bounded by ``depth``
    items in flight; an exception is raised at its item's place in the order.
    """
    if workers < 1 or depth < 1:
        raise ValueError(f"workers and depth must be >= 1; got {workers} and {depth}")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="map_ahead") as pool:
        pending: deque[Future[Result]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def read_ahead(items: Iterable[Item], depth: int) -> Iterator[Item]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    Disk reads release the GIL, so reading overlaps the consumer's work. An exception
    in the producer is raised in the consumer; closing the generator stops the thread.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    buffer: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put((True, exc))
        else:
            put((True, None))

    thread = threading.Thread(target=produce, name="read_ahead", daemon=True)
    thread.start()
    try:
        while True:
            finished, value = buffer.get()
            if finished:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        thread.join()
