"""Boundary types: the dataclasses that cross between preprocess, engine, serve and API.

Torch-free (numpy only), so the ingress and the preprocessing replica can import them without
paying for torch. Each arrow of the data path in `engine/__init__.py` that leaves one package
for another is one of these:

    PreparedPrompt   preprocess -> engine (through Ray's object store)
    SamplingParams   api -> engine (with its optional StructuredOutputSpec)
    RequestOutput    engine -> serve/api (streamed deltas)

plus `FinishReason`, the token-type constants shared by the prompt builder and the model, and
`check_context_window`, the one context-length check (preprocessor early, engine on admission).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "structural_tag"]


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What a constrained request's output must match (engine/structured/ compiles it).

    `value` is canonical text, so equal specs are equal strings and share one compiled grammar:
    json_schema / structural_tag: JSON text (sorted keys); regex: the pattern; choice: a JSON
    list of the allowed strings; json_object: "" (any JSON object).
    """

    kind: StructuredKind
    value: str = ""
    param: str | None = field(default=None, compare=False)
    """The request field it came from, named by errors (default: by kind)."""

    @property
    def cache_key(self) -> tuple[str, str]:
        return (self.kind, self.value)


#: OpenAI's bounds: top_logprobs per token, |logit_bias| values, |presence/frequency_penalty|.
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_OPENAI_PENALTY = 2.0
#: What a -inf logprob is reported as (JSON has no infinity).
OPENAI_MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (all its choices; order of the transforms: docs/engine.md).
    The defaults here are the only ones: the API's `ChatDefaults` and the Serve args
    (`default_max_tokens`, ...) start from them."""

    max_tokens: int = 1024
    temperature: float = 1.0
    """0 (or below 1e-5) means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    """Drop tokens below min_p x the top token's probability (0 disables it)."""
    repetition_penalty: float = 1.0
    """HF rule, over prompt + generated tokens (1 disables it)."""
    presence_penalty: float = 0.0
    """OpenAI rule, over generated tokens: subtracted once from every token generated so far."""
    frequency_penalty: float = 0.0
    """OpenAI rule, over generated tokens: subtracted once per occurrence so far."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits; a mapping {id: bias} is accepted and converted
    (string keys such as OpenAI's {"50256": -100} become ints).
    Ids are checked against the vocabulary by the engine (`engine/validation.py`)."""
    seed: int | None = None
    """Reproducible sampling: the same seed gives the same tokens whatever the batch.
    With n > 1, choice i uses seed + i (mod 2**64)."""
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop ids on top of the checkpoint's eos ids."""
    min_tokens: int = 0
    ignore_eos: bool = False
    n: int = 1
    """Choices per request: the prompt is prefilled once, the choices are sampled independently."""
    logprobs: bool = False
    """Return each generated token's logprob (RequestOutput.new_logprobs)."""
    top_logprobs: int = 0
    """With logprobs: also the this many most likely tokens per position (0..20)."""

    structured: StructuredOutputSpec | None = None
    """Grammar the output must match (JSON mode, JSON schema, regex, choice, tool calls)."""

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, Mapping):  # OpenAI's JSON form: {"token id": bias}
            pairs = tuple((_token_id_key(t), b) for t, b in self.logit_bias.items())
            object.__setattr__(self, "logit_bias", pairs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        """Whether sampling needs this request's token counts."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, max_n: int | None = None) -> None:
        """Raise InvalidRequestError for values the engine cannot honour (`max_n`: the engine's limit)."""
        checks = [
            (self.max_tokens >= 1, "max_tokens", "max_tokens must be >= 1"),
            (
                math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0,
                "temperature",
                "temperature must be a finite number in [0, 2]",
            ),
            (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "top_k must be >= 0 (0 disables it)"),
            (math.isfinite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "min_p must be in [0, 1]"),
            (
                math.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
                "repetition_penalty",
                "repetition_penalty must be in (0, 10]",
            ),
            (
                _in_range(self.presence_penalty, MAX_OPENAI_PENALTY),
                "presence_penalty",
                "presence_penalty must be in [-2, 2]",
            ),
            (
                _in_range(self.frequency_penalty, MAX_OPENAI_PENALTY),
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2]",
            ),
            (
                all(_is_int(t) and _in_range(b, MAX_LOGIT_BIAS) for t, b in self.logit_bias),
                "logit_bias",
                "logit_bias maps integer token ids to biases in [-100, 100]",
            ),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "min_tokens must be in [0, max_tokens]"),
            (
                all(_is_int(t) for t in self.stop_token_ids),
                "stop_token_ids",
                "stop_token_ids must be integers",
            ),
            (self.n >= 1, "n", "n must be >= 1"),
            (max_n is None or self.n <= max_n, "n", f"n must be <= {max_n} on this server"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                "top_logprobs",
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (
                self.logprobs or self.top_logprobs == 0,
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ),
            (
                self.structured is None or self.min_tokens == 0,
                "min_tokens",
                "min_tokens cannot be combined with structured output (the grammar decides the end)",
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=param)


def _token_id_key(key: object) -> object:
    """A JSON object key "123" as the id 123; anything else is left for `validate` to refuse."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return key


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _in_range(value: object, bound: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and -bound <= value <= bound


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob, and (in `top_logprobs`) the most likely alternatives.

    Plain data the API turns into OpenAI's `{token, logprob, bytes, top_logprobs}`: `token` is
    the token's own text (special tokens by name) and `token_bytes` its exact bytes, which for
    byte-level BPE may be part of a multi-byte character. Logprobs are of the distribution the
    token was sampled from (docs/engine.md, "Logprobs"); a token that distribution forbids
    (min_tokens, logit_bias -100 on a tiny vocabulary, a grammar) has -inf.
    """

    token_id: int
    logprob: float
    token: str = ""
    token_bytes: bytes = b""
    top_logprobs: tuple[TokenLogprob, ...] = ()

    def as_openai(self) -> dict[str, object]:
        """OpenAI's `logprobs.content[]` entry; -inf becomes -9999.0 (as vLLM does), JSON has no inf."""
        entry: dict[str, object] = {
            "token": self.token,
            "logprob": max(self.logprob, OPENAI_MIN_LOGPROB),
            "bytes": list(self.token_bytes),
        }
        entry["top_logprobs"] = [
            {"token": t.token, "logprob": max(t.logprob, OPENAI_MIN_LOGPROB), "bytes": list(t.token_bytes)}
            for t in self.top_logprobs
        ]
        return entry


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
    index: int = 0
    """The choice this delta belongs to (0..n-1); a request with n > 1 interleaves its choices'
    deltas in one stream, each choice ending with its own finish_reason."""
    new_logprobs: list[TokenLogprob] | None = None
    """One entry per new_token_ids entry when the request asked for logprobs, else None."""
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache (not recomputed) at the last admission."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta carrying both: `first`'s tokens and text followed by `later`'s.

    Used to send several engine steps' tokens in one message (serve/streaming.py); the timing
    marks that describe the request's start come from `first`, the rest from `later`. Both must
    belong to the same choice (`index`).
    """
    if first.index != later.index:
        raise ValueError(f"cannot merge deltas of choices {first.index} and {later.index}")
    logprobs = (
        None
        if first.new_logprobs is None and later.new_logprobs is None
        else (first.new_logprobs or []) + (later.new_logprobs or [])
    )
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
        index=later.index,
        new_logprobs=logprobs,
        num_cached_tokens=later.num_cached_tokens,
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
