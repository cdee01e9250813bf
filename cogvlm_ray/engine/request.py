"""Request: the engine's mutable per-request state (one generated sequence).

Built by the engine from a PreparedPrompt + SamplingParams (a request with n choices becomes
n Requests, tagged with the caller's id and their index); read by the scheduler (counts
only), the runner (token ids, image) and the output processor. It holds no tensors: positions,
masks and image features are the runner's business.

Token bookkeeping follows vLLM v1: `num_tokens` = prompt + generated tokens known so far,
`num_computed_tokens` = how many of them have K/V in the cache. A step schedules
`num_tokens - num_computed_tokens` tokens (or a chunk of them); when a step brings
`num_computed_tokens` up to `num_tokens`, the runner samples the next token. Prefill, chunked
prefill, decode and recompute after preemption are all the same rule.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cogvlm_ray.contracts import VISION_TOKEN_TYPE, FinishReason, SamplingParams

if TYPE_CHECKING:
    from cogvlm_ray.engine.structured.backend import GrammarMatcher


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    token_type_ids: list[int]
    """0 = language, 1 = vision, per prompt token (generated tokens are language)."""
    sampling_params: SamplingParams
    image: np.ndarray | None = None
    """uint8 [3, S, S], not normalised (the runner normalises it)."""
    image_hash: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    image_cache_hit: bool | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache at the last admission."""
    block_hashes: list[bytes] | None = None
    """Prefix-cache keys of the prompt's full blocks (computed by the scheduler on first admission)."""
    group_id: str | None = None
    """For a choice of an n > 1 request: the caller's request id (outputs carry it)."""
    choice_index: int = 0
    prefill_leader: Request | None = None
    """Choices 1..n-1 wait for choice 0 to compute the prompt, then reuse its cached blocks;
    cleared at admission."""
    grammar: GrammarMatcher | None = None
    """Structured output: the matcher the sampled ids must follow (set before scheduling)."""

    image_span: tuple[int, int] | None = field(init=False, default=None)
    """[first, end) prompt positions of the image (boi, patches, eoi); None for a text prompt."""

    def __post_init__(self) -> None:
        if self.image is not None:
            vision = [i for i, t in enumerate(self.token_type_ids) if t == VISION_TOKEN_TYPE]
            if vision:
                self.image_span = (vision[0], vision[-1] + 1)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_request_id(self) -> str:
        """The id the caller knows: its own request id, shared by all choices of an n > 1 request."""
        return self.group_id or self.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) over prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        head = self.prompt_token_ids[start:num_prompt] if start < num_prompt else []
        return head + self.output_token_ids[max(0, start - num_prompt) : end - num_prompt]
