"""The plain classes behind the model and preprocessing deployments (no Ray decorators here).

`ModelServer` owns one engine (built by the factory it is given: the real `Engine` in
production, a fake in tests), starts it, streams its deltas, records the engine metrics
(latencies, tokens, finish reasons, cache hits, queue/batch/KV gauges), aborts a request
when its consumer goes away, and shuts the engine down gracefully.

`PreprocessServer` owns one `Preprocessor` and runs `prepare` (and `/tokenize`,
`/detokenize`) in a worker thread (it is CPU-bound) while timing it.

Client errors cross the Ray handles as *values*, not exceptions: `PreprocessServer` returns a
`CogVLMError` instead of raising it, and `ModelServer.generate` yields one (for a failed
preprocessing argument, an engine refusal or a dead engine). Raising inside a replica makes Ray
Serve log a ~40-line "Request failed." traceback per bad request; as values, the ingress
re-raises them (`serve/backend.py`) and logs one line (`serve/ingress.py`).

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

from cogvlm_ray.api.tokenize import TokenizeJob, TokenizeResult
from cogvlm_ray.contracts import PreparedPrompt, RequestOutput, SamplingParams
from cogvlm_ray.engine.stats import EngineStats
from cogvlm_ray.errors import CogVLMError
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
    max_model_len: int

    def prepare(
        self, conversation: Conversation, *, max_tokens: int, template_version: str | None
    ) -> PreparedPrompt: ...
    def tokenize(self, conversation: Conversation, *, template_version: str | None) -> PreparedPrompt: ...
    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...


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
        model_name: str = "cogvlm2",
    ):
        self.engine = engine_factory()
        self.labels = {m.MODEL_NAME_LABEL: model_name}
        """The `model_name` label of every engine metric (vLLM's dashboards filter on it)."""
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
        self, prepared: PreparedPrompt | CogVLMError, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput | CogVLMError]:
        """Stream the request's deltas. A refusal (a failed preprocessing argument, an engine
        validation error, 400/429/503) is yielded as the only item; a dead engine mid-stream as
        the last. If the consumer stops early (client disconnect, Serve cancellation, `aclose`),
        the request is aborted in the engine."""
        if isinstance(prepared, CogVLMError):
            yield prepared
            return
        await self.start()
        try:
            stream = self.engine.add_request(prepared, sampling_params, request_id)
        except CogVLMError as e:
            yield e
            return
        times = _RequestTimes()
        finished = False

        async def recorded() -> AsyncIterator[RequestOutput]:
            async for output in stream:
                self._record(output, times)  # per engine step, before coalescing
                yield output

        try:
            async for output in coalesce(recorded(), self.stream_interval_s):
                yield output
            finished = True
        except CogVLMError as e:
            finished = True
            yield e
        finally:
            if not finished:
                logger.debug("request %s cancelled by its consumer; aborting it in the engine", request_id)
                self.engine.abort(request_id)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def _record(self, output: RequestOutput, times: _RequestTimes) -> None:
        metrics, labels = self.metrics, self.labels
        if not times.counted_prompt and output.first_token_time is not None:
            times.counted_prompt = True
            if output.index == 0:  # the choices of one request share its prompt (prefilled once)
                metrics.inc(m.PROMPT_TOKENS, output.num_prompt_tokens, **labels)
                metrics.inc(m.PREFIX_CACHE_QUERIES, output.num_prompt_tokens, **labels)
                metrics.inc(m.PREFIX_CACHE_HITS, output.num_cached_tokens, **labels)
            metrics.observe(m.TIME_TO_FIRST_TOKEN, output.first_token_time - output.arrival_time, **labels)
            if output.first_scheduled_time is not None:
                metrics.observe(
                    m.REQUEST_QUEUE_TIME, output.first_scheduled_time - output.arrival_time, **labels
                )
        if not times.counted_cache and output.image_cache_hit is not None:
            times.counted_cache = True
            metrics.inc(m.IMAGE_CACHE_QUERIES, **labels)
            if output.image_cache_hit:
                metrics.inc(m.IMAGE_CACHE_HITS, **labels)
        if output.new_token_ids:
            metrics.inc(m.GENERATION_TOKENS, len(output.new_token_ids), **labels)
            if times.last_emit is not None:
                metrics.observe(m.INTER_TOKEN_LATENCY, output.emit_time - times.last_emit, **labels)
            times.last_emit = output.emit_time
        if output.finish_reason is not None:
            metrics.inc(m.REQUEST_SUCCESS, finished_reason=output.finish_reason, **labels)
            metrics.observe(m.E2E_REQUEST_LATENCY, output.emit_time - output.arrival_time, **labels)

    def refresh_gauges(self) -> EngineStats:
        stats = self.engine.get_stats()
        self.metrics.set(m.NUM_REQUESTS_RUNNING, stats.num_running, **self.labels)
        self.metrics.set(m.NUM_REQUESTS_WAITING, stats.num_waiting, **self.labels)
        self.metrics.set(m.KV_CACHE_USAGE, stats.kv_cache_usage, **self.labels)
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
        self.metrics.set(m.NUM_REQUESTS_RUNNING, 0, **self.labels)
        self.metrics.set(m.NUM_REQUESTS_WAITING, 0, **self.labels)


class PreprocessServer:
    """One Preprocessor per preprocessing replica; its calls run in a thread and are timed.
    Client errors are returned, not raised (see the module docstring)."""

    def __init__(self, preprocessor: PreprocessorLike, *, metrics: Metrics | None = None):
        self.preprocessor = preprocessor
        self.metrics = metrics or Metrics()

    async def prepare(
        self, conversation: Conversation, max_tokens: int, template_version: str | None
    ) -> PreparedPrompt | CogVLMError:
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(
                self.preprocessor.prepare,
                conversation,
                max_tokens=max_tokens,
                template_version=template_version,
            )
        except CogVLMError as e:
            return e
        finally:
            self.metrics.observe(m.PREPROCESS_SECONDS, time.perf_counter() - start)

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult | CogVLMError:
        try:
            if job.conversation is not None:
                prepared = await asyncio.to_thread(
                    self.preprocessor.tokenize, job.conversation, template_version=job.template_version
                )
                ids = [int(t) for t in prepared.input_ids]
            else:
                ids = await asyncio.to_thread(
                    self.preprocessor.encode_text, job.prompt or "", add_special_tokens=job.add_special_tokens
                )
        except CogVLMError as e:
            return e
        return TokenizeResult(ids, self.preprocessor.max_model_len)

    async def detokenize(self, token_ids: list[int]) -> str | CogVLMError:
        try:
            return await asyncio.to_thread(self.preprocessor.decode, token_ids)
        except CogVLMError as e:
            return e
