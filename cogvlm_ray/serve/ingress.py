"""The HTTP edge: a FastAPI app with the OpenAI routes, built around any `ChatBackend`.

Owns: routes (`POST /v1/chat/completions`, `POST /tokenize`, `POST /detokenize`,
`GET /v1/models`, `GET /health`, `GET /metrics`), reading the body under a size limit (413),
schema validation (400 naming the field, never 422), the optional API key on `/v1/*` and the
token routes (401), request timeouts (504), SSE streaming, one log line per refused request,
and mapping every error to the OpenAI error body in one place (`error_response`).

Does not own: where generation happens. `backend` is anything with the methods of
`ChatBackend`: the Ray deployment handles in production (`serve/app.py`), a scripted fake in
unit tests. No Ray import here.

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
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cogvlm_ray.api import chat, tokenize
from cogvlm_ray.api.fields import warn_unknown_fields
from cogvlm_ray.api.protocol import ChatCompletionRequest
from cogvlm_ray.api.responses import SSE_DONE, ChunkWriter, CompletionBuilder, check_not_aborted
from cogvlm_ray.api.validation import to_invalid_request
from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.errors import (
    AuthenticationError,
    CogVLMError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.metrics import Metrics
from cogvlm_ray.serve.middleware import (
    HttpMetricsMiddleware,
    RequestIdMiddleware,
    mark_cancelled,
    request_id_of,
)

logger = logging.getLogger(__name__)

BodyT = TypeVar("BodyT", bound=BaseModel)


class ChatBackend(Protocol):
    """What the ingress needs from whatever runs the model."""

    def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        """Deltas of one request (n > 1: the choices' deltas interleaved, tagged with `index`).
        Errors (CogVLMError subclasses) may surface on the first `__anext__`; closing the
        iterator must cancel the request in the engine."""
        ...

    async def tokenize(self, job: tokenize.TokenizeJob) -> tokenize.TokenizeResult:
        """The prompt ids of a conversation (template and image positions included) or of a text."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str: ...

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
    """When set, `/v1/*` and the token routes require `Authorization: Bearer <api_key>`;
    /health and /metrics stay open."""
    max_request_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float | None = 600.0
    defaults: chat.ChatDefaults = field(default_factory=chat.ChatDefaults)
    max_n: int = chat.DEFAULT_MAX_N
    """Most choices per request (the engine's `max_n`)."""
    echo_request_id: bool = True
    """Add the `x-request-id` response header; False behind Ray Serve, whose proxy adds it."""
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


def create_app(
    backend: ChatBackend, settings: IngressSettings | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """The FastAPI app of the ingress. `metrics` defaults to a private, in-process `Metrics`."""
    settings = settings or IngressSettings()
    metrics = metrics or Metrics()
    app = FastAPI(title="cogvlm-ray", version="0.1.0", docs_url=None, redoc_url=None)
    # Middleware order (outermost first): ServerErrorMiddleware (Starlette's, turns a crash into
    # a 500) -> HttpMetricsMiddleware (counts every status, 499 for a client gone) ->
    # RequestIdMiddleware (one x-request-id, the client's if sent) -> routing. Auth, body limit
    # and validation are per-route steps, so their errors go through the exception handlers
    # below and are counted like any other response.
    app.add_middleware(RequestIdMiddleware, echo_header=settings.echo_request_id)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    @app.exception_handler(CogVLMError)
    async def _cogvlm_error(request: Request, error: CogVLMError) -> JSONResponse:
        log_api_error(request_id_of(request.scope), error)
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        invalid = to_invalid_request(error.errors())
        log_api_error(request_id_of(request.scope), invalid)
        return error_response(invalid)

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
        body = parse_body(ChatCompletionRequest, await read_json_body(request, settings.max_request_bytes))
        warn_unknown_fields(body.model_extra or {})
        chat.check_supported(body, settings.max_n)
        model = chat.resolve_model_name(body, settings.served_model_names)
        structured = chat.structured_output(body)
        sampling_params = chat.to_sampling_params(body, settings.defaults, structured.spec)
        conversation = chat.to_conversation(body, structured.tools)
        client_id = request_id_of(request.scope)
        response_id = f"chatcmpl-{client_id}"
        # Engine ids must be unique, and a client may reuse its own x-request-id.
        engine_id = f"{response_id}-{uuid.uuid4().hex[:8]}"
        deadline = (
            None if settings.request_timeout_s is None else time.monotonic() + settings.request_timeout_s
        )
        timeout_s = settings.request_timeout_s
        stream = backend.generate(conversation, sampling_params, body.template_version, engine_id)
        outputs = stream.__aiter__()
        try:
            first = await _next_before(outputs, deadline, timeout_s)
            check_not_aborted(first)
        except asyncio.CancelledError:
            logger.info("request %s: client disconnected before the first token; cancelled", client_id)
            await _close(outputs)
            raise
        except BaseException as e:
            await _close(outputs)
            _raise_as_api_error(e)
        num_choices = sampling_params.n
        if body.stream:
            options = body.stream_options
            writer = ChunkWriter(
                response_id,
                model,
                num_choices=num_choices,
                include_usage=bool(options and options.include_usage),
                continuous_usage=bool(options and options.continuous_usage_stats),
                logprobs=sampling_params.logprobs,
                tool_mode=structured.tool_mode,
            )
            events = _sse_events(writer, first, outputs, deadline, timeout_s, request.scope, client_id)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        builder = CompletionBuilder(
            num_choices, logprobs=sampling_params.logprobs, tool_mode=structured.tool_mode
        )
        try:
            builder.add(first)
            while not builder.is_complete:
                builder.add(await _next_before(outputs, deadline, timeout_s))
        except asyncio.CancelledError:
            logger.info("request %s: client disconnected; cancelled", client_id)
            raise
        except BaseException as e:
            _raise_as_api_error(e)
        finally:
            await _close(outputs)
        return JSONResponse(builder.body(response_id, model))

    mount_token_routes(app, backend, settings, require_api_key)
    if settings.playground:
        from cogvlm_ray.serve.playground import mount_playground

        mount_playground(app, require_api_key=settings.api_key is not None)
    return app


def parse_body(model: type[BodyT], raw: Any) -> BodyT:
    """The validated request body; a schema failure is a 400 naming the field (never a 422)."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise to_invalid_request(e.errors()) from None


def log_api_error(request_id: str, error: CogVLMError) -> None:
    """One line per refused request: a client error at INFO, a server-side one at WARNING."""
    level = logging.INFO if error.status_code < 500 else logging.WARNING
    logger.log(
        level,
        "request %s: %d %s (param=%s): %s",
        request_id,
        error.status_code,
        error.code,
        error.param,
        error.message,
    )


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


async def _close(outputs: AsyncIterator[Any]) -> None:
    """Close the backend stream (this is what cancels the request in the engine)."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except BaseException:  # closing must never mask the real outcome
            logger.debug("error while closing a model stream", exc_info=True)


async def _sse_events(
    writer: ChunkWriter,
    first: RequestOutput,
    outputs: AsyncIterator[RequestOutput],
    deadline: float | None,
    timeout_s: float | None,
    scope: dict[str, Any],
    request_id: str,
) -> AsyncIterator[str]:
    """SSE events after the first delta. A client disconnect cancels or closes this generator;
    the `finally` then closes the backend stream, which aborts the request in the engine. The
    backend stream is closed *before* `[DONE]` goes out, so a client that hangs up right after
    `[DONE]` never looks like a disconnect."""
    complete = False
    try:
        yield writer.role(first)
        output = first
        yield writer.delta(output)
        while not writer.is_complete:
            output = await _next_before(outputs, deadline, timeout_s)
            event = writer.delta(output)
            if event:
                yield event
        complete = True
        await _close(outputs)
        yield SSE_DONE
    except CogVLMError as e:
        complete = True
        log_api_error(request_id, e)
        yield writer.error(e)
    except Exception:
        complete = True
        logger.exception("model stream failed mid-response")
        yield writer.error(_internal_error())
    finally:
        if not complete:
            logger.info("request %s: client disconnected mid-stream; cancelled", request_id)
            mark_cancelled(scope)
        await _close(outputs)


def mount_token_routes(
    app: FastAPI, backend: ChatBackend, settings: IngressSettings, require_api_key: Callable[..., Any]
) -> None:
    """`POST /tokenize` and `POST /detokenize` (vLLM's paths), answered by the preprocessing replica."""

    def check_model(name: str | None) -> None:
        if name is not None and name not in settings.served_model_names:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist; this server serves {list(settings.served_model_names)}",
                param="model",
                code="model_not_found",
            )

    @app.post("/tokenize", dependencies=[Depends(require_api_key)])
    async def tokenize_route(request: Request) -> JSONResponse:
        raw = await read_json_body(request, settings.max_request_bytes)
        body = parse_body(tokenize.tokenize_request_model(raw), raw)
        check_model(body.model)
        result = await backend.tokenize(tokenize.to_job(body))
        return JSONResponse(tokenize.tokenize_body(result))

    @app.post("/detokenize", dependencies=[Depends(require_api_key)])
    async def detokenize_route(request: Request) -> JSONResponse:
        raw = await read_json_body(request, settings.max_request_bytes)
        body = parse_body(tokenize.DetokenizeRequest, raw)
        check_model(body.model)
        return JSONResponse(tokenize.detokenize_body(await backend.detokenize(body.tokens)))
