"""The ingress FastAPI app over a scripted backend: routes, SSE framing, every error status."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from cogvlm_ray.api.chat import ChatDefaults
from cogvlm_ray.api.responses import ChunkWriter
from cogvlm_ray.contracts import RequestOutput
from cogvlm_ray.errors import (
    EngineDeadError,
    ImageError,
    OverloadedError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.ingress import IngressSettings, _sse_events, create_app
from cogvlm_ray.serve.metrics import Metrics
from tests.unit.api.openai_shapes import ChatCompletionChunk, ChatCompletionResponse
from tests.unit.serve.fakes import FakeBackend, raising

MESSAGES = [{"role": "user", "content": "Say hello"}]


def make_client(backend: FakeBackend | None = None, **settings) -> TestClient:
    settings.setdefault("served_model_names", ("cogvlm2-tiny",))
    return TestClient(create_app(backend or FakeBackend(), IngressSettings(**settings), Metrics()))


def post(client: TestClient, **body):
    body.setdefault("messages", MESSAGES)
    return client.post("/v1/chat/completions", json=body)


def sse_payloads(text: str) -> list:
    """Parse an SSE body strictly: every event is one `data: ` line followed by a blank line."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        data = event[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def assert_openai_error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if kind is not None:
        assert error["type"] == kind
    return error


def test_non_streaming_completion_shape_usage_and_engine_inputs():
    backend = FakeBackend()
    client = make_client(backend, defaults=ChatDefaults(max_tokens=33))
    response = post(client, model="cogvlm2-tiny", temperature=0, stop="END", top_k=-1, template_version="vqa")
    assert response.status_code == 200, response.text
    body = ChatCompletionResponse.model_validate(response.json())
    assert body.choices[0].message.content == "Hello, world!"
    assert body.choices[0].finish_reason == "stop"
    assert body.usage.model_dump() == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert response.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert response.headers.get_list("x-request-id") == [body.id.removeprefix("chatcmpl-")]
    call = backend.calls[0]
    assert call["conversation"] == Conversation(query="Say hello", history=[], system=None)  # parsed once
    assert call["template_version"] == "vqa"
    params = call["sampling_params"]
    assert (params.max_tokens, params.temperature, params.stop, params.top_k) == (33, 0.0, ("END",), 0)
    assert backend.closed == [call["request_id"]] and call["request_id"].startswith(body.id)


def test_stream_framing_finish_reason_only_last_and_joined_text_equals_non_stream():
    client = make_client()
    full = post(client).json()["choices"][0]["message"]["content"]
    response = post(client, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks]
    assert finish[-1] == "stop" and all(f is None for f in finish[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert all("usage" not in p for p in payloads[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_include_usage_adds_a_final_usage_chunk():
    response = post(make_client(), stream=True, stream_options={"include_usage": True})
    payloads = sse_payloads(response.text)
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(p["usage"] is None for p in payloads[:-2])
    assert payloads[-3]["choices"][0]["finish_reason"] == "stop"


def test_models_and_health():
    client = make_client(model_root="/models/x", max_model_len=8192)
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["root"], m["max_model_len"]) for m in models["data"]] == [
        ("cogvlm2-tiny", "/models/x", 8192)
    ]
    assert client.get("/health").json() == {"status": "ok"}
    down = make_client(FakeBackend(ready=False))
    assert_openai_error(down.get("/health"), 503, "service_unavailable")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 9}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 3, "min_tokens": 5}, "min_tokens"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_unsupported_semantics_are_400_not_ignored(body, param):
    backend = FakeBackend()
    error = assert_openai_error(post(make_client(backend), **body), 400, "invalid_request_error")
    assert error["param"] == param
    assert backend.calls == []


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 129}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x" * 70_000}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "stop": ["x" * 65]}, "stop[0]"),
        ({"messages": MESSAGES, "template_version": "llama3"}, "template_version"),
        ({"messages": MESSAGES, "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"model": "cogvlm2-tiny"}, "messages"),
    ],
)
def test_schema_violations_are_400_with_dotted_param(raw, param):
    response = make_client().post("/v1/chat/completions", json=raw)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param
    assert "constrained" not in error["message"] and "tagged-union" not in error["message"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_are_rejected(literal):
    raw = f'{{"messages": [{{"role": "user", "content": "x"}}], "temperature": {literal}}}'
    response = make_client().post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(response, 400)
    assert error["param"] == "temperature"


def test_bad_json_is_400_and_server_still_works():
    client = make_client()
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, "invalid_request_error")
    assert post(client).status_code == 200


def test_body_too_large_is_413_declared_and_streamed():
    client = make_client(max_request_bytes=1000)
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    assert_openai_error(client.post("/v1/chat/completions", json=big), 413)

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"y" * 2000
        yield b'"}]}'

    assert_openai_error(client.post("/v1/chat/completions", content=chunks()), 413)


def test_api_key_guards_v1_only():
    client = make_client(api_key="s3cret")
    assert_openai_error(post(client), 401, "authentication_error")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    ok = client.post(
        "/v1/chat/completions", json={"messages": MESSAGES}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_unknown_model_and_route_are_404():
    client = make_client()
    error = assert_openai_error(post(client, model="gpt-4o"), 404, "not_found_error")
    assert error["param"] == "model"
    assert_openai_error(client.get("/v1/nothing"), 404)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ImageError("cannot decode image"), 400),
        (PromptTooLongError("prompt 9000 + max_tokens 10 > 8192"), 400),
        (OverloadedError("model queue is full"), 429),
        (ServiceUnavailableError("no model replica"), 503),
        (EngineDeadError("engine loop died"), 503),
        (RuntimeError("boom"), 500),
    ],
)
def test_backend_errors_are_real_statuses_even_when_streaming(error, status, stream):
    backend = raising(error)
    response = post(make_client(backend), stream=stream)
    assert_openai_error(response, status)
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    assert len(backend.closed) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_is_504(stream):
    backend = FakeBackend(delay_s=0.5)
    assert_openai_error(
        post(make_client(backend, request_timeout_s=0.05), stream=stream), 504, "timeout_error"
    )
    assert len(backend.closed) == 1


def test_mid_stream_failure_ends_with_error_event_and_done():
    backend = FakeBackend(mid_stream_error=ServiceUnavailableError("replica died"), fail_after=2)
    response = post(make_client(backend), stream=True)
    assert response.status_code == 200
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["message"] == "replica died"
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])


def test_engine_abort_is_an_error_not_a_finish_reason():
    response = post(make_client(FakeBackend(finish_reason="abort")))
    assert_openai_error(response, 503)


def test_closing_the_sse_generator_closes_the_backend_stream():
    """What a client disconnect does: Starlette cancels/closes the response generator."""
    backend = FakeBackend(pieces=["a", "b", "c", "d"], delay_s=0.01)

    async def scenario():
        outputs = backend.generate(None, None, None, "req-1").__aiter__()  # type: ignore[arg-type]
        first: RequestOutput = await outputs.__anext__()
        scope: dict = {}
        events = _sse_events(ChunkWriter("req-1", "m"), first, outputs, None, None, scope, "req-1")
        received = [await events.__anext__(), await events.__anext__()]
        await events.aclose()
        return received

    received = asyncio.run(scenario())
    assert len(received) == 2
    assert backend.closed == ["req-1"] and backend.finished == []


def test_http_requests_metric_counts_by_route_and_status():
    client = make_client()
    post(client)
    post(client, n=9)
    client.get("/v1/nothing")
    text = client.get("/metrics").text
    assert 'cogvlm_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'cogvlm_http_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert 'cogvlm_http_requests_total{route="other",status="404"} 1.0' in text
