"""Conversions between the OpenAI chat API and the engine, in both directions.

In:  `ChatCompletionRequest` -> checks for unsupported-but-meaningful fields (400), the model
     name (404), the `Conversation` for the preprocessor (parsed once, from the validated
     pydantic messages), and `SamplingParams` for the engine. Value ranges are pydantic's
     (`protocol.py`); the engine checks `SamplingParams` again on admission.
Out: `RequestOutput` deltas -> an OpenAI `chat.completion` body or `chat.completion.chunk`
     objects framed as Server-Sent Events (`data: {...}\\n\\n`, ending with `data: [DONE]`).

No I/O and no Ray here: `serve/ingress.py` drives these functions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cogvlm_ray.api.protocol import ChatCompletionRequest, ChatMessage, TextPart
from cogvlm_ray.api.structured import StructuredRequest, ToolMode, structured_request
from cogvlm_ray.api.tool_calls import ToolCallStreamer, parse_output, render_tool_messages
from cogvlm_ray.contracts import RequestOutput, SamplingParams, StructuredOutputSpec
from cogvlm_ray.errors import CogVLMError, InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from cogvlm_ray.preprocess.messages import Conversation, Turn, conversation_from_turns

SSE_DONE = "data: [DONE]\n\n"


_SAMPLING_DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class ChatDefaults:
    """Server-side defaults for fields a request leaves out (set from `AppArgs`); their own
    defaults are `SamplingParams`'s."""

    max_tokens: int = _SAMPLING_DEFAULTS.max_tokens
    temperature: float = _SAMPLING_DEFAULTS.temperature
    top_p: float = _SAMPLING_DEFAULTS.top_p
    top_k: int = _SAMPLING_DEFAULTS.top_k
    repetition_penalty: float = _SAMPLING_DEFAULTS.repetition_penalty


def make_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def check_supported(request: ChatCompletionRequest) -> None:
    """Raise InvalidRequestError (400) for fields that would change the answer and we cannot honour."""
    refusals: list[tuple[bool, str, str]] = [
        (request.n is not None and request.n != 1, "n", "n > 1 is not supported; send n separate requests"),
        (bool(request.logprobs), "logprobs", "logprobs are not supported"),
        (request.top_logprobs is not None, "top_logprobs", "top_logprobs are not supported"),
        (
            bool(request.presence_penalty),
            "presence_penalty",
            "presence_penalty is not supported; use repetition_penalty",
        ),
        (
            bool(request.frequency_penalty),
            "frequency_penalty",
            "frequency_penalty is not supported; use repetition_penalty",
        ),
        (bool(request.logit_bias), "logit_bias", "logit_bias is not supported"),
        (bool(request.functions), "functions", "the legacy functions field is not supported; use tools"),
        (
            request.function_call not in (None, "none"),
            "function_call",
            "the legacy function_call field is not supported; use tool_choice",
        ),
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
    ]
    for refused, param, message in refusals:
        if refused:
            raise InvalidRequestError(message, param=param, code="unsupported_parameter")


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

    The pydantic schema has already checked every message's shape; this applies the pairing
    rules once (`preprocess.messages.conversation_from_turns`), so nothing re-parses dicts.
    Tools, assistant tool calls and `tool` results are first rendered into plain text turns
    (`api/tool_calls.py`); a conversation without them takes the direct path.
    """
    for index, message in enumerate(request.messages):
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"messages[{index}]: a tool message needs tool_call_id",
                param=f"messages[{index}].tool_call_id",
            )
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise InvalidRequestError(
                f"messages[{index}].content is required (it may be null only for an assistant "
                "message with tool_calls)",
                param=f"messages[{index}].content",
            )
    if not tools and not any(m.role == "tool" or m.tool_calls for m in request.messages):
        return conversation_from_turns(
            _turn(index, message) for index, message in enumerate(request.messages)
        )
    dicts = [{**m.model_dump(exclude_none=True), "index": i} for i, m in enumerate(request.messages)]
    rendered = render_tool_messages(dicts, tools or [])
    return conversation_from_turns(_rendered_turn(m) for m in rendered)


def _rendered_turn(message: dict[str, Any]) -> Turn:
    """A Turn from a rendered message dict (content parts as `model_dump` wrote them). Not
    re-validated: the rendered tool text may exceed the per-message bound the client had to keep."""
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content") or ""
    if isinstance(content, str):
        return Turn(message.get("index", 0), role, content)
    texts = [part["text"] for part in content if part.get("type") == "text"]
    urls = tuple(part["image_url"]["url"] for part in content if part.get("type") == "image_url")
    return Turn(message.get("index", 0), role, "\n".join(texts), urls)


def _turn(index: int, message: ChatMessage) -> Turn:
    role = "system" if message.role == "developer" else message.role
    assert role != "tool", "tool messages are rendered as user text first"
    if message.content is None:
        return Turn(index, role, "")
    if isinstance(message.content, str):
        return Turn(index, role, message.content)
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    urls = tuple(part.image_url.url for part in message.content if not isinstance(part, TextPart))
    return Turn(index, role, "\n".join(texts), urls)


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


def usage_dict(output: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": output.num_prompt_tokens,
        "completion_tokens": output.num_generated_tokens,
        "total_tokens": output.num_prompt_tokens + output.num_generated_tokens,
    }


def check_not_aborted(output: RequestOutput) -> None:
    """An engine-side abort (shutdown, lost replica) is an error for the client, not a finish reason."""
    if output.finish_reason == "abort":
        raise ServiceUnavailableError(
            "generation was aborted by the server (replica shutting down); retry the request",
            code="aborted",
        )


def completion_body(
    request_id: str, model: str, created: int, text: str, last: RequestOutput, tool_mode: ToolMode = "none"
) -> dict[str, Any]:
    """The non-streaming `chat.completion` response (tool calls parsed out of the text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish_reason = last.finish_reason
    if tool_mode != "none":
        parsed = parse_output(text, tool_mode, finish_reason)
        message = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            message["tool_calls"] = parsed.tool_calls
        finish_reason = parsed.finish_reason
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_dict(last),
    }


class ChunkWriter:
    """Builds the SSE events of one streamed completion.

    Sequence: a role chunk, content chunks, the last choice chunk carrying `finish_reason` (and
    only that one carries it), an optional usage chunk (`stream_options.include_usage`, empty
    `choices`), then `data: [DONE]`. With tools, content and `tool_calls` deltas come from a
    `ToolCallStreamer` (api/tool_calls.py).
    """

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        include_usage: bool,
        created: int | None = None,
        tool_mode: ToolMode = "none",
    ):
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self.tools = ToolCallStreamer(tool_mode) if tool_mode != "none" else None

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> str:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return sse_event(chunk)

    def role(self) -> str:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, output: RequestOutput) -> str:
        """Events for one engine delta ('' when there is nothing to send yet)."""
        check_not_aborted(output)
        if self.tools is not None:
            return self._tool_delta(output)
        if output.finish_reason is not None:
            delta = {"content": output.new_text} if output.new_text else {}
            return self._chunk(delta, output.finish_reason) + self._usage(output)
        return self._chunk({"content": output.new_text}, None) if output.new_text else ""

    def _tool_delta(self, output: RequestOutput) -> str:
        assert self.tools is not None
        deltas = self.tools.feed(output.new_text) if output.new_text else []
        events = "".join(self._chunk(d, None) for d in deltas)
        if output.finish_reason is None:
            return events
        last, finish_reason = self.tools.finish(output.finish_reason)
        events += "".join(self._chunk(d, None) for d in last)
        return events + self._chunk({}, finish_reason) + self._usage(output)

    def _usage(self, last: RequestOutput) -> str:
        if not self.include_usage:
            return ""
        return sse_event(
            {
                "id": self.request_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_dict(last),
            }
        )

    @staticmethod
    def error(error: CogVLMError) -> str:
        """An error event mid-stream (headers are already sent, so the status stays 200), then DONE."""
        return sse_event(error.to_dict()) + SSE_DONE


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
