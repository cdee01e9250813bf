"""Pydantic validation errors -> one OpenAI 400 (`invalid_request_error`), never a 422.

Owns the translation of pydantic's error list into a readable message and OpenAI's dotted
`param` (`messages[0].content`): pydantic's location tuples also name the union member or the
constraint that failed (`messages.0.content.constrained-str`, `function-after[...]`), which
mean nothing to a client, so those parts are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from cogvlm_ray.errors import InvalidRequestError

#: Location parts pydantic adds for union members and wrapped validators, e.g. "str",
#: "list[...]", "constrained-str", "function-after[...]", "tagged-union[...]", "int", "float".
_INTERNAL_PART = re.compile(
    r"^(str|int|float|bool|dict|list|none|constrained-\w+|[\w-]+\[.*\]|json-or-python\[.*\])$"
)


_PART_TAGS = frozenset({"text", "image_url", "refusal", "input_audio", "file"})


def dotted_param(loc: Sequence[Any]) -> str | None:
    """OpenAI's form of a pydantic location: ('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    out = ""
    names: list[Any] = []  # the parts kept so far
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, str) and _INTERNAL_PART.match(part):
            continue
        is_tag = isinstance(part, str) and part in _PART_TAGS
        if is_tag and len(names) >= 2 and names[-2] == "content" and isinstance(names[-1], int):
            names.append(None)  # a content part's discriminator tag, not a key
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
        names.append(part)
    return out or None


def _readable(detail: dict[str, Any]) -> str:
    kind = detail.get("type", "")
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    message = str(detail.get("msg", "is invalid"))
    return message[:1].lower() + message[1:]


def to_invalid_request(errors: Sequence[dict[str, Any]]) -> InvalidRequestError:
    """One 400 for pydantic's `errors()`: `param` names the first failing field.

    A union (string or list of parts) reports one error per member; those with the same dotted
    location are shown once, so `content: null` reads "messages[0].content: input should be a
    valid string" rather than three pydantic internals.
    """
    located = [(dotted_param(d.get("loc", ())) or "body", d) for d in errors]
    # A union reports every member's failure; a member's "wrong type" is noise when another
    # member got further (same or deeper location, other kind of error).
    specific = [
        (param, d)
        for param, d in located
        if not str(d.get("type", "")).endswith("_type")
        or not any(
            other is not d and not str(other.get("type", "")).endswith("_type") and p.startswith(param)
            for p, other in located
        )
    ]
    seen: dict[str, str] = {}
    for param, detail in specific:
        seen.setdefault(param, _readable(detail))
    if not seen:
        return InvalidRequestError("invalid request", code="validation_error")
    first = next(iter(seen))
    summary = "; ".join(f"{param}: {message}" for param, message in list(seen.items())[:5])
    return InvalidRequestError(
        f"invalid request: {summary}", param=None if first == "body" else first, code="validation_error"
    )
