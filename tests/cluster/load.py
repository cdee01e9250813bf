"""A sustained, bounded streaming load of mixed image and text chat requests over loopback.

`StreamingLoad` runs `max_concurrency` async workers (httpx, SSE) on its own event loop in a
background thread, so the scenario driver keeps its thread for polling Serve and killing
nodes. `set_concurrency(n)` changes how many workers send (phases: burst, trickle, stop).
Every request is bounded (client timeout) and so is the whole load (`max_requests`,
`stop()`); every request's outcome is recorded as a `StreamResult`.

Outcome classes: "ok" (200, `finish_reason`, usage = every token asked for, `[DONE]`); "rejected" (429/503 with
`Retry-After` and an OpenAI error body: the documented back-pressure answers); "stream_error"
(200, then an `{"error": ...}` event and `[DONE]`: the clean end of a stream whose replica
died); "cut" (a 200 stream that ended without `[DONE]`, or short of its tokens: lost work);
"bad_status" (any other status, e.g. a 5xx, or a 429/503 without Retry-After); "transport"
and "hung" (connection error, client timeout).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from PIL import Image

logger = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
DOCUMENTED_REJECTIONS = (429, 503)


@dataclass
class StreamResult:
    index: int
    has_image: bool
    max_tokens: int
    start: float
    """Seconds since the load's t0 when the request was sent."""
    end: float = 0.0
    status: int | None = None
    outcome: str = "pending"
    retry_after: str | None = None
    ttft_s: float | None = None
    num_chunks: int = 0
    """Content chunks received."""
    completion_tokens: int | None = None
    """From the final usage chunk."""
    finish_reason: str | None = None
    error_code: str | None = None
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def _image_url(seed: int) -> str:
    """A small PNG data URL; a few distinct images, so requests about one image repeat."""
    colour = ((seed * 80) % 256, (seed * 150 + 60) % 256, (seed * 40 + 120) % 256)
    image = Image.new("RGB", (48, 32), colour)
    image.paste((255 - colour[0], 90, 200), (seed * 5 % 40, 4, seed * 5 % 40 + 8, 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class LoadSpec:
    base_url: str
    api_key: str
    model: str
    max_concurrency: int = 16
    max_requests: int = 2000
    max_tokens: int = 24
    image_every: int = 2
    """Every n-th request carries an image (2: half of them)."""
    num_images: int = 4
    request_timeout_s: float = 90.0
    max_retry_wait_s: float = 1.0
    """A worker told to retry later waits min(Retry-After, this) before its next request."""


@dataclass
class _Counters:
    in_flight: int = 0
    waiting_first_token: int = 0
    sent: int = 0


class StreamingLoad:
    """Background load; `results` grows as requests finish (read it after `stop()`)."""

    def __init__(self, spec: LoadSpec, t0: float | None = None):
        self.spec = spec
        self.t0 = time.monotonic() if t0 is None else t0
        """The clock origin of `StreamResult.start/end` (shared with the timeline)."""
        self.results: list[StreamResult] = []
        self.max_tokens = spec.max_tokens
        self._concurrency = 0
        self._with_images = True
        self._counters = _Counters()
        self._lock = threading.Lock()
        self._stopping = False
        self._images = [_image_url(i) for i in range(spec.num_images)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="cluster-load", daemon=True)

    # -- control (driver thread) --------------------------------------------------------------

    def start(self, concurrency: int) -> StreamingLoad:
        self._concurrency = concurrency
        self._thread.start()
        return self

    def set_concurrency(
        self, concurrency: int, *, max_tokens: int | None = None, with_images: bool = True
    ) -> None:
        """Workers above `concurrency` finish their current request and then idle.
        `with_images=False`: text only from now on (Serve's power-of-two choice spreads those
        over the replicas; image requests go to their image's home replica)."""
        self._concurrency = min(concurrency, self.spec.max_concurrency)
        self._with_images = with_images
        if max_tokens is not None:
            self.max_tokens = max_tokens

    def now(self) -> float:
        return time.monotonic() - self.t0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._counters)

    def stop(self, timeout_s: float = 120.0) -> list[StreamResult]:
        """Stop sending; wait (bounded) for requests in flight; returns every result."""
        self._concurrency = 0
        self._stopping = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            logger.error("load did not finish within %.0f s", timeout_s)
        return list(self.results)

    # -- the load (its own thread and loop) ---------------------------------------------------

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.spec.max_concurrency + 4)
        headers = {"Authorization": f"Bearer {self.spec.api_key}"}
        async with httpx.AsyncClient(base_url=self.spec.base_url, headers=headers, limits=limits) as client:
            await asyncio.gather(*(self._worker(client, slot) for slot in range(self.spec.max_concurrency)))

    async def _worker(self, client: httpx.AsyncClient, slot: int) -> None:
        while not self._stopping:
            if slot >= self._concurrency:
                await asyncio.sleep(0.05)
                continue
            with self._lock:
                if self._counters.sent >= self.spec.max_requests:
                    return
                index = self._counters.sent
                self._counters.sent += 1
            result = await self._send(client, index)
            self.results.append(result)
            if result.outcome == "rejected":
                await asyncio.sleep(min(float(result.retry_after or 1), self.spec.max_retry_wait_s))

    def _body(self, index: int, max_tokens: int) -> tuple[dict[str, Any], bool]:
        has_image = self._with_images and index % self.spec.image_every == 0
        content: Any = f"Request {index}: say something about the weather."
        if has_image:
            url = self._images[(index // self.spec.image_every) % len(self._images)]
            content = [
                {"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {"url": url}},
            ]
        body = {
            "model": self.spec.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return body, has_image

    async def _send(self, client: httpx.AsyncClient, index: int) -> StreamResult:
        max_tokens = self.max_tokens
        body, has_image = self._body(index, max_tokens)
        result = StreamResult(index=index, has_image=has_image, max_tokens=max_tokens, start=self.now())
        with self._lock:
            self._counters.in_flight += 1
            self._counters.waiting_first_token += 1
        waiting = True
        try:
            async with asyncio.timeout(self.spec.request_timeout_s):
                async with client.stream(
                    "POST", CHAT, json=body, timeout=self.spec.request_timeout_s
                ) as resp:
                    result.status = resp.status_code
                    if resp.status_code != 200:
                        await self._read_rejection(resp, result)
                        return result
                    async for line in resp.aiter_lines():
                        if waiting:
                            waiting = False
                            result.ttft_s = self.now() - result.start
                            with self._lock:
                                self._counters.waiting_first_token -= 1
                        if not self._read_event(line, result):
                            break
                    if result.outcome == "pending":
                        result.outcome = "cut"
        except TimeoutError:
            result.outcome, result.error = "hung", f"no answer within {self.spec.request_timeout_s} s"
        except httpx.HTTPError as e:
            result.outcome, result.error = "transport", f"{type(e).__name__}: {e}"
        finally:
            result.end = self.now()
            with self._lock:
                self._counters.in_flight -= 1
                if waiting:
                    self._counters.waiting_first_token -= 1
        return result

    @staticmethod
    async def _read_rejection(resp: httpx.Response, result: StreamResult) -> None:
        raw = await resp.aread()
        result.retry_after = resp.headers.get("retry-after")
        try:
            error = json.loads(raw)["error"]
            result.error_code, result.error = error.get("code"), error.get("message")
        except (ValueError, KeyError, TypeError):
            result.error = raw[:200].decode(errors="replace")
        documented = resp.status_code in DOCUMENTED_REJECTIONS and result.retry_after is not None
        result.outcome = "rejected" if documented and result.error_code else "bad_status"

    @staticmethod
    def _read_event(line: str, result: StreamResult) -> bool:
        """Account for one SSE line; False once the stream is over."""
        if not line.startswith("data:"):
            return True
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            if result.outcome == "pending":
                complete = result.finish_reason is not None and result.completion_tokens == result.max_tokens
                result.outcome = "ok" if complete else "cut"
            return False
        event = json.loads(data)
        if "error" in event:
            result.outcome = "stream_error"
            result.error_code = event["error"].get("code")
            result.error = event["error"].get("message")
            return True
        usage = event.get("usage")
        if usage:
            result.completion_tokens = usage.get("completion_tokens")
        for choice in event.get("choices", ()):
            if choice.get("delta", {}).get("content"):
                result.num_chunks += 1
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        return True


def summarize(results: list[StreamResult]) -> dict[str, Any]:
    """Counts by outcome and status, plus the non-200 answers (for the report)."""
    outcomes: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    non_ok = [asdict(r) for r in results if r.outcome not in ("ok", "rejected")][:50]
    return {"num_requests": len(results), "outcomes": outcomes, "statuses": statuses, "not_ok": non_ok}


@dataclass
class Window:
    """Latency of the requests that finished in one timeline interval."""

    num_finished: int = 0
    p50_latency_s: float | None = None
    max_latency_s: float | None = None
    p50_ttft_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def window(results: list[StreamResult], start: float, end: float) -> Window:
    done = [r for r in results if start <= r.end < end and r.outcome == "ok"]
    if not done:
        return Window()
    latencies = sorted(r.latency_s for r in done)
    ttfts = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    return Window(
        num_finished=len(done),
        p50_latency_s=round(latencies[len(latencies) // 2], 3),
        max_latency_s=round(latencies[-1], 3),
        p50_ttft_s=round(ttfts[len(ttfts) // 2], 3) if ttfts else None,
    )
