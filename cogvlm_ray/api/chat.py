"""Conversions from the OpenAI chat API to the engine's inputs.

`ChatCompletionRequest` -> refusals of fields we do not implement (`api/fields.py`, 400), the
cross-field rules (400), the model name (404), the `Conversation` for the preprocessor (parsed
once, from the validated pydantic messages; tools and tool messages rendered as `<tool_call>`
text by `api/tool_calls.py`), the structured-output spec (`api/structured.py`), and
`SamplingParams` for the engine. Value ranges are pydantic's (`protocol.py`); the engine checks
`SamplingParams` again on admission. The way back (deltas -> OpenAI bodies) is `api/responses.py`.

No I/O and no Ray here: `serve/ingress.py` drives these functions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cogvlm_ray.api.fields import check_implemented
from cogvlm_ray.api.protocol import ChatCompletionRequest, ChatMessage, ImagePart, RefusalPart, TextPart
from cogvlm_ray.api.structured import StructuredRequest, structured_request
from cogvlm_ray.api.tool_calls import render_tool_messages
from cogvlm_ray.contracts import SamplingParams, StructuredOutputSpec
from cogvlm_ray.errors import InvalidRequestError, ModelNotFoundError
from cogvlm_ray.preprocess.messages import Conversation, Turn, conversation_from_turns

_SAMPLING_DEFAULTS = SamplingParams()

#: Server limit on `n` when the app does not say (`EngineConfig.max_n`).
DEFAULT_MAX_N = 8


@dataclass(frozen=True)
class ChatDefaults:
    """Server-side defaults for fields a request leaves out (set from `AppArgs` and the
    checkpoint's generation_config.json); their own defaults are `SamplingParams`'s."""

    max_tokens: int = _SAMPLING_DEFAULTS.max_tokens
    temperature: float = _SAMPLING_DEFAULTS.temperature
    top_p: float = _SAMPLING_DEFAULTS.top_p
    top_k: int = _SAMPLING_DEFAULTS.top_k
    repetition_penalty: float = _SAMPLING_DEFAULTS.repetition_penalty


def make_request_id() -> str:
    """A fresh id for a request whose client sent no `x-request-id`."""
    return uuid.uuid4().hex


def check_supported(request: ChatCompletionRequest, max_n: int = DEFAULT_MAX_N) -> None:
    """Raise InvalidRequestError (400) for refused fields (`api/fields.py`) and cross-field rules."""
    check_implemented(request)
    rules: list[tuple[bool, str, str]] = [
        (
            request.stream_options is not None and not request.stream,
            "stream_options",
            "stream_options is only allowed together with stream=true",
        ),
        (
            request.max_tokens is not None
            and request.max_completion_tokens is not None
            and request.max_tokens != request.max_completion_tokens,
            "max_completion_tokens",
            "max_tokens and max_completion_tokens disagree; send one of them",
        ),
        (
            bool(request.top_logprobs) and not request.logprobs,
            "top_logprobs",
            "top_logprobs requires logprobs to be true",
        ),
        ((request.n or 1) > max_n, "n", f"n must be <= {max_n} on this server"),
    ]
    for broken, param, message in rules:
        if broken:
            raise InvalidRequestError(message, param=param)


def resolve_model_name(request: ChatCompletionRequest, served_model_names: Iterable[str]) -> str:
    """The served name this request targets (the first one when it names none); 404 if unknown."""
    names = list(served_model_names)
    if request.model is None:
        return names[0]
    if request.model not in names:
        raise ModelNotFoundError(
            f"The model '{request.model}' does not exist; this server serves {names}",
            param="model",
            code="model_not_found",
        )
    return request.model


def structured_output(request: ChatCompletionRequest) -> StructuredRequest:
    """The request's output constraint (response_format / tools / guided_*), 400 on bad shapes."""
    return structured_request(
        response_format=request.response_format.model_dump(exclude_none=True)
        if request.response_format
        else None,
        tools=request.tools,
        tool_choice=request.tool_choice,
        guided_json=request.guided_json,
        guided_regex=request.guided_regex,
        guided_choice=request.guided_choice,
    )


def to_conversation(
    request: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None
) -> Conversation:
    """The typed conversation for the preprocessor ("developer" is a system message).

    The pydantic schema has already checked every message's shape; this checks the per-message
    rules (content null only on an assistant message with tool calls, tool_call_id on tool
    messages, text and image parts only) and applies the pairing rules once
    (`preprocess.messages.conversation_from_turns`). Tools (`tools`, the request's function
    definitions), assistant tool calls and `tool` results are first rendered as text in the
    `<tool_call>` format the grammar enforces (`api/tool_calls.py`, docs/structured-output.md,
    "Tool calls"); a legacy `function` message is a tool result named by its `name`, a legacy
    `function_call` on an assistant message is one more call. A conversation without any of them
    takes the direct path.
    """
    needs_rendering = bool(tools)
    for index, message in enumerate(request.messages):
        where = f"messages[{index}]"
        has_calls = bool(message.tool_calls) or message.function_call is not None
        if message.content is None and not (message.role == "assistant" and has_calls):
            raise InvalidRequestError(
                f"{where}.content must be a string or a list of content parts (null only on an "
                "assistant message with tool_calls)",
                param=f"{where}.content",
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"{where}: a tool message needs tool_call_id", param=f"{where}.tool_call_id"
            )
        _content(message, where)  # refuses audio / file parts, naming them
        needs_rendering = needs_rendering or has_calls or message.role in ("tool", "function")
    if not needs_rendering:
        return conversation_from_turns(
            _turn(index, message) for index, message in enumerate(request.messages)
        )
    dicts = [_message_dict(index, message) for index, message in enumerate(request.messages)]
    rendered = render_tool_messages(dicts, tools or [])
    return conversation_from_turns(_rendered_turn(m) for m in rendered)


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as the tool renderer reads it (legacy function fields mapped onto tool ones)."""
    out = {**message.model_dump(exclude_none=True), "index": index}
    if message.role == "function":
        out["role"] = "tool"
        out["tool_call_id"] = message.name or "function"
    if message.function_call is not None:
        out["tool_calls"] = [*(message.tool_calls or ()), {"function": message.function_call}]
    return out


def _rendered_turn(message: dict[str, Any]) -> Turn:
    """A Turn from a rendered message dict (content parts as `model_dump` wrote them). Not
    re-validated: the rendered tool text may exceed the per-message bound the client had to keep."""
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content") or ""
    if isinstance(content, str):
        return Turn(message.get("index", 0), role, content)
    texts = [
        part["text"] if part.get("type") == "text" else part["refusal"]
        for part in content
        if part.get("type") in ("text", "refusal")
    ]
    urls = tuple(part["image_url"]["url"] for part in content if part.get("type") == "image_url")
    return Turn(message.get("index", 0), role, "\n".join(texts), urls)


def _turn(index: int, message: ChatMessage) -> Turn:
    text, urls = _content(message, f"messages[{index}]")
    return Turn(index, "system" if message.role == "developer" else message.role, text, urls)


def _content(message: ChatMessage, where: str) -> tuple[str, tuple[str, ...]]:
    if message.content is None:
        return "", ()
    if isinstance(message.content, str):
        return message.content, ()
    texts: list[str] = []
    urls: list[str] = []
    for part_index, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        elif isinstance(part, ImagePart):
            urls.append(part.image_url.url)
        else:
            raise InvalidRequestError(
                f"{where}.content[{part_index}]: {part.type} content parts are not supported "
                "(CogVLM2 reads text and images)",
                param=f"{where}.content[{part_index}].type",
                code="unsupported_parameter",
            )
    return "\n".join(texts), tuple(urls)


def _logit_bias(request: ChatCompletionRequest) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if token_id < 0:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}",
                param="logit_bias",
            )
        bias[token_id] = value
    return bias


def to_sampling_params(
    request: ChatCompletionRequest, defaults: ChatDefaults, structured: StructuredOutputSpec | None = None
) -> SamplingParams:
    """Engine sampling parameters. Ranges were checked by the schema; the one cross-field rule
    that depends on the server defaults (min_tokens <= max_tokens) is checked here."""
    max_tokens = request.max_completion_tokens or request.max_tokens or defaults.max_tokens
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    top_k = defaults.top_k if request.top_k is None else max(request.top_k, 0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=top_k,
        repetition_penalty=(
            defaults.repetition_penalty if request.repetition_penalty is None else request.repetition_penalty
        ),
        seed=request.seed,
        stop=stop,
        stop_token_ids=tuple(request.stop_token_ids or ()),
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=tuple(_logit_bias(request).items()),
        n=request.n or 1,
        logprobs=bool(request.logprobs),
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else 0,
        structured=structured,
    )
    if structured is not None and params.min_tokens:
        raise InvalidRequestError(
            "min_tokens cannot be combined with structured output (the grammar decides the end)",
            param="min_tokens",
        )
    if params.min_tokens > params.max_tokens:
        raise InvalidRequestError("min_tokens must be in [0, max_tokens]", param="min_tokens")
    return params
