"""A `ChatBackend` over the real PreprocessServer and ModelServer in this process (no Ray).

It does what `serve/backend.py` does across Ray handles, minus the handles: prepare, hand the
result (a PreparedPrompt or a refused request as a value) to the model server, and raise the
errors that come back as values. Used to test the API end to end on the tiny model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from cogvlm_ray.api.tokenize import TokenizeJob, TokenizeResult
from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.errors import CogVLMError
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.server import ModelServer, PreprocessServer


class LocalBackend:
    def __init__(self, preprocess: PreprocessServer, model: ModelServer):
        self.preprocess = preprocess
        self.model = model

    async def check_ready(self) -> None:
        self.model.check_health()

    async def generate(
        self,
        conversation: Conversation,
        sampling_params: SamplingParams,
        template_version: str | None,
        request_id: str,
    ) -> AsyncIterator[RequestOutput]:
        prepared = await self.preprocess.prepare(conversation, sampling_params.max_tokens, template_version)
        stream = self.model.generate(prepared, sampling_params, request_id)
        try:
            async for item in stream:
                if isinstance(item, CogVLMError):
                    raise item
                yield item
        finally:
            await stream.aclose()

    async def tokenize(self, job: TokenizeJob) -> TokenizeResult:
        return _raise_error(await self.preprocess.tokenize(job))

    async def detokenize(self, token_ids: list[int]) -> str:
        return _raise_error(await self.preprocess.detokenize(token_ids))


def _raise_error(value):
    if isinstance(value, CogVLMError):
        raise value
    return value
