"""Boundary types: the dataclasses that cross between preprocess, engine, serve and API.

Torch-free (numpy only), so the ingress and the preprocessing replica can import them without
paying for torch. Each arrow of the data path in `engine/__init__.py` that leaves one package
for another is one of these:

    PreparedPrompt   preprocess -> engine (through Ray's object store)
    SamplingParams   api -> engine
    RequestOutput    engine -> serve/api (streamed deltas)

plus `FinishReason`, the token-type constants shared by the prompt builder and the model, and
`check_context_window`, the one context-length check (preprocessor early, engine on admission).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cogvlm_ray.errors import InvalidRequestError, PromptTooLongError

#: `token_type_ids` values: language tokens, and the image span (boi, patches, eoi).
LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: list[int]
    """Full prompt: [bos] + [placeholder] * num_image_tokens + text ids."""
    token_type_ids: list[int]
    """0 = language, 1 = vision (boi, patches, eoi), same length as input_ids."""
    image: np.ndarray | None
    """Resized RGB image, uint8 [3, S, S] (channels first), not normalised; None for text-only."""
    image_hash: str | None
    """Content hash, the image-cache key; None for text-only. The preprocessor uses
    `images.content_hash` (encoded bytes + target size: equal hashes mean equal pixels, and it
    is cheaper than hashing 5.4 MB of pixels); `images.pixel_hash` hashes an array directly."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def has_image(self) -> bool:
        return self.image is not None


FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. The defaults here are the only ones: the API's `ChatDefaults`
    and the Serve args (`default_max_tokens`, ...) start from them."""

    max_tokens: int = 1024
    temperature: float = 1.0
    """0 (or below 1e-5) means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids on top of the checkpoint's eos ids."""
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise InvalidRequestError for values the engine cannot honour."""
        checks = [
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be >= 1"),
            (
                math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
                "temperature",
                "temperature must be a finite number in [0, 2]",
            ),
            (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "top_k must be >= 0 (0 disables it)"),
            (
                math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
                "repetition_penalty",
                "repetition_penalty must be in (0, 10]",
            ),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "min_tokens must be in [0, max_tokens]"),
            (self.n == 1, "n", "n > 1 is not supported"),
            (not self.logprobs, "logprobs", "logprobs are not supported yet"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)


@dataclass
class RequestOutput:
    """One streamed delta for one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    """Total generated so far (including this delta)."""
    arrival_time: float = 0.0
    """time.monotonic() when the engine received the request."""
    first_scheduled_time: float | None = None
    """When the request left the waiting queue (queue time = this - arrival)."""
    first_token_time: float | None = None
    """When the first output token was produced (TTFT = this - arrival)."""
    emit_time: float = 0.0
    """When this delta was produced (ITL = differences between consecutive deltas)."""
    image_cache_hit: bool | None = None
    """For image requests: whether the vision tower was skipped; None for text-only."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta carrying both: `first`'s tokens and text followed by `later`'s.

    Used to send several engine steps' tokens in one message (serve/streaming.py); the timing
    marks that describe the request's start come from `first`, the rest from `later`.
    """
    return RequestOutput(
        request_id=later.request_id,
        new_token_ids=first.new_token_ids + later.new_token_ids,
        new_text=first.new_text + later.new_text,
        finish_reason=later.finish_reason,
        num_prompt_tokens=later.num_prompt_tokens,
        num_generated_tokens=later.num_generated_tokens,
        arrival_time=first.arrival_time,
        first_scheduled_time=first.first_scheduled_time
        if first.first_scheduled_time is not None
        else later.first_scheduled_time,
        first_token_time=first.first_token_time
        if first.first_token_time is not None
        else later.first_token_time,
        emit_time=later.emit_time,
        image_cache_hit=first.image_cache_hit if first.image_cache_hit is not None else later.image_cache_hit,
    )


def check_context_window(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """PromptTooLongError (400) when prompt + max_tokens exceeds `max_model_len`.

    The one wording of this refusal: the preprocessor applies it early (with the engine's
    `max_model_len`), the engine again on admission.
    """
    requested = num_prompt_tokens + max_tokens
    if requested > max_model_len:
        raise PromptTooLongError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{requested} tokens ({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )
