"""The ingress backend hands the image key to the ModelServer call, where the router reads it."""

from __future__ import annotations

import asyncio
from typing import Any

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.preprocess.messages import parse_messages
from cogvlm_ray.serve.affinity import AFFINITY_KWARG, image_affinity_key
from cogvlm_ray.serve.backend import RayChatBackend


class _Response:
    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        yield "delta"

    def cancel(self) -> None:
        pass


class _RecordingHandle:
    """A DeploymentHandle stand-in that records `.options(...).method.remote(*args, **kwargs)`."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def options(self, **_: Any) -> _RecordingHandle:
        return self

    def __getattr__(self, name: str) -> _RecordingHandle:
        return self

    def remote(self, *args: Any, **kwargs: Any) -> _Response:
        self.calls.append((args, kwargs))
        return _Response()


def model_call_kwargs(messages: list[dict]) -> dict[str, Any]:
    model = _RecordingHandle()
    backend = RayChatBackend(_RecordingHandle(), model, app_name="app", deployment_names=("ModelServer", "Preprocessor"),
                             max_num_seqs=2, max_queued_requests=-1, fail_fast_without_replicas=False)  # fmt: skip
    backend._status = (float("inf"), None, 1)  # never query serve.status()

    async def consume() -> list[Any]:
        conversation = parse_messages(messages)
        return [o async for o in backend.generate(conversation, SamplingParams(max_tokens=2), None, "req-1")]

    assert asyncio.run(consume()) == ["delta"]
    ((args, kwargs),) = model.calls
    assert args[2] == "req-1"
    return kwargs


def test_image_requests_carry_their_affinity_key():
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]  # fmt: skip
    key = model_call_kwargs(messages)[AFFINITY_KWARG]
    assert key == image_affinity_key(["data:image/png;base64,AAAA"]) and isinstance(key, str)


def test_text_only_requests_carry_none():
    assert model_call_kwargs([{"role": "user", "content": "hi"}])[AFFINITY_KWARG] is None
