"""Fault-injecting engine factories for the actor-death tests (pickled into Ray Data actors)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CrashingEngine:
    """Delegates to a real engine, but kills its process when the `crash_at`-th request arrives."""

    def __init__(self, engine: Any, crash_at: int, marker: Path):
        self._engine = engine
        self._crash_at = crash_at
        self._marker = marker
        self._num_requests = 0

    def add_request(self, prepared, sampling_params, request_id):
        self._num_requests += 1
        if self._num_requests >= self._crash_at:
            with open(self._marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)  # as a segfault or an OOM kill would: no cleanup, rows in flight lost
        return self._engine.add_request(prepared, sampling_params, request_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class CrashingFactory:
    """The first `num_crashes` actors built crash mid-batch; later ones (restarts) work."""

    def __init__(self, inner: Callable[[], Any], marker: Path, *, num_crashes: int = 1, crash_at: int = 2):
        self.inner = inner
        self.marker = marker
        self.num_crashes = num_crashes
        self.crash_at = crash_at

    def crashes_so_far(self) -> int:
        return len(self.marker.read_text().splitlines()) if self.marker.exists() else 0

    def __call__(self) -> Any:
        engine = self.inner()
        if self.crashes_so_far() < self.num_crashes:
            return CrashingEngine(engine, self.crash_at, self.marker)
        return engine
