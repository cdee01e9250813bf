"""Regressions found by the reliability suites, pinned at unit level (no Ray)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.errors import OverloadedError
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.backend import RayChatBackend
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from tests.unit.serve.fakes import FakeBackend

TEXT_ONLY = Conversation(query="hi", history=[], system=None)


def test_deeply_nested_json_is_a_400_not_a_500():
    client = TestClient(create_app(FakeBackend(), IngressSettings(served_model_names=("m",))))
    body = "[" * 100_000 + "]" * 100_000
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"


class _BackPressure(Exception):
    """Stands in for ray.serve.exceptions.BackPressureError."""


class _FailingStream:
    """A streaming DeploymentResponse whose iteration and cancel() both raise (as Serve's do)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise _BackPressure("Request dropped due to backpressure")

    def cancel(self):
        raise _BackPressure("Request dropped due to backpressure")


class _Handle:
    def __init__(self, response=None):
        self.response = response

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return self

    def remote(self, *args, **kwargs):
        return self.response


def test_cleanup_cancel_does_not_replace_the_mapped_error(monkeypatch):
    import cogvlm_ray.serve.backend as backend_module

    def fake_map(error):
        return OverloadedError("queue full") if isinstance(error, _BackPressure) else error

    monkeypatch.setattr(backend_module, "to_api_error", fake_map)
    backend = RayChatBackend(
        _Handle(), _Handle(_FailingStream()), app_name="a", deployment_names=("M", "P"),
        max_num_seqs=4, max_queued_requests=4, fail_fast_without_replicas=False,
    )  # fmt: skip

    async def no_problem():
        return None

    monkeypatch.setattr(backend, "_readiness_problem", no_problem)

    async def run():
        async for _ in backend.generate(TEXT_ONLY, SamplingParams(), None, "r1"):
            pass

    with pytest.raises(OverloadedError):
        asyncio.run(run())
    assert backend._num_in_flight == 0
