"""Output processing: scheduler updates -> detokenized `RequestOutput` deltas on per-request queues.

Runs on the event-loop thread between steps. Owns each request's `IncrementalDetokenizer` and
asyncio queue (the n choices of one request share a queue; deltas carry the choice index); it
detects stop strings (text-level stops), tells the caller which requests must be finished with
"stop", and fills the token text of logprobs. It does not touch the KV cache or the scheduler.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from cogvlm_ray.contracts import FinishReason, RequestOutput, TokenLogprob
from cogvlm_ray.engine.detokenizer import IncrementalDetokenizer
from cogvlm_ray.engine.request import Request
from cogvlm_ray.engine.token_text import TokenText


@dataclass
class RequestStream:
    """Everything the consumer side of one request needs."""

    request: Request
    detokenizer: IncrementalDetokenizer
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False


def make_output(
    request: Request,
    new_token_ids: list[int],
    text: str,
    reason: FinishReason | None,
    logprobs: list[TokenLogprob] | None = None,
) -> RequestOutput:
    return RequestOutput(
        request_id=request.output_request_id,
        new_token_ids=new_token_ids,
        new_text=text,
        finish_reason=reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_generated_tokens=request.num_output_tokens,
        arrival_time=request.arrival_time,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        emit_time=time.monotonic(),
        image_cache_hit=request.image_cache_hit,
        index=request.choice_index,
        new_logprobs=logprobs,
        num_cached_tokens=request.num_cached_prompt_tokens,
    )


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.streams: dict[str, RequestStream] = {}
        self.token_text = TokenText(tokenizer)

    def add(
        self, request: Request, queue: asyncio.Queue[RequestOutput | BaseException] | None = None
    ) -> RequestStream:
        """Track a request; `queue` is shared by the choices of one n > 1 request."""
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.sampling_params.stop)
        stream = (
            RequestStream(request, detokenizer)
            if queue is None
            else RequestStream(request, detokenizer, queue)
        )
        self.streams[request.request_id] = stream
        return stream

    def process(
        self,
        request: Request,
        new_token_ids: list[int],
        finished: bool,
        logprob: TokenLogprob | None = None,
    ) -> bool:
        """Emit one delta; returns True when a stop string ended the request (caller finishes it)."""
        stream = self.streams.get(request.request_id)
        if stream is None:
            return False
        if finished and request.finish_reason == "stop":
            # Stopped by a token (eos / stop id): its text is not part of the answer.
            text, hit_stop_string = stream.detokenizer.finish(), False
        else:
            check_stop = request.num_output_tokens >= request.sampling_params.min_tokens
            delta = stream.detokenizer.add_tokens(new_token_ids, check_stop=check_stop)
            text, hit_stop_string = delta.text, delta.stopped
            if finished and not hit_stop_string:
                text += stream.detokenizer.finish()
        reason: FinishReason | None = (
            "stop" if hit_stop_string else request.finish_reason if finished else None
        )
        logprobs = None
        if request.sampling_params.logprobs:
            logprobs = [self.token_text.fill(logprob)] if logprob is not None else []
        self._put(stream, make_output(request, new_token_ids, text, reason, logprobs))
        return hit_stop_string

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Final empty delta for a request ended outside the token path (abort)."""
        stream = self.streams.get(request.request_id)
        if stream is not None and not stream.finished:
            self._put(stream, make_output(request, [], "", reason))

    def fail(self, request_id: str, exc: BaseException) -> None:
        """End one request's stream with `exc` (raised to its consumer), e.g. a grammar error."""
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(exc)

    def fail_all(self, exc: BaseException) -> None:
        """Wake every consumer with `exc` (the engine loop died)."""
        for stream in list(self.streams.values()):
            stream.queue.put_nowait(
                exc
            )  # a shared queue gets it once per choice; the first wakes the consumer
        self.streams.clear()

    def _put(self, stream: RequestStream, output: RequestOutput) -> None:
        stream.queue.put_nowait(output)
        if output.finish_reason is not None:
            stream.finished = True
            self.streams.pop(stream.request.request_id, None)
