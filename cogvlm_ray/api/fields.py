"""What each chat-completions request field does here: honoured, ignored, or refused (400).

Owns three things, in one place so they can be read (and edited) as a table:
  * `NOT_IMPLEMENTED`: fields that would change the output and that this server does not do
    (yet). Each row is (field, is-refused predicate, message); a request using one gets a 400
    `invalid_request_error` with code `unsupported_parameter` naming the field. `tools`,
    `tool_choice`, `response_format` and vLLM's `guided_*` are honoured by the structured-output
    code (`api/structured.py`, docs/structured-output.md), which gives its own 400s for bad shapes.
  * `IGNORED_FIELDS`: OpenAI fields accepted and ignored because they change nothing about the
    tokens generated here (storage, billing, routing hints, reasoning knobs of other models).
  * `warn_unknown_fields`: fields no schema declares are accepted and logged once per name
    per process (vLLM's behaviour), so a typo is visible in the logs without breaking clients.
The honoured fields are `ChatCompletionRequest`'s other fields; docs/serving.md has the
feature table (a test compares it with this module).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from cogvlm_ray.errors import InvalidRequestError

logger = logging.getLogger(__name__)

Refusal = tuple[str, Callable[[Any], bool], str]


def _modalities_refused(request: Any) -> bool:
    return any(m != "text" for m in request.modalities or ())


#: Fields that change the output and are not implemented. (field, refused?, message).
NOT_IMPLEMENTED: tuple[Refusal, ...] = (
    ("functions", lambda r: bool(r.functions), "the legacy functions field is not supported; use tools"),
    (
        "function_call",
        lambda r: r.function_call not in (None, "none", "auto"),
        "the legacy function_call field is not supported; use tool_choice",
    ),
    ("audio", lambda r: r.audio is not None, "audio output is not supported (CogVLM2 generates text)"),
    ("modalities", _modalities_refused, "only the 'text' output modality is supported"),
    ("web_search_options", lambda r: r.web_search_options is not None, "web search is not supported"),
)

#: OpenAI fields accepted and ignored (none of them changes the generated tokens here).
IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "reasoning_effort",
        "verbosity",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "moderation",
        "prediction",
    }
)
"""`prediction` (predicted outputs) only speeds up generation at OpenAI, never changes it, so
ignoring it keeps the answer the same; `reasoning_effort` / `verbosity` tune reasoning models."""


def check_implemented(request: Any) -> None:
    """InvalidRequestError (400, code `unsupported_parameter`) for the first refused field."""
    for name, refused, message in NOT_IMPLEMENTED:
        if refused(request):
            raise InvalidRequestError(f"{name}: {message}", param=name, code="unsupported_parameter")


_WARNED: set[str] = set()


def warn_unknown_fields(names: Iterable[str], where: str = "chat.completions") -> list[str]:
    """Log each field name once per process; returns the names logged now (for tests)."""
    fresh = sorted(set(names) - _WARNED)
    for name in fresh:
        _WARNED.add(name)
        logger.warning("%s: ignoring unknown request field %r (logged once per field name)", where, name)
    return fresh
