"""A scripted ChatBackend for ingress tests: no Ray, no model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cogvlm_ray.api.tokenize import TokenizeJob, TokenizeResult
from cogvlm_ray.contracts import RequestOutput, SamplingParams, TokenLogprob
from cogvlm_ray.errors import CogVLMError, ServiceUnavailableError
from cogvlm_ray.preprocess.messages import Conversation


@dataclass
class FakeBackend:
    """Streams `pieces` one delta each (per choice when n > 1, interleaved; with logprobs, one
    entry per delta whose top list starts with the token itself). `error` is raised on the first
    `__anext__`, `mid_stream_error` after `fail_after` deltas; `delay_s` sleeps before each delta."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    finish_reason: str = "stop"
    num_prompt_tokens: int = 7
    num_cached_tokens: int = 0
    error: BaseException | None = None
    mid_stream_error: BaseException | None = None
    fail_after: int = 2
    delay_s: float = 0.0
    ready: bool = True
    calls: list[dict[str, Any]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    async def check_ready(self) -> None:
        if not self.ready:
            raise ServiceUnavailableError("no model replica is running", code="no_replica")

    def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append({"conversation": conversation, "sampling_params": sampling_params,
                           "template_version": template_version, "request_id": request_id})  # fmt: skip
        return self._stream(request_id, sampling_params)

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        if self.error is not None:
            raise self.error
        self.calls.append({"tokenize": job})
        text = job.prompt if job.prompt is not None else job.conversation.query  # type: ignore[union-attr]
        return TokenizeResult([ord(c) for c in text], 8192)

    async def detokenize(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    async def _stream(self, request_id: str, params: SamplingParams | None) -> AsyncIterator[RequestOutput]:
        try:
            if self.error is not None:
                raise self.error
            for i, piece in enumerate(self.pieces):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.mid_stream_error is not None and i == self.fail_after:
                    raise self.mid_stream_error
                last = i == len(self.pieces) - 1
                for index in range(params.n if params is not None else 1):
                    logprobs = None
                    if params is not None and params.logprobs:
                        top = [TokenLogprob(100 + i, -0.5, piece, piece.encode())]
                        top += [
                            TokenLogprob(200 + k, -1.0 - k, f"t{k}", b"t") for k in range(params.top_logprobs)
                        ]
                        logprobs = [
                            TokenLogprob(
                                100 + i, -0.5, piece, piece.encode(), tuple(top[: params.top_logprobs])
                            )
                        ]
                    yield RequestOutput(
                        request_id=request_id,
                        new_token_ids=[100 + i],
                        new_text=piece,
                        finish_reason=self.finish_reason if last else None,  # type: ignore[arg-type]
                        num_prompt_tokens=self.num_prompt_tokens,
                        num_generated_tokens=i + 1,
                        index=index,
                        new_logprobs=logprobs,
                        num_cached_tokens=self.num_cached_tokens,
                    )
            self.finished.append(request_id)
        finally:
            self.closed.append(request_id)


def raising(error: CogVLMError) -> FakeBackend:
    return FakeBackend(error=error)
