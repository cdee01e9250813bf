"""Structured output end to end with the official `openai` client: the real ingress app, the real
preprocessor and engine on the random tiny model, in one process (no Ray), sampling at temperature 1.

The `openai` client talks to the FastAPI app through Starlette's TestClient (an httpx.Client), so
requests go through the real schema, the API conversions, the preprocessor's prompt and the
engine's grammar; whatever validity the answers have comes from the grammar.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Literal

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.engine import Engine, EngineConfig
from cogvlm_ray.model import load_model
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.preprocess.preprocessor import Preprocessor
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from cogvlm_ray.serve.metrics import Metrics

MODEL = "cogvlm2-tiny"
MESSAGES = [{"role": "user", "content": "What is on the receipt?"}]

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["C", "F"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_PARAMETERS},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


class LocalBackend:
    """The ingress's backend contract over an in-process Preprocessor + Engine."""

    def __init__(self, preprocessor: Preprocessor, engine: Engine) -> None:
        self.preprocessor = preprocessor
        self.engine = engine
        self.prompts: list[list[int]] = []

    async def check_ready(self) -> None:
        return None

    async def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        prepared = self.preprocessor.prepare(
            conversation, max_tokens=sampling_params.max_tokens, template_version=template_version
        )
        self.prompts.append(prepared.input_ids)
        async for output in self.engine.add_request(prepared, sampling_params, request_id):
            yield output


@pytest.fixture(scope="module")
def backend(fixture_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    engine = Engine(load_model(fixture_dir, dtype=torch.float32), tokenizer, EngineConfig(max_kv_tokens=8192))
    return LocalBackend(Preprocessor(fixture_dir, tokenizer), engine)


@pytest.fixture(scope="module")
def client(backend):
    app = create_app(backend, IngressSettings(served_model_names=(MODEL,)), Metrics())
    with TestClient(app) as http:  # one event loop for the module: the engine lives on it
        yield openai.OpenAI(
            base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
        )


def sampled(**kwargs):
    return {"model": MODEL, "messages": MESSAGES, "temperature": 1.0, "max_tokens": 96, **kwargs}


class Receipt(BaseModel):
    shop: str = Field(max_length=8)
    total_cents: int = Field(ge=0, le=99999)
    currency: Literal["EUR", "USD"]
    items: list[Literal["food", "drink", "other"]] = Field(min_length=1, max_length=3)


def test_parse_with_a_pydantic_model(client):
    for seed in range(3):
        completion = client.beta.chat.completions.parse(**sampled(seed=seed), response_format=Receipt)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Receipt), message.content
        jsonschema.validate(json.loads(message.content, strict=True), Receipt.model_json_schema())


def test_json_schema_and_json_object_response_formats(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "flag", "schema": schema, "strict": True},
    }
    reply = client.chat.completions.create(**sampled(seed=1), response_format=response_format)
    jsonschema.validate(json.loads(reply.choices[0].message.content, strict=True), schema)
    reply = client.chat.completions.create(
        **sampled(seed=1, max_tokens=8), response_format={"type": "json_object"}
    )
    assert reply.choices[0].message.content.startswith("{")
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_forced_tool_calls_validate(client):
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_weather"}}]):
        reply = client.chat.completions.create(**sampled(seed=seed), tools=TOOLS, tool_choice=choice)
        chosen = reply.choices[0]
        assert chosen.finish_reason == "tool_calls" and chosen.message.content is None
        [call] = chosen.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments, strict=True)
        if call.function.name == "get_weather":
            jsonschema.validate(arguments, WEATHER_PARAMETERS)
        else:
            assert choice == "required" and arguments == {}


def test_forced_tool_call_streams_as_deltas(client):
    stream = client.chat.completions.create(
        **sampled(seed=3),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert len(calls) > 2  # the arguments arrive in pieces
    arguments = "".join(c.function.arguments or "" for c in calls)
    jsonschema.validate(json.loads(arguments, strict=True), WEATHER_PARAMETERS)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "tool_calls" and not any(reasons[:-1])
    assert not any(d.content for d in deltas)


def test_auto_answers_in_text_with_the_tools_in_the_prompt(client, backend):
    plain = client.chat.completions.create(**sampled(seed=4, max_tokens=12))
    auto = client.chat.completions.create(**sampled(seed=4, max_tokens=12), tools=TOOLS)
    chosen = auto.choices[0]
    # The random model never opens <tool_call>, so the grammar leaves the text free: a text answer.
    assert chosen.message.tool_calls is None and chosen.finish_reason in ("stop", "length")
    assert isinstance(chosen.message.content, str)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # tools described in the prompt
    tokenizer = backend.preprocessor.tokenizer
    assert "get_weather" in tokenizer.decode(backend.prompts[-1]) and "<tool_call>" in tokenizer.decode(
        backend.prompts[-1]
    )


def test_tool_results_in_the_history(client, backend):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:30"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0.0)
    assert reply.choices[0].finish_reason == "length"
    prompt = backend.preprocessor.tokenizer.decode(backend.prompts[-1])
    assert 'Answer: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>' in prompt
    assert "Tool result (call_1): 12:30" in prompt
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "response_format.json_schema.schema"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "oops"}}}],
          "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_invalid_schemas_are_400s_and_the_server_goes_on(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**sampled(seed=0), **fields)
    assert info.value.status_code == 400 and info.value.body["param"] == param
    reply = client.chat.completions.create(**sampled(seed=0, max_tokens=3))
    assert reply.choices[0].finish_reason == "length"


def test_guided_choice_extension(client):
    reply = client.chat.completions.create(
        **sampled(seed=2), extra_body={"guided_choice": ["receipt", "invoice"]}
    )
    assert reply.choices[0].message.content in ("receipt", "invoice")
    assert reply.choices[0].finish_reason == "stop"
