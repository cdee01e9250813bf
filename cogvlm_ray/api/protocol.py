"""Pydantic schemas for the OpenAI-compatible HTTP API (the edge of the system).

Owns: the shape and the *bounds* of what a client may send to `POST /v1/chat/completions`
(message count, text length, stop strings, sampling ranges, NaN/inf rejected). A request that
fails these schemas is a 422. Responses are built as plain dicts in `api/chat.py` (per chunk,
without a pydantic round trip); the tests check them against OpenAI-shaped models. Fields that parse but ask for
something we do not support (n > 1, tools, logprobs, ...) are checked in `api/chat.py` and give a
400, so nothing a client asks for is ever silently ignored. Unknown fields are rejected (422).

Does not own: turning a request into engine inputs (`api/chat.py`), HTTP status mapping
(`serve/ingress.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Bounds of one request. Generous for real use, small enough that one request cannot pin a
#: replica. The body-size limit (413) is configured per app (`AppArgs.max_request_bytes`).
MAX_MESSAGES = 128
MAX_CONTENT_PARTS = 16
MAX_TEXT_CHARS = 65_536
MAX_IMAGE_URL_CHARS = 32 * 1024 * 1024
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_STOP_TOKEN_IDS = 16
MAX_TOKENS_LIMIT = 1 << 20
"""Schema upper bound for max_tokens; the real limit is the context window (checked later, 400)."""
MAX_MODEL_NAME_CHARS = 256
MAX_TOOLS = 64
MAX_TOOL_CALLS = 16
MAX_GUIDED_CHOICES = 256


class _Strict(BaseModel):
    """Unknown keys are a 422 and NaN/inf never reach the engine."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class ImageURL(_Strict):
    url: Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)]
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted for compatibility; CogVLM2 always sees the image at its one input size."""


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
        | None
    )
    """None only for an assistant message that carries `tool_calls` (checked in api/chat.py)."""
    name: Annotated[str, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOL_CALLS)] | None = None
    """Assistant messages: the calls it made (rendered into the prompt, api/tool_calls.py)."""
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    """Tool messages: which call this is the result of."""


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: str
    json_schema: dict[str, Any] | None = None


StopStrings = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_STOP_STRINGS),
]


class ChatCompletionRequest(_Strict):
    """The request body of `POST /v1/chat/completions`.

    Supported: messages (text and image_url parts; tool calls and tool results), model,
    max_tokens / max_completion_tokens, temperature, top_p, top_k, min_tokens, repetition_penalty,
    seed, stop, stop_token_ids, ignore_eos, stream, stream_options, template_version (CogVLM2's
    prompt template: base, chat or vqa), and structured output: response_format (text,
    json_object, json_schema), tools + tool_choice, guided_json / guided_regex / guided_choice. The remaining fields exist so that a client asking for them gets a clear 400 from
    `api/chat.py` instead of a silently different answer.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 0
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    """-1 or 0 disables top-k (vLLM uses -1)."""
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | StopStrings | None = None
    stop_token_ids: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None
    ) = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    template_version: Literal["base", "chat", "vqa"] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    """Accepted and ignored (OpenAI uses it for abuse tracking only)."""

    # Fields we parse only to refuse them with a 400 when they would change the answer.
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """Accepted; at most one call is generated per response."""
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions (api/structured.py).
    guided_json: str | dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    guided_choice: (
        Annotated[
            list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]], Field(max_length=MAX_GUIDED_CHOICES)
        ]
        | None
    ) = None
