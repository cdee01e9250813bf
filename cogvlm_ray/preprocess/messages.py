"""OpenAI chat messages -> one CogVLM2 `Conversation` (query, history, system, image references).

Owns the rules (docs/preprocessing.md has the full list):
  * `user` / `assistant` messages alternate into (query, response) pairs; the last is `user`.
  * Content is a string or a list of `text` / `image_url` parts; text parts of one message are
    joined with a newline. Images are only accepted in `user` messages.
  * `system` (and its newer alias `developer`) messages may appear anywhere; their texts are
    joined with a newline and used once: in a text-only `chat` conversation they replace the
    default preamble; otherwise they prefix the first user turn, separated by a space.
  * Text-only `chat` conversations get the model card's preamble on the first turn
    (`<preamble> USER: {q} ASSISTANT:`) and `USER: {q} ASSISTANT:` on later turns; the history
    goes through the chat template once (not duplicated as in the official CLI demo).
Image bytes are not fetched here: the caller resolves `image_urls` (one-image rule included).

The serving path parses once: the API builds `Turn`s from its validated pydantic request and
calls `conversation_from_turns` (`api/chat.py`); the `Conversation` goes to the preprocessor.
`parse_messages` is the same for plain dicts (library callers, tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from cogvlm_ray.errors import InvalidRequestError

#: The seed model card's text-only template.
TEXT_ONLY_PREAMBLE = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class Conversation:
    """Messages reduced to what the template needs (before text-only/system wrapping).

    The one object the ingress sends to the preprocessing replica for a chat request.
    """

    query: str
    history: list[tuple[str, str]]
    system: str | None
    image_urls: list[str] = field(default_factory=list)
    """Every image_url in the conversation, in order (duplicates included)."""


@dataclass(frozen=True)
class Turn:
    """One message, already shape-checked: its role, its text parts joined, its image URLs."""

    index: int
    """Position in the request's `messages` (for error messages)."""
    role: Literal["system", "user", "assistant"]
    text: str
    image_urls: tuple[str, ...] = ()


def conversation_from_turns(turns: Iterable[Turn]) -> Conversation:
    """Apply the pairing rules: system texts joined, user/assistant alternating, user last."""
    system_texts: list[str] = []
    pairs: list[tuple[str, str]] = []  # (role, text)
    image_urls: list[str] = []
    for turn in turns:
        if turn.image_urls and turn.role != "user":
            raise InvalidRequestError(
                f"messages[{turn.index}]: images are only accepted in user messages", param="messages"
            )
        if turn.role == "system":
            system_texts.append(turn.text)
            continue
        expected = "user" if not pairs or pairs[-1][0] == "assistant" else "assistant"
        if turn.role != expected:
            raise InvalidRequestError(
                f"messages[{turn.index}] is {turn.role!r} but {expected!r} was expected: "
                "user and assistant messages must alternate, starting with user",
                param="messages",
            )
        image_urls.extend(turn.image_urls)
        pairs.append((turn.role, turn.text))
    if not pairs or pairs[-1][0] != "user":
        raise InvalidRequestError("the last non-system message must be from the user", param="messages")
    history = [(pairs[i][1], pairs[i + 1][1]) for i in range(0, len(pairs) - 1, 2)]
    system = "\n".join(t for t in system_texts if t) or None
    return Conversation(query=pairs[-1][1], history=history, system=system, image_urls=image_urls)


def parse_messages(messages: list[dict[str, Any]]) -> Conversation:
    """Validate OpenAI messages given as plain dicts and pair them into turns."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    turns: list[Turn] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{index}] must be an object", param="messages")
        role = message.get("role")
        if role in _SYSTEM_ROLES:
            role = "system"
        elif role not in ("user", "assistant"):
            raise InvalidRequestError(
                f"messages[{index}].role {role!r} is not supported (use system, user or assistant)",
                param="messages",
            )
        image_urls: list[str] = []
        text = _content_text(message.get("content"), index, image_urls=image_urls)
        turns.append(Turn(index, role, text, tuple(image_urls)))
    return conversation_from_turns(turns)


def apply_conversation_rules(
    conversation: Conversation, *, has_image: bool, template_version: str
) -> tuple[str, list[tuple[str, str]]]:
    """(query, history) to hand to the template, after the text-only and system rules."""
    turns = [q for q, _ in conversation.history] + [conversation.query]
    responses = [r for _, r in conversation.history]
    if not has_image and template_version == "chat":
        preamble = conversation.system if conversation.system is not None else TEXT_ONLY_PREAMBLE
        turns = [f"USER: {q} ASSISTANT:" for q in turns]
        turns[0] = f"{preamble} {turns[0]}"
    elif conversation.system is not None:
        turns[0] = f"{conversation.system} {turns[0]}"
    return turns[-1], list(zip(turns[:-1], responses, strict=True))


def _content_text(content: Any, index: int, *, image_urls: list[str]) -> str:
    """The message's text parts joined; its image URLs go to `image_urls` (the role rule for
    images is `conversation_from_turns`'s)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{index}].content must be a string or a list of content parts", param="messages"
        )
    texts: list[str] = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        if not isinstance(part, dict):
            raise InvalidRequestError(f"{where} must be an object", param="messages")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequestError(f"{where}.text must be a string", param="messages")
            texts.append(text)
        elif kind == "image_url":
            image_urls.append(_image_url(part.get("image_url"), where))
        else:
            raise InvalidRequestError(
                f"{where}.type {kind!r} is not supported (use text or image_url)", param="messages"
            )
    return "\n".join(texts)


def _image_url(value: Any, where: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(f"{where}.image_url.url must be a non-empty string", param="messages")
    return url
