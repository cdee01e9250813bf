"""Pydantic schemas for the OpenAI-compatible HTTP API (the edge of the system).

Owns: the shape and the *bounds* of what a client may send to `POST /v1/chat/completions`,
`POST /tokenize` and `POST /detokenize` (message count, text length, stop strings, sampling
ranges, NaN/inf rejected). Every field of OpenAI's chat-completions request is declared here, so
a client built on the official SDK never meets "extra inputs are not permitted". What each field
does (honoured, ignored, refused with a 400) is `api/fields.py`'s table; a schema failure is a 400
`invalid_request_error` built by `api/validation.py` (never a 422). Fields nobody declared are
accepted (`extra="allow"` on the request) and logged once per name (`api/fields.py`), as vLLM does.

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
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_TOKENS_LIMIT = 1 << 20
"""Schema upper bound for max_tokens; the real limit is the context window (checked later, 400)."""
MAX_MODEL_NAME_CHARS = 256
MAX_TOOLS = 64
MAX_TOOL_CALLS = 16
MAX_GUIDED_CHOICES = 256
MAX_N = 128
"""Schema bound for n; the server's own limit (`EngineConfig.max_n`, default 8) is checked later."""
MAX_DETOKENIZE_IDS = 1 << 16


class _Part(BaseModel):
    """Nested objects: unknown keys are ignored (OpenAI adds some often), NaN/inf never pass."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Part):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class ImageURL(_Part):
    url: Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)]
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted for compatibility; CogVLM2 always sees the image at its one input size."""


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(_Part):
    """Part of an earlier assistant message (OpenAI's refusal content); rendered as its text."""

    type: Literal["refusal"]
    refusal: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class UnsupportedPart(_Part):
    """Audio and file parts parse, so the API can refuse them naming the part (`api/chat.py`)."""

    type: Literal["input_audio", "file"]


ContentPart = Annotated[TextPart | ImagePart | RefusalPart | UnsupportedPart, Field(discriminator="type")]


class ChatMessage(_Part):
    """One message. Assistant `tool_calls` and `tool` results are rendered into the prompt in
    the `<tool_call>` format the grammar enforces (`api/tool_calls.py`, docs/structured-output.md);
    `content` may be null only on an assistant message carrying tool_calls (checked in
    `api/chat.py`, naming `messages[i].content`)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
        | None
    ) = None
    name: Annotated[str, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOL_CALLS)] | None = None
    """Assistant messages: the calls it made (rendered into the prompt, api/tool_calls.py)."""
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    """Tool messages: which call this is the result of."""
    function_call: dict[str, Any] | None = None


class StreamOptions(_Part):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's extension: with include_usage, every chunk carries the usage so far."""
    include_obfuscation: bool | None = None
    """Accepted and ignored (OpenAI pads chunks against side channels; a self-hosted server does not)."""


class ResponseFormat(_Part):
    type: str
    json_schema: dict[str, Any] | None = None


StopStrings = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_STOP_STRINGS),
]


class ChatCompletionRequest(BaseModel):
    """The request body of `POST /v1/chat/completions`: OpenAI's fields plus vLLM-style extras
    (top_k, min_p, min_tokens, repetition_penalty, stop_token_ids, ignore_eos) and CogVLM2's
    `template_version` (base, chat or vqa). `api/fields.py` says what each one does."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | StopStrings | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)
        ]
        | None
    ) = None
    """Token id (as a string, OpenAI's JSON shape) -> bias added to its logit."""
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """Accepted; at most one call is generated per response."""
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted and ignored (they change nothing about the tokens this server generates).
    user: Annotated[str, Field(max_length=256)] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: Any = None
    # Extensions (vLLM names).
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    """-1 or 0 disables top-k (vLLM uses -1)."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    stop_token_ids: (
        Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None
    ) = None
    ignore_eos: bool = False
    template_version: Literal["base", "chat", "vqa"] | None = None
    # vLLM's structured-output extensions (api/structured.py, docs/structured-output.md).
    guided_json: str | dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    guided_choice: (
        Annotated[
            list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]], Field(max_length=MAX_GUIDED_CHOICES)
        ]
        | None
    ) = None


class TokenizeChatRequest(BaseModel):
    """`POST /tokenize` with chat messages: the ids the model would see (template and image
    positions included), as vLLM names it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)] | None = None
    template_version: Literal["base", "chat", "vqa"] | None = None
    add_generation_prompt: bool = True
    """Accepted for vLLM compatibility; CogVLM2's templates always end with the assistant cue."""


class TokenizeTextRequest(BaseModel):
    """`POST /tokenize` with a plain `prompt`: the tokenizer's ids (no template, no image)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DETOKENIZE_IDS)]
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)] | None = None
