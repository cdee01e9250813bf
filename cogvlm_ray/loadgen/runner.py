"""Drive many requests: a fixed number in flight, or Poisson arrivals at a request rate.

Fixed concurrency (`request_rate=None`): `concurrency` workers each send their next request
as soon as the previous one finishes (closed loop, like most serving benchmarks).
Poisson (`request_rate=r`): requests start at exponential inter-arrival times of mean 1/r
seconds (open loop, seeded), with at most `concurrency` in flight if given.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import httpx

from cogvlm_ray.loadgen.client import RequestResult, send_request
from cogvlm_ray.loadgen.workload import BenchRequest


@dataclass(frozen=True)
class RunSettings:
    url: str
    """Full chat completions URL, e.g. http://127.0.0.1:8000/v1/chat/completions."""
    concurrency: int | None = 1
    request_rate: float | None = None
    timeout_s: float = 300.0
    api_key: str | None = None
    seed: int = 0


class Progress:
    """A one-line progress report on a text stream (stderr by default), at most once per interval."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval_s: float = 1.0):
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.num_done = 0
        self.statuses: Counter[str] = Counter()
        self._start = time.perf_counter()
        self._last_write = 0.0
        self._is_tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        self.statuses[result.status] += 1
        now = time.perf_counter()
        if now - self._last_write >= self.interval_s or self.num_done == self.total:
            self._last_write = now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        errors = sum(n for status, n in self.statuses.items() if status != "200")
        line = (
            f"[{self.label}] {self.num_done}/{self.total} done, {errors} errors, "
            f"{self.num_done / elapsed:.2f} req/s, {elapsed:.1f}s"
        )
        end = "\n" if (not self._is_tty or self.num_done == self.total) else ""
        self.stream.write(("\r" if self._is_tty else "") + line + end)
        self.stream.flush()


async def run_requests(
    requests: list[BenchRequest], settings: RunSettings, progress: Progress | None = None
) -> tuple[list[RequestResult], float]:
    """Send every request; return the results (in request order) and the wall time in seconds."""
    if settings.concurrency is None and settings.request_rate is None:
        raise ValueError("give a concurrency, a request rate, or both")
    if settings.concurrency is not None and settings.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    if settings.request_rate is not None and settings.request_rate <= 0:
        raise ValueError("request_rate must be > 0")
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else None
    max_in_flight = settings.concurrency or len(requests) or 1
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    timeout = httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 30.0))
    results: list[RequestResult | None] = [None] * len(requests)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(position: int, request: BenchRequest) -> None:
            result = await send_request(client, settings.url, request, headers=headers)
            results[position] = result
            if progress is not None:
                progress.update(result)

        start = time.perf_counter()
        if settings.request_rate is None:
            await _closed_loop(requests, max_in_flight, one)
        else:
            await _open_loop(requests, settings.request_rate, max_in_flight, settings.seed, one)
        duration = time.perf_counter() - start
    assert all(r is not None for r in results), "every request must produce a result"
    return [r for r in results if r is not None], duration


async def _closed_loop(requests: list[BenchRequest], concurrency: int, one) -> None:
    queue: asyncio.Queue[tuple[int, BenchRequest]] = asyncio.Queue()
    for item in enumerate(requests):
        queue.put_nowait(item)

    async def worker() -> None:
        while True:
            try:
                position, request = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(position, request)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))


async def _open_loop(requests: list[BenchRequest], rate: float, max_in_flight: int, seed: int, one) -> None:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_in_flight)
    tasks = []

    async def limited(position: int, request: BenchRequest) -> None:
        async with limit:
            await one(position, request)

    for position, request in enumerate(requests):
        if position:
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(limited(position, request)))
    await asyncio.gather(*tasks)
