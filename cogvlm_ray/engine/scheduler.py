"""Iteration-level scheduler: who runs in the next step, and how many tokens each.

Never sees a tensor. Each `schedule()` returns a `SchedulerOutput`; the runner executes it and
`update_from_output()` folds the sampled ids back in (token-based stops: eos, stop ids,
max_tokens, context window). Stop *strings* need text, so the engine's output processor
detects them and calls `finish_request`.

Policy (one step, token budget `max_num_batched_tokens`):
1. running requests, oldest first: one token for each decoding request, the next chunk for a
   request still prefilling; when a decode needs a new KV block and none is free, the newest
   running request is preempted (blocks freed, put back at the head of the queue, recomputed
   later from its prompt + generated tokens);
2. then waiting requests, FCFS, while the budget, `max_num_seqs` and the KV cache allow. A
   request is admitted only if blocks for all its known tokens are free (minus a 1% watermark),
   so admission never runs the cache out; otherwise it waits and the wait shows in stats
   (`num_waiting_for_kv`). With prefix caching, full prompt blocks already computed for the
   same prefix are adopted at admission and the request starts at `num_computed_tokens` > 0.
With chunked prefill a long (image) prompt takes whatever budget is left after the decodes,
so running streams keep producing a token every step. The encoder budget
(`max_images_per_step`) bounds the chunks per step that need the vision tower: the first chunk
of an admission that touches its image, or a running request's chunk that reaches its image's
first position, when the image's features are not in the image-feature cache (the same image
twice in one step counts once). When the budget is spent, admission stops for this step (FCFS)
and such a running chunk waits; decodes are never held back. (A request only joins `running` when the
budget still has room for it after the requests ahead of it, and a preempted one rejoins at
the end, so a request still prefilling never sits before one that decodes: walking `running`
in order serves every decode first.)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cogvlm_ray.contracts import FinishReason, TokenLogprob
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.engine.kv_cache import BlockManager, prompt_block_hashes
from cogvlm_ray.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step, fixed when the step is scheduled.

    Counts and the block table are copies taken at schedule time. `request` is a read-only
    handle for the runner (prompt ids, token types, image, sampling params, output ids so
    far): only the event loop writes request state, and never while the step runs.
    """

    request: Request
    num_computed_tokens: int
    """Tokens already in the KV cache before this step (start of this step's chunk)."""
    num_new_tokens: int
    block_table: list[int]
    samples: bool
    """True when this step computes the request's last known token, so a new one is sampled."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_prefill_tokens: int = 0
    """Prompt (or recomputed) tokens in this step."""
    num_decode_tokens: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass(frozen=True)
class RunnerOutput:
    """What the runner hands back (plain data; the engine applies it on the event loop)."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    """One sampled id per request whose `samples` was True."""
    image_cache_hits: dict[str, bool] = field(default_factory=dict)
    """For image requests whose image span this step touched: whether the vision tower was
    skipped (feature cache, prefix cache, or a twin in the same step)."""
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    """For the sampled requests that asked for logprobs (token text not filled in)."""


@dataclass
class RequestUpdate:
    """A request that produced a token and/or finished in this step."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        is_image_cached: Callable[[str], bool] | None = None,
    ) -> None:
        """`is_image_cached(image_hash)`: whether the vision features of that image are cached
        (the engine passes its image-feature cache's membership test; it counts no query)."""
        self.config = config
        self._is_image_cached = is_image_cached
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_waiting_for_kv = 0
        self.num_preemptions = 0
        self.num_cached_prompt_tokens = 0
        """Cumulative prompt tokens served from the prefix cache."""
        # Keep ~1% of blocks free at admission so fresh admissions don't force preemptions at once.
        self._watermark = int(0.01 * block_manager.num_blocks)

    # ---- queue protocol -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request_id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Remove a request (abort or stop string) and free its KV blocks; None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        self.block_manager.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        bm = self.block_manager

        tower_images: set[str] = set()  # images this step sends through the vision tower
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new > budget and not chunked:
                index += 1  # an unchunked prefill waits for a step with room for all of it
                continue
            num_new = min(num_new, budget)
            start = request.num_computed_tokens
            if not self._take_encoder_budget(request, start, start + num_new, tower_images, admitted=False):
                index += 1  # its image waits for a step with encoder budget
                continue
            needed = bm.num_missing_blocks(request.request_id, request.num_computed_tokens + num_new)
            while not bm.can_allocate(needed) and self.running[-1] is not request:
                out.preempted_request_ids.append(self._preempt(self.running[-1]))
            if not bm.can_allocate(needed):
                out.preempted_request_ids.append(self._preempt(request))
                break
            self._schedule(out, request, num_new)
            budget -= num_new
            index += 1

        now = time.monotonic()
        self.num_waiting_for_kv = 0
        while self.waiting and budget > 0 and not out.preempted_request_ids:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            if _waits_for_leader(request):
                break  # a choice of an n > 1 request: admitted once the first choice's prompt is cached
            num_new = request.num_tokens - request.num_computed_tokens
            if num_new > budget and not chunked and not out.is_empty:
                break
            watermark = self._watermark if self.running else 0
            prefix = self._cached_prefix(request)
            if not bm.can_allocate(
                bm.num_blocks_to_take(request.request_id, request.num_tokens, prefix), watermark
            ):
                self.num_waiting_for_kv = len(self.waiting)
                break
            start = len(prefix) * bm.block_size
            end = min(request.num_tokens, start + budget) if chunked else request.num_tokens
            if not self._take_encoder_budget(request, start, end, tower_images, admitted=True):
                break
            self.waiting.popleft()
            request.prefill_leader = None
            bm.allocate(request.request_id, request.num_tokens, prefix)
            request.num_computed_tokens = request.num_cached_prompt_tokens = len(prefix) * bm.block_size
            self.num_cached_prompt_tokens += request.num_cached_prompt_tokens
            num_new = request.num_tokens - request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            num_new = min(num_new, budget) if chunked else num_new
            self._schedule(out, request, num_new)
            budget -= num_new
        return out

    def _take_encoder_budget(
        self, request: Request, start: int, end: int, tower_images: set[str], *, admitted: bool
    ) -> bool:
        """Whether the chunk [start, end) fits this step's encoder budget (taking its share if needed).

        The chunk needs the vision tower when it touches its image (`admitted`: the request's
        first chunk since admission) or reaches the image's first position (a running request:
        a later part of the image reuses the features the runner kept), and the image's
        features are not cached. `tower_images` holds the images already sent this step.
        """
        span = request.image_span
        if span is None or request.image_hash is None:
            return True
        first, last = span
        touches = start < last and end > first if admitted else start <= first < end
        if not touches:
            return True
        image = request.image_hash
        if image in tower_images or (self._is_image_cached is not None and self._is_image_cached(image)):
            return True
        if len(tower_images) >= self.config.max_images_per_step:
            return False
        tower_images.add(image)
        return True

    def _cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks to adopt at admission; at least one token is always left to compute."""
        bm = self.block_manager
        if not bm.enable_prefix_caching or bm.block_table(request.request_id):
            return []
        if request.block_hashes is None:
            request.block_hashes = prompt_block_hashes(
                request.prompt_token_ids, request.token_type_ids, request.image_hash, bm.block_size
            )
        prefix = bm.lookup_prefix(request.block_hashes)
        if len(prefix) * bm.block_size >= request.num_tokens:
            prefix = prefix[:-1]  # the last token must run to produce logits
        return prefix

    def _schedule(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        table = self.block_manager.allocate(request.request_id, request.num_computed_tokens + num_new)
        start = request.num_computed_tokens
        out.scheduled.append(
            ScheduledRequest(request, start, num_new, list(table), start + num_new == request.num_tokens)
        )
        is_decode = request.num_computed_tokens >= request.num_prompt_tokens and num_new == 1
        if is_decode:
            out.num_decode_tokens += 1
        else:
            out.num_prefill_tokens += num_new

    def _preempt(self, request: Request) -> str:
        """Free a running request's KV and requeue it at the head; it is recomputed later."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.info("preempted %s (KV cache full); it will be recomputed", request.request_id)
        return request.request_id

    def update_from_output(self, out: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Advance computed counts, append sampled ids, finish on eos/stop ids/length."""
        updates: list[RequestUpdate] = []
        now = time.monotonic()
        for item in out.scheduled:
            request = item.request
            if request.is_finished:
                continue
            request.num_computed_tokens = item.end
            if request.block_hashes:
                self.block_manager.cache_blocks(request.request_id, request.block_hashes, item.end)
            token_id = runner_output.sampled_token_ids.get(request.request_id)
            if token_id is None:
                continue
            request.output_token_ids.append(token_id)
            if request.first_token_time is None:
                request.first_token_time = now
            reason = self._check_stop(request, token_id)
            if reason is not None:
                self.finish_request(request.request_id, reason)
            updates.append(RequestUpdate(request, [token_id], reason is not None))
        return updates

    def _check_stop(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                return "stop"
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return "length"
        return None


def _waits_for_leader(request: Request) -> bool:
    """True while the request's prefill leader (choice 0 of the same n > 1 request) has not
    computed its prompt: admitted then, the request adopts those blocks from the prefix cache.
    Only never-admitted choices have a leader, and they never move ahead of it in the queue
    (only preempted, i.e. admitted, requests are put back at the head), so this cannot deadlock."""
    leader = request.prefill_leader
    return (
        leader is not None
        and not leader.is_finished
        and leader.num_computed_tokens < leader.num_prompt_tokens
    )
