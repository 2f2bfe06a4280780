"""Wall and CPU seconds per named stage of a command (``StageClock``). Pure."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageClock:
    """Wall and process CPU seconds per named stage, summed over repeated entries.

    CPU time (all threads of the process) tells overhead apart from waiting for the
    cores on a shared machine, where wall times swing with other processes' load.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block and add it to ``seconds[name]`` and ``cpu_seconds[name]``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - wall
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
