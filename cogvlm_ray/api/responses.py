"""Engine deltas -> OpenAI response bodies: `chat.completion` and `chat.completion.chunk` SSE events.

Owns the response shapes: one choice per `RequestOutput.index` (n > 1 interleaves choices in
one engine stream), OpenAI's `logprobs.content[]` entries (token, logprob, bytes,
top_logprobs), and `usage` with `prompt_tokens_details.cached_tokens` (prompt tokens served from
the prefix cache). Streaming sends, per choice, a role chunk, content chunks and one chunk with
`finish_reason`; with `stream_options.include_usage` a last chunk with empty `choices` carries
the usage, and with `continuous_usage_stats` too every chunk carries the usage so far (vLLM).
With tools (`tool_mode` "forced" or "auto", `api/structured.py`), each choice's text is split
into `content` and `tool_calls` by `api/tool_calls.py`: non-streamed in `message.tool_calls`,
streamed as `tool_calls` deltas (a `ToolCallStreamer` per choice); a choice with a call
finishes with `finish_reason: "tool_calls"`.

No I/O and no Ray: `serve/ingress.py` feeds these objects the deltas it reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cogvlm_ray.api.structured import ToolMode
from cogvlm_ray.api.tool_calls import ToolCallStreamer, parse_output
from cogvlm_ray.contracts import RequestOutput
from cogvlm_ray.errors import CogVLMError, ServiceUnavailableError

SSE_DONE = "data: [DONE]\n\n"


def check_not_aborted(output: RequestOutput) -> None:
    """An engine-side abort (shutdown, lost replica) is an error for the client, not a finish reason."""
    if output.finish_reason == "abort":
        raise ServiceUnavailableError(
            "generation was aborted by the server (replica shutting down); retry the request",
            code="aborted",
        )


def logprob_entries(output: RequestOutput) -> list[dict[str, Any]]:
    return [entry.as_openai() for entry in output.new_logprobs or ()]


@dataclass
class UsageCounter:
    """Token counts of one request over all its choices."""

    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def add(self, output: RequestOutput) -> None:
        self.num_prompt_tokens = output.num_prompt_tokens
        if output.index == 0:  # choice 0 prefilled the prompt; the others reuse its blocks
            self.num_cached_tokens = output.num_cached_tokens
        self.completion_tokens[output.index] = output.num_generated_tokens

    def as_dict(self) -> dict[str, Any]:
        completion = sum(self.completion_tokens.values())
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens},
        }


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


class CompletionBuilder:
    """Collects the deltas of a non-streamed request into the `chat.completion` body."""

    def __init__(self, num_choices: int, *, logprobs: bool, tool_mode: ToolMode = "none"):
        self.num_choices = num_choices
        self.logprobs = logprobs
        self.tool_mode = tool_mode
        self.choices = [_Choice() for _ in range(num_choices)]
        self.usage = UsageCounter()
        self.num_finished = 0

    @property
    def is_complete(self) -> bool:
        return self.num_finished >= self.num_choices

    def add(self, output: RequestOutput) -> None:
        check_not_aborted(output)
        choice = self.choices[output.index]
        choice.parts.append(output.new_text)
        choice.logprobs.extend(logprob_entries(output))
        self.usage.add(output)
        if output.finish_reason is not None and choice.finish_reason is None:
            choice.finish_reason = output.finish_reason
            self.num_finished += 1

    def body(self, request_id: str, model: str, created: int | None = None) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()) if created is None else created,
            "model": model,
            "choices": [self._choice(index, choice) for index, choice in enumerate(self.choices)],
            "usage": self.usage.as_dict(),
        }

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.parts)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish_reason = choice.finish_reason
        if self.tool_mode != "none":
            parsed = parse_output(text, self.tool_mode, finish_reason)
            message = {"role": "assistant", "content": parsed.content}
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
            finish_reason = parsed.finish_reason
        return {
            "index": index,
            "message": message,
            "logprobs": {"content": choice.logprobs, "refusal": None} if self.logprobs else None,
            "finish_reason": finish_reason,
        }


class ChunkWriter:
    """Builds the SSE events of one streamed completion (see the module docstring for the order)."""

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        num_choices: int = 1,
        include_usage: bool = False,
        continuous_usage: bool = False,
        logprobs: bool = False,
        created: int | None = None,
        tool_mode: ToolMode = "none",
    ):
        self.request_id = request_id
        self.model = model
        self.num_choices = num_choices
        self.include_usage = include_usage
        self.continuous_usage = include_usage and continuous_usage
        self.logprobs = logprobs
        self.created = int(time.time()) if created is None else created
        self.usage = UsageCounter()
        self.finished: set[int] = set()
        self.tools = (
            [ToolCallStreamer(tool_mode) for _ in range(num_choices)] if tool_mode != "none" else None
        )

    @property
    def is_complete(self) -> bool:
        return len(self.finished) >= self.num_choices

    def _chunk(
        self, index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: Any = None
    ) -> str:
        chunk: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            ],
        }
        if self.include_usage:
            chunk["usage"] = self.usage.as_dict() if self.continuous_usage else None
        return sse_event(chunk)

    def role(self, first: RequestOutput | None = None) -> str:
        """The first chunk of every choice (`first`, the first delta, gives the prompt's usage)."""
        if first is not None:
            self.usage.num_prompt_tokens = first.num_prompt_tokens
            self.usage.num_cached_tokens = first.num_cached_tokens
        return "".join(
            self._chunk(i, {"role": "assistant", "content": ""}, None) for i in range(self.num_choices)
        )

    def delta(self, output: RequestOutput) -> str:
        """Events for one engine delta ('' when there is nothing to send yet)."""
        check_not_aborted(output)
        self.usage.add(output)
        entries = logprob_entries(output)
        logprobs = {"content": entries, "refusal": None} if self.logprobs and entries else None
        if self.tools is not None:
            return self._tool_delta(output, logprobs)
        if output.finish_reason is not None:
            self.finished.add(output.index)
            delta = {"content": output.new_text} if output.new_text else {}
            events = self._chunk(output.index, delta, output.finish_reason, logprobs)
            return events + (self._usage() if self.is_complete else "")
        if not output.new_text and logprobs is None:
            return ""
        return self._chunk(output.index, {"content": output.new_text}, None, logprobs)

    def _tool_delta(self, output: RequestOutput, logprobs: Any) -> str:
        """Content and `tool_calls` deltas of one choice, from its `ToolCallStreamer`."""
        assert self.tools is not None
        streamer = self.tools[output.index]
        deltas = streamer.feed(output.new_text) if output.new_text else []
        finish_reason = None
        if output.finish_reason is not None:
            self.finished.add(output.index)
            last, finish_reason = streamer.finish(output.finish_reason)
            deltas = [*deltas, *last]
        events = ""
        for delta in deltas:
            events += self._chunk(output.index, delta, None, logprobs)
            logprobs = None  # the step's logprobs ride on its first chunk
        if logprobs is not None and finish_reason is None:
            events += self._chunk(output.index, {}, None, logprobs)
            logprobs = None
        if output.finish_reason is None:
            return events
        events += self._chunk(output.index, {}, finish_reason, logprobs)
        return events + (self._usage() if self.is_complete else "")

    def _usage(self) -> str:
        if not self.include_usage:
            return ""
        return sse_event(
            {
                "id": self.request_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage.as_dict(),
            }
        )

    @staticmethod
    def error(error: CogVLMError) -> str:
        """An error event mid-stream (headers are already sent, so the status stays 200), then DONE."""
        return sse_event(error.to_dict()) + SSE_DONE


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
