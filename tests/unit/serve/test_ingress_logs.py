"""Request ids, log lines and the disconnect outcome of the ingress (TestClient + fake backend)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from fastapi.testclient import TestClient

from cogvlm_ray.api.responses import ChunkWriter
from cogvlm_ray.errors import ImageError
from cogvlm_ray.serve.ingress import IngressSettings, _sse_events, create_app
from cogvlm_ray.serve.metrics import Metrics
from cogvlm_ray.serve.middleware import HttpMetricsMiddleware, mark_cancelled
from tests.unit.serve.fakes import FakeBackend

MESSAGES = [{"role": "user", "content": "hi"}]


def make_client(backend: FakeBackend | None = None, **settings) -> TestClient:
    return TestClient(create_app(backend or FakeBackend(), IngressSettings(**settings), Metrics()))


def our_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("cogvlm_ray")]


@pytest.mark.parametrize("stream", [False, True])
def test_one_request_id_header_and_the_clients_is_honoured(stream):
    backend = FakeBackend()
    response = make_client(backend).post(
        "/v1/chat/completions",
        json={"messages": MESSAGES, "stream": stream},
        headers={"x-request-id": "trace-42"},
    )
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["trace-42"]
    assert backend.calls[0]["request_id"].startswith("chatcmpl-trace-42")
    assert '"id":"chatcmpl-trace-42"' in response.text.replace(" ", "")
    fresh = make_client().post("/v1/chat/completions", json={"messages": MESSAGES})
    (generated,) = fresh.headers.get_list("x-request-id")
    assert fresh.json()["id"] == f"chatcmpl-{generated}"


def test_behind_ray_serve_the_proxy_alone_sets_the_header():
    response = make_client(echo_request_id=False).post(
        "/v1/chat/completions", json={"messages": MESSAGES}, headers={"x-request-id": "from-proxy"}
    )
    assert "x-request-id" not in response.headers
    assert response.json()["id"] == "chatcmpl-from-proxy"


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_image_logs_one_line_with_request_id_and_code(caplog, stream):
    client = make_client(FakeBackend(error=ImageError("cannot decode image: not a PNG")))
    with caplog.at_level(logging.DEBUG, logger="cogvlm_ray"):
        response = client.post(
            "/v1/chat/completions",
            json={"messages": MESSAGES, "stream": stream},
            headers={"x-request-id": "bad-img"},
        )
    assert response.status_code == 400
    records = [r for r in our_records(caplog) if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in records] == [
        "request bad-img: 400 invalid_image (param=messages): cannot decode image: not a PNG"
    ]
    assert records[0].levelno == logging.INFO and records[0].exc_info is None


def test_a_schema_error_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="cogvlm_ray"):
        response = make_client().post(
            "/v1/chat/completions", json={"messages": []}, headers={"x-request-id": "r1"}
        )
    assert response.status_code == 400
    (record,) = [r for r in our_records(caplog) if r.levelno >= logging.INFO]
    assert record.getMessage().startswith("request r1: 400 validation_error (param=messages)")


def test_a_normal_stream_logs_no_disconnect(caplog):
    with caplog.at_level(logging.DEBUG, logger="cogvlm_ray"):
        response = make_client().post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    assert response.text.endswith("data: [DONE]\n\n")
    assert not [r for r in our_records(caplog) if "disconnect" in r.getMessage()]


def test_a_disconnect_mid_stream_logs_one_line_and_counts_499(caplog):
    backend = FakeBackend(pieces=["a", "b", "c", "d"], delay_s=0.01)
    scope: dict = {}

    async def scenario():
        outputs = backend.generate(None, None, None, "req-1").__aiter__()  # type: ignore[arg-type]
        first = await outputs.__anext__()
        events = _sse_events(ChunkWriter("req-1", "m"), first, outputs, None, None, scope, "req-1")
        await events.__anext__()
        await events.aclose()  # what Starlette does when the client goes away

    with caplog.at_level(logging.DEBUG, logger="cogvlm_ray"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in our_records(caplog)] == [
        "request req-1: client disconnected mid-stream; cancelled"
    ]
    assert backend.closed == ["req-1"]
    assert scope["cogvlm_outcome"] == {"status": "499"}


def _count_499(app) -> str:
    metrics = Metrics()
    middleware = HttpMetricsMiddleware(app, metrics)

    async def send(message):
        pass

    async def receive():
        return {"type": "http.request"}

    async def run():
        with contextlib.suppress(asyncio.CancelledError):
            await middleware({"type": "http", "headers": []}, receive, send)

    asyncio.run(run())
    return metrics.render()[0].decode()


def test_cancelled_requests_count_as_499_never_500():
    async def cancelled(scope, receive, send):
        raise asyncio.CancelledError

    async def cut_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        mark_cancelled(scope)

    for app in (cancelled, cut_stream):
        text = _count_499(app)
        assert 'cogvlm_http_requests_total{route="other",status="499"} 1.0' in text
        assert 'status="500"' not in text and 'status="200"' not in text
