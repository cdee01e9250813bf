"""Tool calls: tools and tool results into the prompt, generated calls back out (whole or streamed).

Prompt (CogVLM2 was not trained for tools, so this is plain text the grammar then enforces):
- the request's functions are described in a system message: one line per function (name,
  description, parameters schema as JSON) and the call format `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`;
- an assistant message with `tool_calls` becomes the assistant text of those calls in that
  format (after its content, if any);
- `role: "tool"` messages become user text `Tool result (<tool_call_id>): <content>`; tool
  results that follow one another, and a user message right after them, are joined (newline)
  into one user turn, so the conversation still alternates user / assistant.

Output:
- forced (`tool_choice` "required" or named): the whole output is one compact call
  `{"name": "f", "arguments": {...}}`; `arguments` is returned as the exact generated text of
  the object, and streamed as it is generated (name first, then argument fragments);
- auto: text before `<tool_call>` is the message content; the call inside the tags is parsed
  with `json.loads`; streamed content stops at the tag, and the call comes as one delta at the end.
A request with calls finishes with `finish_reason: "tool_calls"`; a forced call cut by
max_tokens keeps "length" and returns the partial text as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from cogvlm_ray.api.structured import TOOL_CALL_BEGIN, TOOL_CALL_END, ToolMode

_FORCED_PREFIX = re.compile(r'^\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def make_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "id": call_id or make_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


# ---- prompt ------------------------------------------------------------------------------------


def tools_system_text(functions: list[dict[str, Any]]) -> str:
    lines = ["You can call these functions:"]
    for f in functions:
        description = f" - {f['description']}" if f.get("description") else ""
        lines.append(
            f"{f['name']}{description}; parameters: {json.dumps(f['parameters'], ensure_ascii=False)}"
        )
    lines.append(
        f'To call one, answer with {TOOL_CALL_BEGIN}{{"name": <function name>, "arguments": <object>}}{TOOL_CALL_END}.'
    )
    return "\n".join(lines)


def _calls_text(tool_calls: list[dict[str, Any]]) -> str:
    parts = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments") or "{}"
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        parts.append(
            f'{TOOL_CALL_BEGIN}{{"name": {json.dumps(function.get("name", ""))}, "arguments": {arguments}}}{TOOL_CALL_END}'
        )
    return "".join(parts)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def render_tool_messages(
    messages: list[dict[str, Any]], functions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Messages with tools, tool calls and tool results turned into plain system/user/assistant text."""
    out: list[dict[str, Any]] = []
    if functions:
        out.append({"role": "system", "content": tools_system_text(functions)})
    pending_results: list[str] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id") or "?"
            pending_results.append(f"Tool result ({call_id}): {_text(message.get('content'))}")
            continue
        if pending_results:
            results = "\n".join(pending_results)
            pending_results = []
            if role == "user":
                message = {**message, "content": _join_user(results, message.get("content"))}
            else:
                out.append({"role": "user", "content": results})
        if role == "assistant" and message.get("tool_calls"):
            text = _text(message.get("content"))
            message = {
                "index": message.get("index", 0),
                "role": "assistant",
                "content": (text + " " if text else "") + _calls_text(message["tool_calls"]),
            }
        elif role == "assistant":
            message = {k: v for k, v in message.items() if k != "tool_calls"}
        out.append(message)
    if pending_results:
        out.append({"role": "user", "content": "\n".join(pending_results)})
    return out


def _join_user(results: str, content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": results}, *content]
    return f"{results}\n{content or ''}".rstrip("\n")


# ---- output ------------------------------------------------------------------------------------


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None


def parse_output(text: str, mode: ToolMode, finish_reason: str | None) -> ParsedOutput:
    """Split a finished generation into content and tool calls (OpenAI's message shape)."""
    if mode == "forced":
        match = _FORCED_PREFIX.match(text)
        if finish_reason != "stop" or match is None or not text.endswith("}"):
            return ParsedOutput(text, [], finish_reason)  # cut by max_tokens / a stop string
        call = _tool_call(json.loads(match.group(1)), text[match.end() : -1])
        return ParsedOutput(None, [call], "tool_calls")
    if mode == "auto" and TOOL_CALL_BEGIN in text:
        content, _, rest = text.partition(TOOL_CALL_BEGIN)
        body, closed, _ = rest.partition(TOOL_CALL_END)
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return ParsedOutput(text, [], finish_reason)
        if not closed or not isinstance(call, dict):
            return ParsedOutput(text, [], finish_reason)
        arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        return ParsedOutput(content or None, [_tool_call(call["name"], arguments)], "tool_calls")
    return ParsedOutput(text, [], finish_reason)


class ToolCallStreamer:
    """Turns streamed text deltas into OpenAI delta dicts (`content` and/or `tool_calls`).

    `feed(text)` returns the deltas to send now; `finish(finish_reason)` the last ones and the
    finish_reason to report. Joining the streamed pieces gives what `parse_output` returns.
    """

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self._sent = 0  # characters of `text` already sent (content or arguments)
        self._call_id = make_call_id()
        self._name_sent = False
        self._in_tag = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self.mode == "forced":
            return self._forced()
        if self.mode == "auto":
            return self._auto()
        return self._content(len(self.text))

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        parsed = parse_output(self.text, self.mode, finish_reason)
        if not parsed.tool_calls:
            if self._name_sent:  # a forced call cut short: the rest of its arguments, as generated
                return self._arguments(len(self.text)), parsed.finish_reason
            return self._content(len(self.text)), parsed.finish_reason
        if self.mode == "forced":
            return self._forced(), "tool_calls"
        call = {**parsed.tool_calls[0], "index": 0}
        deltas = self._content(self.text.index(TOOL_CALL_BEGIN)) if not self._in_tag else []
        return [*deltas, {"tool_calls": [call]}], "tool_calls"

    def _content(self, end: int) -> list[dict[str, Any]]:
        if end <= self._sent:
            return []
        piece, self._sent = self.text[self._sent : end], end
        return [{"content": piece}]

    def _arguments(self, end: int) -> list[dict[str, Any]]:
        if end <= self._sent:
            return []
        piece, self._sent = self.text[self._sent : end], end
        return [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}]

    def _forced(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if not self._name_sent:
            match = _FORCED_PREFIX.match(self.text)
            if match is None:
                return []
            self._name_sent, self._sent = True, match.end()
            name = json.loads(match.group(1))
            deltas.append(
                {"tool_calls": [{"index": 0, "id": self._call_id, "type": "function",
                                 "function": {"name": name, "arguments": ""}}]}
            )  # fmt: skip
        # Hold back the last character: it may be the "}" that closes the call, not the arguments.
        return deltas + self._arguments(len(self.text) - 1)

    def _auto(self) -> list[dict[str, Any]]:
        if self._in_tag:
            return []
        start = self.text.find(TOOL_CALL_BEGIN)
        if start != -1:
            self._in_tag = True
            return self._content(start)
        return self._content(len(self.text) - _partial_suffix(self.text, TOOL_CALL_BEGIN))


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
