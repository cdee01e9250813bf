"""OpenAI request schema bounds and request <-> engine conversions (no HTTP)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cogvlm_ray.api import chat
from cogvlm_ray.api.protocol import MAX_MESSAGES, MAX_STOP_STRINGS, ChatCompletionRequest
from cogvlm_ray.api.responses import SSE_DONE, ChunkWriter, CompletionBuilder
from cogvlm_ray.contracts import RequestOutput
from cogvlm_ray.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from cogvlm_ray.preprocess.messages import Conversation
from tests.unit.api.openai_shapes import ChatCompletionChunk

USER = {"role": "user", "content": "hi"}


def request(**fields) -> ChatCompletionRequest:
    fields.setdefault("messages", [USER])
    return ChatCompletionRequest.model_validate(fields)


def test_text_and_image_parts_parse_once_into_the_conversation_for_the_preprocessor():
    body = request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
        ]
    )  # fmt: skip
    assert chat.to_conversation(body) == Conversation(
        query="What is it?", history=[], system="Be brief.", image_urls=["data:image/png;base64,AA"]
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"},
         {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]},
         {"role": "user", "content": "b"}],
    ],
)  # fmt: skip
def test_conversation_rules_apply_to_the_validated_request_like_to_plain_dicts(messages):
    from cogvlm_ray.preprocess.messages import parse_messages

    with pytest.raises(InvalidRequestError) as from_request:
        chat.to_conversation(request(messages=messages))
    with pytest.raises(InvalidRequestError) as from_dicts:
        parse_messages(messages)
    assert from_request.value.message == from_dicts.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [USER] * (MAX_MESSAGES + 1)},
        {"stop": ["s"] * (MAX_STOP_STRINGS + 1)},
        {"stop": [""]},
        {"temperature": float("nan")},
        {"top_p": float("inf")},
        {"repetition_penalty": 0},
        {"top_k": -2},
        {"max_tokens": -1},
        {"seed": 2**64},
        {"messages": [{"role": "user", "content": []}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
    ],
)
def test_schema_bounds_reject(fields):
    with pytest.raises(ValidationError):
        request(**fields)


def test_sampling_params_from_request_and_defaults():
    defaults = chat.ChatDefaults(max_tokens=50, temperature=0.7, top_p=0.9)
    params = chat.to_sampling_params(request(), defaults)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (50, 0.7, 0.9, 0)
    params = chat.to_sampling_params(
        request(max_completion_tokens=9, temperature=0, top_k=5, repetition_penalty=1.2, seed=3,
                stop=["a", "b"], stop_token_ids=[7], min_tokens=2, ignore_eos=True),
        defaults,
    )  # fmt: skip
    assert params.max_tokens == 9 and params.is_greedy and params.top_k == 5
    assert (params.repetition_penalty, params.seed, params.stop, params.stop_token_ids) == (
        1.2,
        3,
        ("a", "b"),
        (7,),
    )
    assert (params.min_tokens, params.ignore_eos) == (2, True)


def test_max_tokens_and_max_completion_tokens_must_agree():
    chat.check_supported(request(max_tokens=5, max_completion_tokens=5))
    with pytest.raises(InvalidRequestError) as info:
        chat.check_supported(request(max_tokens=5, max_completion_tokens=6))
    assert info.value.param == "max_completion_tokens"


@pytest.mark.parametrize("fields", [{"n": 1}, {"logprobs": False}, {"tool_choice": "none"}, {"tool_choice": "auto"},
                                    {"presence_penalty": 0.0}, {"response_format": {"type": "text"}}, {"tools": []},
                                    {"modalities": ["text"]}, {"function_call": "none"}])  # fmt: skip
def test_harmless_values_of_unsupported_fields_are_accepted(fields):
    chat.check_supported(request(**fields))


def test_model_name_resolution():
    assert chat.resolve_model_name(request(), ["a", "b"]) == "a"
    assert chat.resolve_model_name(request(model="b"), ["a", "b"]) == "b"
    with pytest.raises(ModelNotFoundError):
        chat.resolve_model_name(request(model="c"), ["a", "b"])


def _output(text: str, n: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [n], text, finish, num_prompt_tokens=10, num_generated_tokens=n)  # type: ignore[arg-type]


def test_chunk_writer_sequence_and_usage():
    writer = ChunkWriter("chatcmpl-1", "m", include_usage=True, created=5)
    events = (
        writer.role()
        + writer.delta(_output("a", 1))
        + writer.delta(_output("", 2))
        + writer.delta(_output("b", 3, "length"))
    )
    payloads = [json.loads(e[len("data: ") :]) for e in events.strip().split("\n\n")]
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads]
    assert [c.choices[0].delta.content if c.choices else None for c in chunks] == ["", "a", "b", None]
    assert [c.choices[0].finish_reason if c.choices else None for c in chunks] == [None, None, "length", None]
    assert chunks[-1].usage.model_dump() == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert payloads[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert all(p["usage"] is None for p in payloads[:-1])


def test_abort_is_reported_as_unavailable():
    with pytest.raises(ServiceUnavailableError):
        ChunkWriter("x", "m").delta(_output("", 1, "abort"))


def test_completion_body_and_error_event():
    builder = CompletionBuilder(1, logprobs=False)
    builder.add(_output("hel", 1))
    builder.add(_output("lo", 4, "stop"))
    body = builder.body("id", "m", 1)
    assert builder.is_complete
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"]["total_tokens"] == 14
    event = ChunkWriter.error(InvalidRequestError("bad", param="x"))
    assert event.endswith(SSE_DONE)
    assert json.loads(event.split("\n\n")[0][len("data: ") :])["error"]["param"] == "x"
