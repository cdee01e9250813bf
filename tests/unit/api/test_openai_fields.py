"""Every field of the installed `openai` client's chat-completions request, sent to the real
ingress over a fake backend: each is honoured (200, and the engine gets it) or refused with
the documented 400 naming it; none gives a 422 or a 500. A field the client library adds later
fails `test_every_client_field_is_classified` until it gets a row here and in api/fields.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai.types.chat.completion_create_params import CompletionCreateParamsBase

from cogvlm_ray.api.fields import IGNORED_FIELDS, NOT_IMPLEMENTED
from cogvlm_ray.contracts import StructuredOutputSpec
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from cogvlm_ray.serve.metrics import Metrics
from tests.unit.serve.fakes import FakeBackend

MESSAGES = [{"role": "user", "content": "hi"}]
FUNCTION = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

#: field -> (an example value a client sends, what the engine must receive or None when ignored)
HONOURED: dict[str, tuple[object, tuple[str, object] | None]] = {
    "messages": (MESSAGES, None),
    "model": ("tiny", None),
    "frequency_penalty": (0.5, ("frequency_penalty", 0.5)),
    "presence_penalty": (-0.5, ("presence_penalty", -0.5)),
    "logit_bias": ({"42": -100}, ("logit_bias", ((42, -100.0),))),
    "logprobs": (True, ("logprobs", True)),
    "top_logprobs": (3, None),  # sent with logprobs, checked below
    "max_completion_tokens": (9, ("max_tokens", 9)),
    "max_tokens": (7, ("max_tokens", 7)),
    "n": (3, ("n", 3)),
    "seed": (11, ("seed", 11)),
    "stop": (["END"], ("stop", ("END",))),
    "stream_options": ({"include_usage": True, "continuous_usage_stats": True}, None),
    "temperature": (0.3, ("temperature", 0.3)),
    "top_p": (0.5, ("top_p", 0.5)),
    "response_format": ({"type": "json_object"}, ("structured", StructuredOutputSpec("json_object"))),
    "tools": ([FUNCTION], None),  # tool_choice "auto": a structural tag, checked below
    "tool_choice": ("none", None),
}
#: field -> a value that asks for something not implemented (400 naming the field).
REFUSED: dict[str, object] = {
    "functions": [FUNCTION["function"]],
    "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "web_search_options": {"search_context_size": "low"},
}
#: field -> a value a client sends; accepted and ignored.
IGNORED: dict[str, object] = {
    "store": True,
    "metadata": {"team": "a"},
    "user": "u-1",
    "service_tier": "auto",
    "parallel_tool_calls": False,
    "reasoning_effort": "low",
    "verbosity": "low",
    "safety_identifier": "s-1",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "auto"},
    "moderation": {"enabled": False},
    "prediction": {"type": "content", "content": "hello"},
}


def client_fields() -> set[str]:
    return set(CompletionCreateParamsBase.__annotations__) | {"stream"}


def make_client(backend: FakeBackend) -> TestClient:
    return TestClient(create_app(backend, IngressSettings(served_model_names=("tiny",)), Metrics()))


def test_every_client_field_is_classified():
    classified = set(HONOURED) | set(REFUSED) | set(IGNORED) | {"stream"}
    assert client_fields() - classified == set(), "classify the new openai fields (api/fields.py)"
    assert set(IGNORED) <= IGNORED_FIELDS
    assert set(REFUSED) <= {name for name, _, _ in NOT_IMPLEMENTED}


def test_the_feature_table_in_serving_docs_names_every_client_field():
    doc = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()
    table = doc[doc.index("| field | supported | behaviour |") :].split("\n\n", 1)[0]
    missing = [name for name in client_fields() if f"`{name}" not in table]
    assert not missing, missing


@pytest.mark.parametrize("field", sorted(HONOURED))
def test_honoured_fields_reach_the_engine(field):
    value, expected = HONOURED[field]
    backend = FakeBackend()
    body = {"messages": MESSAGES, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "stream_options":
        body["stream"] = True
    response = make_client(backend).post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    params = backend.calls[0]["sampling_params"]
    if expected is not None:
        name, wanted = expected
        assert getattr(params, name) == wanted
    if field == "top_logprobs":
        assert params.top_logprobs == 3
        entry = response.json()["choices"][0]["logprobs"]["content"][0]
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 3
    if field == "tools":
        assert params.structured is not None and params.structured.kind == "structural_tag"
        assert "You can call these functions:" in backend.calls[0]["conversation"].system
    if field == "n":
        assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]
    if field == "stream_options":
        assert '"usage":{"prompt_tokens":7,"completion_tokens":1' in response.text


@pytest.mark.parametrize("field", sorted(REFUSED))
@pytest.mark.parametrize("stream", [False, True])
def test_unimplemented_fields_are_400_naming_the_field(field, stream):
    backend = FakeBackend()
    body = {"messages": MESSAGES, field: REFUSED[field], "stream": stream}
    response = make_client(backend).post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        field,
        "unsupported_parameter",
    )
    assert field in error["message"] and backend.calls == []


@pytest.mark.parametrize("field", sorted(IGNORED))
def test_harmless_fields_are_accepted_and_ignored(field):
    backend, plain_backend = FakeBackend(), FakeBackend()
    plain = make_client(plain_backend).post("/v1/chat/completions", json={"messages": MESSAGES})
    response = make_client(backend).post(
        "/v1/chat/completions", json={"messages": MESSAGES, field: IGNORED[field]}
    )
    assert response.status_code == 200, response.text
    assert backend.calls[0]["sampling_params"] == plain_backend.calls[0]["sampling_params"]
    assert backend.calls[0]["conversation"] == plain_backend.calls[0]["conversation"]
    assert response.json()["choices"] == plain.json()["choices"]


def test_unknown_fields_are_accepted_and_logged_once_per_name(caplog):
    client = make_client(FakeBackend())
    with caplog.at_level("WARNING", logger="cogvlm_ray.api.fields"):
        for _ in range(3):
            body = {"messages": MESSAGES, "x_field_from_a_framework": 1, "another_one": {"a": 1}}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    lines = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert sorted(lines) == sorted(
        f"chat.completions: ignoring unknown request field {name!r} (logged once per field name)"
        for name in ("x_field_from_a_framework", "another_one")
    )


def test_tool_conversations_render_in_the_tool_call_format():
    backend = FakeBackend()
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "user", "content": "and tomorrow?"},
    ]  # fmt: skip
    response = make_client(backend).post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 200, response.text
    conversation = backend.calls[0]["conversation"]
    call = '<tool_call>{"name": "weather", "arguments": {"city":"Paris"}}</tool_call>'
    assert conversation.history == [("weather in Paris?", call)]
    assert conversation.query == "Tool result (c1): 18 C, sunny\nand tomorrow?"


def test_legacy_function_messages_render_in_the_same_format():
    backend = FakeBackend()
    messages = [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": "{}"}},
        {"role": "function", "name": "now", "content": "12:00"},
    ]
    response = make_client(backend).post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 200, response.text
    conversation = backend.calls[0]["conversation"]
    assert conversation.history == [("time?", '<tool_call>{"name": "now", "arguments": {}}</tool_call>')]
    assert conversation.query == "Tool result (now): 12:00"
