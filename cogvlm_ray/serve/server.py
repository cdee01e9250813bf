"""The plain classes behind the model and preprocessing deployments (no Ray decorators here).

`ModelServer` owns one engine (built by the factory it is given: the real `Engine` in
production, a fake in tests), starts it, streams its deltas, records the engine metrics
(latencies, tokens, finish reasons, cache hits, queue/batch/KV gauges), aborts a request
when its consumer goes away, and shuts the engine down gracefully.

`PreprocessServer` owns one `Preprocessor` and runs `prepare` in a worker thread (it is
CPU-bound) while timing it.

`serve/app.py` wraps both in `serve.deployment`s; tests use them directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from cogvlm_ray.contracts import PreparedPrompt, RequestOutput, SamplingParams
from cogvlm_ray.engine.stats import EngineStats
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve import metrics as m
from cogvlm_ray.serve.metrics import Metrics
from cogvlm_ray.serve.streaming import coalesce

logger = logging.getLogger(__name__)


class EngineLike(Protocol):
    """The engine contract ModelServer relies on (`cogvlm_ray.engine.Engine` implements it)."""

    async def start(self) -> None: ...
    def add_request(
        self, prepared: PreparedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def get_stats(self) -> EngineStats: ...
    def check_health(self) -> None: ...
    async def shutdown(self, timeout_s: float = 30.0) -> None: ...


class PreprocessorLike(Protocol):
    def prepare(
        self, conversation: Conversation, *, max_tokens: int, template_version: str | None
    ) -> PreparedPrompt: ...


@dataclass
class _RequestTimes:
    """Per-request bookkeeping for the latency histograms."""

    last_emit: float | None = None
    counted_prompt: bool = False
    counted_cache: bool = False


class ModelServer:
    """One engine per model replica; `generate` is what the ingress streams from."""

    def __init__(
        self,
        engine_factory: Callable[[], EngineLike],
        *,
        metrics: Metrics | None = None,
        stats_interval_s: float = 1.0,
        shutdown_timeout_s: float = 30.0,
        stream_interval_s: float = 0.0,
    ):
        self.engine = engine_factory()
        self.stream_interval_s = stream_interval_s
        self.metrics = metrics or Metrics()
        self.stats_interval_s = stats_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self._stats_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the engine loop and the gauge refresher (idempotent; must run on the event loop)."""
        await self.engine.start()
        if self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh_gauges_forever())

    async def generate(
        self, prepared: PreparedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas. Engine validation errors (400/429/503) are raised before
        the first delta. If the consumer stops early (client disconnect, Serve cancellation,
        `aclose`), the request is aborted in the engine."""
        await self.start()
        stream = self.engine.add_request(prepared, sampling_params, request_id)
        times = _RequestTimes()
        finished = False

        async def recorded() -> AsyncIterator[RequestOutput]:
            async for output in stream:
                self._record(output, times)  # per engine step, before coalescing
                yield output

        try:
            async for output in coalesce(recorded(), self.stream_interval_s):
                finished = output.finished
                yield output
        finally:
            if not finished:
                logger.info("request %s cancelled by its consumer; aborting it in the engine", request_id)
                self.engine.abort(request_id)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _record(self, output: RequestOutput, times: _RequestTimes) -> None:
        metrics = self.metrics
        if not times.counted_prompt and output.first_token_time is not None:
            times.counted_prompt = True
            metrics.inc(m.PROMPT_TOKENS, output.num_prompt_tokens)
            metrics.observe(m.TIME_TO_FIRST_TOKEN, output.first_token_time - output.arrival_time)
            if output.first_scheduled_time is not None:
                metrics.observe(m.REQUEST_QUEUE_TIME, output.first_scheduled_time - output.arrival_time)
        if not times.counted_cache and output.image_cache_hit is not None:
            times.counted_cache = True
            metrics.inc(m.IMAGE_CACHE_QUERIES)
            if output.image_cache_hit:
                metrics.inc(m.IMAGE_CACHE_HITS)
        if output.new_token_ids:
            metrics.inc(m.GENERATION_TOKENS, len(output.new_token_ids))
            if times.last_emit is not None:
                metrics.observe(m.INTER_TOKEN_LATENCY, output.emit_time - times.last_emit)
            times.last_emit = output.emit_time
        if output.finish_reason is not None:
            metrics.inc(m.REQUEST_SUCCESS, finished_reason=output.finish_reason)
            metrics.observe(m.E2E_REQUEST_LATENCY, output.emit_time - output.arrival_time)

    def refresh_gauges(self) -> EngineStats:
        stats = self.engine.get_stats()
        self.metrics.set(m.NUM_REQUESTS_RUNNING, stats.num_running)
        self.metrics.set(m.NUM_REQUESTS_WAITING, stats.num_waiting)
        self.metrics.set(m.KV_CACHE_USAGE, stats.kv_cache_usage)
        return stats

    async def _refresh_gauges_forever(self) -> None:
        while True:
            try:
                self.refresh_gauges()
            except Exception:
                logger.exception("could not refresh engine gauges")
            await asyncio.sleep(self.stats_interval_s)

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def check_health(self) -> None:
        """Raises EngineDeadError when the engine loop died (Serve then replaces the replica)."""
        self.engine.check_health()

    async def shutdown(self) -> None:
        """Finish in-flight requests for up to `shutdown_timeout_s`, abort the rest, stop."""
        logger.info(
            "model server shutting down (up to %.0f s for in-flight requests)", self.shutdown_timeout_s
        )
        await self.engine.shutdown(self.shutdown_timeout_s)
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        self.metrics.set(m.NUM_REQUESTS_RUNNING, 0)
        self.metrics.set(m.NUM_REQUESTS_WAITING, 0)


class PreprocessServer:
    """One Preprocessor per preprocessing replica; `prepare` runs in a thread and is timed."""

    def __init__(self, preprocessor: PreprocessorLike, *, metrics: Metrics | None = None):
        self.preprocessor = preprocessor
        self.metrics = metrics or Metrics()

    async def prepare(
        self, conversation: Conversation, max_tokens: int, template_version: str | None
    ) -> PreparedPrompt:
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(
                self.preprocessor.prepare,
                conversation,
                max_tokens=max_tokens,
                template_version=template_version,
            )
        finally:
            self.metrics.observe(m.PREPROCESS_SECONDS, time.perf_counter() - start)
