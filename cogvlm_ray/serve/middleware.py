"""Pure-ASGI middleware of the ingress: request ids and the HTTP request counter.

Pure ASGI, not `BaseHTTPMiddleware` (which would break streaming cancellation).

* `RequestIdMiddleware`: every request has one `x-request-id`. A client-sent value is kept;
  otherwise one is generated and written into the request's headers, so the routes read it
  from one place. Behind Ray Serve the proxy already does both and adds the response header
  itself, so there `echo_header=False` (a second header with another value was the bug).
* `HttpMetricsMiddleware`: counts every response by route template (not raw path, to bound
  label cardinality) and status. A request whose client went away before it was answered
  (the ASGI task cancelled, or a stream cut short: `mark_cancelled`) counts as status "499",
  nginx's "client closed request", never as "500".
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from cogvlm_ray.serve import metrics as metrics_module
from cogvlm_ray.serve.metrics import Metrics

REQUEST_ID_HEADER = "x-request-id"
CANCELLED_STATUS = "499"
_OUTCOME_KEY = "cogvlm_outcome"
MAX_REQUEST_ID_CHARS = 128


def request_id_of(scope: dict[str, Any]) -> str:
    """The request's id (set by `RequestIdMiddleware`, or Ray Serve's proxy)."""
    for key, value in scope.get("headers", ()):
        if key == REQUEST_ID_HEADER.encode():
            return value.decode("latin-1")[:MAX_REQUEST_ID_CHARS]
    return uuid.uuid4().hex


def mark_cancelled(scope: dict[str, Any]) -> None:
    """Record that the client went away mid-response (a cut stream still had status 200 sent)."""
    scope.setdefault(_OUTCOME_KEY, {})["status"] = CANCELLED_STATUS


class RequestIdMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], echo_header: bool = True):
        self.app = app
        self.echo_header = echo_header

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", ()))
        sent = [v for k, v in headers if k == REQUEST_ID_HEADER.encode() and v.strip()]
        request_id = sent[0] if sent else uuid.uuid4().hex.encode()
        if not sent:
            scope["headers"] = [
                *headers,
                (REQUEST_ID_HEADER.encode(), request_id),
            ]  # in place, as Ray's proxy

        async def send_with_id(message: dict) -> None:
            if self.echo_header and message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (REQUEST_ID_HEADER.encode(), request_id)],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)


class HttpMetricsMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": "500"}
        outcome = scope.setdefault(_OUTCOME_KEY, {})  # shared with the routes through the scope

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            status["code"] = CANCELLED_STATUS
            raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            code = outcome.get("status") or status["code"]
            self.metrics.inc(metrics_module.HTTP_REQUESTS, route=path, status=code)
