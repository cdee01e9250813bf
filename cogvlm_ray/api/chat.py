"""Conversions from the OpenAI chat API to the engine's inputs.

`ChatCompletionRequest` -> refusals of fields we do not implement (`api/fields.py`, 400), the
cross-field rules (400), the model name (404), the `Conversation` for the preprocessor (parsed
once, from the validated pydantic messages; tool messages rendered as text), and
`SamplingParams` for the engine. Value ranges are pydantic's (`protocol.py`); the engine checks
`SamplingParams` again on admission. The way back (deltas -> OpenAI bodies) is `api/responses.py`.

No I/O and no Ray here: `serve/ingress.py` drives these functions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cogvlm_ray.api.fields import check_implemented
from cogvlm_ray.api.protocol import ChatCompletionRequest, ChatMessage, ImagePart, RefusalPart, TextPart
from cogvlm_ray.contracts import SamplingParams
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


def to_conversation(request: ChatCompletionRequest) -> Conversation:
    """The typed conversation for the preprocessor ("developer" is a system message).

    The pydantic schema has already checked every message's shape; this renders tool messages
    as text and applies the pairing rules once (`preprocess.messages.conversation_from_turns`).
    Tool rendering (docs/serving.md, "Tool messages"): an assistant message's `tool_calls` are
    appended to its text as `Tool call <id>: <name>(<arguments>)` lines; a `tool` (or legacy
    `function`) message becomes user text `Tool result (<tool_call_id or name>): <content>`,
    joined with adjacent tool results and the user message that follows into one user turn.
    """
    turns: list[tuple[Turn, bool]] = []  # (turn, is a tool result)
    for index, message in enumerate(request.messages):
        turn = _turn(index, message)
        is_tool = message.role in ("tool", "function")
        if turns and turn.role == "user" and turns[-1][0].role == "user" and (is_tool or turns[-1][1]):
            previous, _ = turns.pop()
            turn = Turn(
                previous.index,
                "user",
                "\n".join(t for t in (previous.text, turn.text) if t),
                previous.image_urls + turn.image_urls,
            )
            is_tool = True
        turns.append((turn, is_tool))
    return conversation_from_turns(turn for turn, _ in turns)


def _turn(index: int, message: ChatMessage) -> Turn:
    where = f"messages[{index}]"
    has_calls = bool(message.tool_calls) or message.function_call is not None
    if message.content is None and not (message.role == "assistant" and has_calls):
        raise InvalidRequestError(
            f"{where}.content must be a string or a list of content parts (null only on an "
            "assistant message with tool_calls)",
            param=f"{where}.content",
        )
    text, urls = _content(message, where)
    if message.role == "assistant":
        calls = [_render_call(call) for call in message.tool_calls or ()]
        if message.function_call is not None:
            calls.append(_render_call({"function": message.function_call}))
        return Turn(index, "assistant", "\n".join(t for t in (text, *calls) if t), urls)
    if message.role in ("tool", "function"):
        source = message.tool_call_id or message.name or message.role
        return Turn(index, "user", f"Tool result ({source}): {text}", urls)
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


def _render_call(call: dict[str, Any]) -> str:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    name = function.get("name", "?")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"Tool call {call.get('id', '')}: {name}({arguments})".replace("call :", "call:")


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


def to_sampling_params(request: ChatCompletionRequest, defaults: ChatDefaults) -> SamplingParams:
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
    )
    if params.min_tokens > params.max_tokens:
        raise InvalidRequestError("min_tokens must be in [0, max_tokens]", param="min_tokens")
    return params
