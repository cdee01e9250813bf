"""OpenAI structured-output fields -> specs, tool prompts, tool-call parsing and streaming (no model)."""

from __future__ import annotations

import json

import pytest

from cogvlm_ray.api.responses import ChunkWriter, CompletionBuilder
from cogvlm_ray.api.structured import TOOL_CALL_BEGIN, TOOL_CALL_END, structured_request
from cogvlm_ray.api.tool_calls import ToolCallStreamer, parse_output, render_tool_messages
from cogvlm_ray.contracts import RequestOutput
from cogvlm_ray.errors import InvalidRequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_response_formats_become_specs():
    assert structured_request(response_format={"type": "text"}).spec is None
    assert structured_request(response_format={"type": "json_object"}).spec.kind == "json_object"
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    spec = structured_request(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": schema, "strict": True},
        }
    ).spec
    assert spec.kind == "json_schema" and list(json.loads(spec.value)["properties"]) == ["b", "a"]
    assert structured_request(guided_regex="[0-9]+").spec.value == "[0-9]+"
    assert json.loads(structured_request(guided_choice=["a", "b"]).spec.value) == ["a", "b"]
    assert structured_request(guided_json=json.dumps(schema)).spec == spec


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
            "response_format.json_schema.schema",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_*"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": [1]}}, "tool_choice"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ],
)
def test_bad_structured_fields_are_400s(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        structured_request(**fields)
    assert info.value.status_code == 400 and info.value.param == param


def test_tool_specs_name_tools_in_their_errors():
    for choice in ("required", "auto"):
        assert structured_request(tools=[WEATHER], tool_choice=choice).spec.param == "tools"


def test_tool_choice_modes():
    forced = structured_request(tools=[WEATHER, TIME], tool_choice="required")
    schema = json.loads(forced.spec.value)
    assert forced.tool_mode == "forced" and [o["properties"]["name"]["const"] for o in schema["anyOf"]] == [
        "get_weather",
        "get_time",
    ]
    assert json.loads(forced.spec.value)["anyOf"][1]["properties"]["arguments"] == {
        "type": "object",
        "properties": {},
    }
    named = structured_request(
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}
    )
    assert json.loads(named.spec.value)["properties"]["name"] == {"const": "get_time"}
    auto = structured_request(tools=[WEATHER])
    assert (
        auto.tool_mode == "auto" and auto.spec.kind == "structural_tag" and TOOL_CALL_BEGIN in auto.spec.value
    )
    none = structured_request(tools=[WEATHER], tool_choice="none")
    assert none.spec is None and none.tool_mode == "none"
    with_format = structured_request(tools=[WEATHER], response_format={"type": "json_object"})
    assert with_format.spec.kind == "json_object" and with_format.tool_mode == "none" and with_format.tools


def test_tool_messages_render_into_alternating_turns():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "no rain"}]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    functions = structured_request(tools=[WEATHER]).tools
    out = render_tool_messages(messages, functions)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert "get_weather - Weather for a city" in out[0]["content"] and TOOL_CALL_BEGIN in out[0]["content"]
    assert (
        out[2]["content"]
        == f'{TOOL_CALL_BEGIN}{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}{TOOL_CALL_END}'
    )
    assert (
        out[3]["content"] == "Tool result (call_1): 18 C, sunny\nTool result (call_2): no rain\nAnd tomorrow?"
    )
    trailing = render_tool_messages(messages[:3], [])
    assert [m["role"] for m in trailing] == ["user", "assistant", "user"]


FORCED = '{"name": "get_weather", "arguments": {"city": "Par\\"is", "days": 2}}'


def test_parse_forced_and_auto_calls():
    parsed = parse_output(FORCED, "forced", "stop")
    assert parsed.content is None and parsed.finish_reason == "tool_calls"
    function = parsed.tool_calls[0]["function"]
    assert function["name"] == "get_weather" and json.loads(function["arguments"]) == {
        "city": 'Par"is',
        "days": 2,
    }
    assert parse_output(FORCED[:20], "forced", "length").content == FORCED[:20]
    auto = parse_output(f"Let me check. {TOOL_CALL_BEGIN}{FORCED}{TOOL_CALL_END}", "auto", "stop")
    assert auto.content == "Let me check. " and auto.finish_reason == "tool_calls"
    assert auto.tool_calls[0]["function"]["name"] == "get_weather"
    plain = parse_output("Just text.", "auto", "stop")
    assert plain.content == "Just text." and not plain.tool_calls and plain.finish_reason == "stop"


def stream(text: str, mode: str, finish_reason: str, size: int = 3):
    streamer = ToolCallStreamer(mode)
    deltas = []
    for i in range(0, len(text), size):
        deltas += streamer.feed(text[i : i + size])
    last, reason = streamer.finish(finish_reason)
    return deltas + last, reason


def test_forced_call_streams_name_then_argument_fragments():
    deltas, reason = stream(FORCED, "forced", "stop")
    assert reason == "tool_calls"
    first = deltas[0]["tool_calls"][0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["id"].startswith("call_")
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]]
    assert len(fragments) > 3 and all("content" not in d for d in deltas)
    assert "".join(fragments) == parse_output(FORCED, "forced", "stop").tool_calls[0]["function"]["arguments"]


def test_auto_streams_content_then_the_call():
    text = f"Let me check. {TOOL_CALL_BEGIN}{FORCED}{TOOL_CALL_END}"
    deltas, reason = stream(text, "auto", "stop", size=4)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert content == "Let me check. " and reason == "tool_calls" and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": 'Par"is', "days": 2}
    deltas, reason = stream("No <tool here, just <text>.", "auto", "stop")
    assert "".join(d["content"] for d in deltas) == "No <tool here, just <text>." and reason == "stop"


def test_to_conversation_renders_tools_and_tool_results():
    from cogvlm_ray.api.chat import structured_output, to_conversation
    from cogvlm_ray.api.protocol import ChatCompletionRequest

    long_tool = {"type": "function", "function": {"name": "f", "description": "d" * 70_000}}
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            "tools": [long_tool],
        }
    )  # fmt: skip
    conversation = to_conversation(body, structured_output(body).tools)
    assert (
        conversation.system.startswith("You can call these functions:") and len(conversation.system) > 70_000
    )
    assert conversation.history == [
        ("hi", f'{TOOL_CALL_BEGIN}{{"name": "f", "arguments": {{}}}}{TOOL_CALL_END}')
    ]
    assert conversation.query == "Tool result (c1): done"


def _outputs(text: str, index: int, size: int = 4) -> list[RequestOutput]:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    return [
        RequestOutput(
            request_id="r",
            new_text=piece,
            finish_reason="stop" if k == len(pieces) - 1 else None,
            num_prompt_tokens=9,
            num_generated_tokens=k + 1,
            num_cached_tokens=3,
            index=index,
        )
        for k, piece in enumerate(pieces)
    ]


def test_response_builders_carry_tool_calls_for_every_choice():
    """Issue 15's builders (n choices, usage with cached_tokens) with issue 16's tool calls."""
    auto = 'Sure. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    builder = CompletionBuilder(2, logprobs=False, tool_mode="forced")
    writer = ChunkWriter("id", "m", num_choices=2, include_usage=True, tool_mode="forced")
    events = writer.role()
    for output in [*_outputs(FORCED, 0), *_outputs(FORCED, 1)]:
        builder.add(output)
        events += writer.delta(output)
    body = builder.body("id", "m", created=0)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = choice["message"]["tool_calls"][0]["function"]
        assert (
            call["name"] == "get_weather" and json.loads(call["arguments"]) == json.loads(FORCED)["arguments"]
        )
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    chunks = [json.loads(e) for e in events.split("data: ")[1:]]
    for index in (0, 1):
        deltas = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        fragments = [
            d["delta"]["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d["delta"]
        ]
        assert (
            "".join(fragments) == body["choices"][index]["message"]["tool_calls"][0]["function"]["arguments"]
        )
        assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    auto_builder = CompletionBuilder(1, logprobs=False, tool_mode="auto")
    for output in _outputs(auto, 0):
        auto_builder.add(output)
    choice = auto_builder.body("id", "m")["choices"][0]
    assert choice["message"]["content"] == "Sure. " and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_time"
