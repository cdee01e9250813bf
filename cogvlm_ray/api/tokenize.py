"""`POST /tokenize` and `POST /detokenize` (vLLM's names and shapes), without I/O.

Owns the request -> `TokenizeJob` conversion (chat `messages`, images included, or a plain
`prompt`), the plain result the preprocessing replica returns (`TokenizeResult`) and the
response bodies: `{"count", "max_model_len", "tokens", "token_strs": null}` and
`{"prompt": text}`. With messages, the ids are exactly the prompt the model would see: the
chat template and the image's positions (2,306 for CogVLM2's one 1344 px image: 2,304 patches
plus begin/end) are counted, so a client can plan around the context window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cogvlm_ray.api.chat import to_conversation
from cogvlm_ray.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeTextRequest,
)
from cogvlm_ray.preprocess.messages import Conversation


@dataclass(frozen=True)
class TokenizeJob:
    """What the preprocessing replica tokenizes: a conversation (templated) or a raw text."""

    conversation: Conversation | None = None
    template_version: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True


@dataclass(frozen=True)
class TokenizeResult:
    token_ids: list[int]
    max_model_len: int


def tokenize_request_model(raw: Any) -> type[TokenizeChatRequest] | type[TokenizeTextRequest]:
    """Messages or a prompt: the schema a `/tokenize` body is validated with."""
    return TokenizeChatRequest if isinstance(raw, dict) and "messages" in raw else TokenizeTextRequest


def to_job(body: TokenizeChatRequest | TokenizeTextRequest) -> TokenizeJob:
    if isinstance(body, TokenizeTextRequest):
        return TokenizeJob(prompt=body.prompt, add_special_tokens=body.add_special_tokens)
    chat = ChatCompletionRequest.model_construct(messages=body.messages)
    return TokenizeJob(conversation=to_conversation(chat), template_version=body.template_version)


def tokenize_body(result: TokenizeResult) -> dict[str, Any]:
    return {
        "count": len(result.token_ids),
        "max_model_len": result.max_model_len,
        "tokens": list(result.token_ids),
        "token_strs": None,
    }


def detokenize_body(text: str) -> dict[str, Any]:
    return {"prompt": text}


__all__ = [
    "DetokenizeRequest",
    "TokenizeJob",
    "TokenizeResult",
    "detokenize_body",
    "to_job",
    "tokenize_body",
    "tokenize_request_model",
]
