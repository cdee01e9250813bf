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
from cogvlm_ray.contracts import RequestOutput, SamplingParams
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
        (bool(request.tools) or bool(request.functions), "tools", "tool / function calling is not supported"),
        (
            request.tool_choice not in (None, "none"),
            "tool_choice",
            "tool / function calling is not supported",
        ),
        (request.function_call not in (None, "none"), "function_call", "function calling is not supported"),
        (
            request.response_format is not None and request.response_format.type != "text",
            "response_format",
            "only response_format type 'text' is supported",
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


def to_conversation(request: ChatCompletionRequest) -> Conversation:
    """The typed conversation for the preprocessor ("developer" is a system message).

    The pydantic schema has already checked every message's shape; this applies the pairing
    rules once (`preprocess.messages.conversation_from_turns`), so nothing re-parses dicts.
    """
    return conversation_from_turns(_turn(index, message) for index, message in enumerate(request.messages))


def _turn(index: int, message: ChatMessage) -> Turn:
    role = "system" if message.role == "developer" else message.role
    if isinstance(message.content, str):
        return Turn(index, role, message.content)
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    urls = tuple(part.image_url.url for part in message.content if not isinstance(part, TextPart))
    return Turn(index, role, "\n".join(texts), urls)


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
    request_id: str, model: str, created: int, text: str, last: RequestOutput
) -> dict[str, Any]:
    """The non-streaming `chat.completion` response."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            }
        ],
        "usage": usage_dict(last),
    }


class ChunkWriter:
    """Builds the SSE events of one streamed completion.

    Sequence: a role chunk, content chunks, the last choice chunk carrying `finish_reason` (and
    only that one carries it), an optional usage chunk (`stream_options.include_usage`, empty
    `choices`), then `data: [DONE]`.
    """

    def __init__(self, request_id: str, model: str, *, include_usage: bool, created: int | None = None):
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created

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
        if output.finish_reason is not None:
            delta = {"content": output.new_text} if output.new_text else {}
            return self._chunk(delta, output.finish_reason) + self._usage(output)
        return self._chunk({"content": output.new_text}, None) if output.new_text else ""

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
