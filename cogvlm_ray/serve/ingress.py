"""The HTTP edge: a FastAPI app with the OpenAI routes, built around any `ChatBackend`.

Owns: routes (`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`),
reading the body under a size limit (413), schema validation (422), the optional API key on
`/v1/*` (401), request timeouts (504), SSE streaming, and mapping every error to the OpenAI
error body in one place (`error_response`).

Does not own: where generation happens. `backend` is anything with `generate(...)` and
`check_ready()` (see `ChatBackend`): the Ray deployment handles in production (`serve/app.py`),
a scripted fake in unit tests. No Ray import here.

Streaming rule: the first engine delta is awaited *before* the `StreamingResponse` is returned,
so a full queue (429), a bad image (400) or no replica (503) is a real HTTP status, not an error
event inside a 200. After that, an error ends the stream with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cogvlm_ray.api import chat
from cogvlm_ray.api.protocol import ChatCompletionRequest
from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.errors import (
    AuthenticationError,
    CogVLMError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve import metrics as metrics_module
from cogvlm_ray.serve.metrics import Metrics

logger = logging.getLogger(__name__)


class ChatBackend(Protocol):
    """What the ingress needs from whatever runs the model."""

    def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of one request. Errors (CogVLMError subclasses) may surface on the first
        `__anext__`; closing the iterator must cancel the request in the engine."""
        ...

    async def check_ready(self) -> None:
        """Return when the model (and preprocessing) can take requests; else raise
        ServiceUnavailableError."""
        ...


@dataclass(frozen=True)
class IngressSettings:
    served_model_names: tuple[str, ...] = ("cogvlm2",)
    model_root: str | None = None
    """Shown in `/v1/models` as `root` (the checkpoint path or hub id)."""
    max_model_len: int | None = None
    api_key: str | None = None
    """When set, `/v1/*` requires `Authorization: Bearer <api_key>`; /health and /metrics stay open."""
    max_request_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float | None = 600.0
    defaults: chat.ChatDefaults = field(default_factory=chat.ChatDefaults)
    playground: bool = False


def error_response(error: CogVLMError) -> JSONResponse:
    """The one place an error becomes an HTTP response (OpenAI body, Retry-After for 429/503)."""
    headers: dict[str, str] = {}
    if isinstance(error, OverloadedError | ServiceUnavailableError):
        headers["Retry-After"] = str(getattr(error, "retry_after_s", 1) or 1)
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


def _internal_error() -> CogVLMError:
    return CogVLMError("internal server error; see the server logs", code="internal_error")


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body; 413 beyond `max_bytes` (checked before and while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(f"request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise RequestTooLargeError(f"request body exceeds the limit of {max_bytes} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply", code="invalid_json") from None


def _validation_error(error: ValidationError | RequestValidationError) -> JSONResponse:
    details = error.errors()
    first = details[0] if details else {}
    loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    summary = "; ".join(
        f"{'.'.join(str(p) for p in d.get('loc', ()) if p != 'body')}: {d.get('msg')}" for d in details[:5]
    )
    body = {
        "error": {
            "message": f"invalid request: {summary}",
            "type": "invalid_request_error",
            "param": loc or None,
            "code": "validation_error",
        }
    }
    return JSONResponse(body, status_code=422)


class HttpMetricsMiddleware:
    """Pure ASGI (BaseHTTPMiddleware would break streaming cancellation): counts every response
    by route template (not raw path, to bound label cardinality) and status."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.inc(metrics_module.HTTP_REQUESTS, route=path, status=str(status["code"]))


def create_app(
    backend: ChatBackend, settings: IngressSettings | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """The FastAPI app of the ingress. `metrics` defaults to a private, in-process `Metrics`."""
    settings = settings or IngressSettings()
    metrics = metrics or Metrics()
    app = FastAPI(title="cogvlm-ray", version="0.1.0", docs_url=None, redoc_url=None)
    # Middleware order (outermost first): ServerErrorMiddleware (Starlette's, turns a crash into
    # a 500) -> HttpMetricsMiddleware (counts every status, including 401/413/422) -> routing.
    # Auth, body limit and validation are per-route steps, so their errors go through the
    # exception handlers below and are counted like any other response.
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    @app.exception_handler(CogVLMError)
    async def _cogvlm_error(_: Request, error: CogVLMError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = {"error": {"message": str(error.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in the ingress", exc_info=error)
        return error_response(_internal_error())

    async def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise AuthenticationError(
                "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        await backend.check_ready()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models() -> JSONResponse:
        created = int(time.time())
        extra = {} if settings.max_model_len is None else {"max_model_len": settings.max_model_len}
        cards = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "cogvlm-ray",
                "root": settings.model_root,
                **extra,  # only when configured: the checkpoint's window is known to the model replicas
            }
            for name in settings.served_model_names
        ]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(request: Request) -> Response:
        raw = await read_json_body(request, settings.max_request_bytes)
        try:
            body = ChatCompletionRequest.model_validate(raw)
        except ValidationError as e:
            return _validation_error(e)
        chat.check_supported(body)
        model = chat.resolve_model_name(body, settings.served_model_names)
        structured = chat.structured_output(body)
        sampling_params = chat.to_sampling_params(body, settings.defaults, structured.spec)
        request_id = chat.make_request_id()
        deadline = (
            None if settings.request_timeout_s is None else time.monotonic() + settings.request_timeout_s
        )
        stream = backend.generate(
            chat.to_conversation(body, structured.tools), sampling_params, body.template_version, request_id
        )
        outputs = stream.__aiter__()
        headers = {"X-Request-Id": request_id}
        try:
            first = await _next_before(outputs, deadline, settings.request_timeout_s)
            chat.check_not_aborted(first)
        except BaseException as e:
            await _close(outputs)
            _raise_as_api_error(e)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            writer = chat.ChunkWriter(
                request_id, model, include_usage=include_usage, tool_mode=structured.tool_mode
            )
            events = _sse_events(writer, first, outputs, deadline, settings.request_timeout_s)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
            )
        try:
            parts, last = [first.new_text], first
            while not last.finished:
                last = await _next_before(outputs, deadline, settings.request_timeout_s)
                chat.check_not_aborted(last)
                parts.append(last.new_text)
        except BaseException as e:
            _raise_as_api_error(e)
        finally:
            await _close(outputs)
        return JSONResponse(
            chat.completion_body(
                request_id, model, int(time.time()), "".join(parts), last, structured.tool_mode
            ),
            headers=headers,
        )

    if settings.playground:
        from cogvlm_ray.serve.playground import mount_playground

        mount_playground(app, require_api_key=settings.api_key is not None)
    return app


async def _next_before(
    outputs: AsyncIterator[RequestOutput], deadline: float | None, timeout_s: float | None
) -> RequestOutput:
    """The next delta, or RequestTimeoutError (504) once the request's deadline has passed."""
    try:
        if deadline is None:
            return await outputs.__anext__()
        return await asyncio.wait_for(outputs.__anext__(), max(deadline - time.monotonic(), 0.0))
    except StopAsyncIteration:
        raise ServiceUnavailableError(
            "the model stream ended without a final delta", code="stream_ended"
        ) from None
    except asyncio.TimeoutError:
        raise RequestTimeoutError(
            f"request exceeded the server timeout of {timeout_s} s", code="request_timeout"
        ) from None


def _raise_as_api_error(error: BaseException) -> NoReturn:
    """Re-raise: CogVLMError and cancellation as they are; anything else is logged, then a 500."""
    if isinstance(error, CogVLMError) or not isinstance(error, Exception):
        raise error
    logger.error("model request failed", exc_info=error)
    raise _internal_error() from error


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    """Close the backend stream (this is what cancels the request in the engine)."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing must never mask the real outcome
            logger.debug("error while closing a model stream", exc_info=True)


async def _sse_events(
    writer: chat.ChunkWriter,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
    deadline: float | None,
    timeout_s: float | None,
) -> AsyncIterator[str]:
    """SSE events after the first delta. A client disconnect cancels this generator; the
    `finally` then closes the backend stream, which aborts the request in the engine."""
    try:
        yield writer.role()
        output = first
        yield writer.delta(output)
        while not output.finished:
            output = await _next_before(outputs, deadline, timeout_s)
            event = writer.delta(output)
            if event:
                yield event
        yield chat.SSE_DONE
    except CogVLMError as e:
        yield writer.error(e)
    except Exception:
        logger.exception("model stream failed mid-response")
        yield writer.error(_internal_error())
    finally:
        await _close(outputs)
