"""Ray/Serve exceptions -> our HTTP error classes, and ingress-side admission (no cluster)."""

from __future__ import annotations

import asyncio

import pytest
from ray import exceptions as ray_exceptions
from ray.serve import exceptions as serve_exceptions

from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.errors import ImageError, OverloadedError, ServiceUnavailableError
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.backend import RayChatBackend, to_api_error

TEXT_ONLY = Conversation(query="hi", history=[], system=None)


def test_backpressure_is_429_and_missing_replicas_are_503():
    overloaded = to_api_error(
        serve_exceptions.BackPressureError(num_queued_requests=3, max_queued_requests=3)
    )
    assert isinstance(overloaded, OverloadedError) and overloaded.status_code == 429
    died = to_api_error(ray_exceptions.ActorDiedError())
    assert isinstance(died, ServiceUnavailableError) and died.status_code == 503
    unavailable = to_api_error(serve_exceptions.DeploymentUnavailableError("ModelServer"))
    assert isinstance(unavailable, ServiceUnavailableError)


def test_errors_raised_in_a_replica_keep_their_class():
    cause = ImageError("cannot decode image")
    wrapped = ray_exceptions.RayTaskError("prepare", "traceback", cause)
    assert to_api_error(wrapped) is cause
    assert to_api_error(wrapped.as_instanceof_cause()) is cause
    other = RuntimeError("x")
    assert to_api_error(other) is other


class _Call:
    def __init__(self, outputs):
        self.outputs = outputs
        self.cancelled = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for o in self.outputs:
            await asyncio.sleep(0.01)
            yield o

    def cancel(self):
        self.cancelled = True


class _Handle:
    """Stands in for a DeploymentHandle: `.options(...).method.remote(...)`."""

    def __init__(self, outputs=None):
        self.calls: list[_Call] = []
        self.outputs = outputs or ["a", "b"]

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return self

    def remote(self, *args, **kwargs):
        call = _Call(self.outputs)
        call.kwargs = kwargs
        self.calls.append(call)
        return call


def test_admission_counts_in_flight_requests_and_rejects_beyond_capacity():
    backend = RayChatBackend(_Handle(), _Handle(), app_name="app", deployment_names=("ModelServer", "Preprocessor"),
                             max_num_seqs=2, max_queued_requests=1, fail_fast_without_replicas=False)  # fmt: skip
    backend._status = (float("inf"), None, 1)  # status cache: 1 model replica, never refreshed
    assert backend.capacity() == 3

    async def scenario():
        params = SamplingParams(max_tokens=4)
        streams = [backend.generate(TEXT_ONLY, params, None, f"r{i}").__aiter__() for i in range(4)]
        firsts = [await s.__anext__() for s in streams[:3]]
        assert backend.num_in_flight == 3
        with pytest.raises(OverloadedError):
            await streams[3].__anext__()
        for s in streams[:3]:
            await s.aclose()
        return firsts

    assert asyncio.run(scenario()) == ["a", "a", "a"]
    assert backend.num_in_flight == 0
    assert all(call.cancelled for call in backend.model.calls)


def test_not_ready_is_503_with_the_reason():
    backend = RayChatBackend(_Handle(), _Handle(), app_name="app", deployment_names=("ModelServer", "Preprocessor"),
                             max_num_seqs=2, max_queued_requests=1)  # fmt: skip
    backend._status = (float("inf"), "no ModelServer replica is running yet (waiting for a GPU)", 0)
    with pytest.raises(ServiceUnavailableError, match="waiting for a GPU"):
        asyncio.run(backend.check_ready())


def test_readiness_reads_serve_status_and_explains_missing_replicas(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    def deployment(running: int, message: str = "") -> SimpleNamespace:
        return SimpleNamespace(replica_states={"RUNNING": running} if running else {"PENDING_ALLOCATION": 1},
                               status="UPDATING" if not running else "HEALTHY", message=message)  # fmt: skip

    deployments = {"ModelServer": deployment(0, "Resources required for each replica: {\"GPU\": 1}"),
                   "Preprocessor": deployment(1)}  # fmt: skip
    status = SimpleNamespace(applications={"app": SimpleNamespace(deployments=deployments)})
    monkeypatch.setattr(serve, "status", lambda: status)
    backend = RayChatBackend(_Handle(), _Handle(), app_name="app", deployment_names=("ModelServer", "Preprocessor"),
                             max_num_seqs=2, max_queued_requests=1)  # fmt: skip
    with pytest.raises(ServiceUnavailableError, match='no ModelServer replica.*PENDING_ALLOCATION.*"GPU": 1'):
        asyncio.run(backend.check_ready())
    deployments["ModelServer"] = deployment(3)
    backend._status = (0.0, None, 0)  # expire the cache
    asyncio.run(backend.check_ready())
    assert backend.capacity() == 3 * 2 + 1


def test_readiness_keeps_its_last_answer_while_serve_builds_a_new_version(monkeypatch):
    """During `serve deploy` of changed args, serve.status() lists the app as DEPLOYING with no
    deployments for a few seconds while the old replicas still serve: no 503 then."""
    from types import SimpleNamespace

    from ray import serve

    running = SimpleNamespace(replica_states={"RUNNING": 2}, status="HEALTHY", message="")
    app = SimpleNamespace(status="RUNNING", deployments={"ModelServer": running, "Preprocessor": running})
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"app": app}))
    backend = RayChatBackend(_Handle(), _Handle(), app_name="app", deployment_names=("ModelServer", "Preprocessor"),
                             max_num_seqs=2, max_queued_requests=1)  # fmt: skip
    asyncio.run(backend.check_ready())
    assert backend.capacity() == 2 * 2 + 1
    app.status, app.deployments = "DEPLOYING", {}  # the controller is building the new version
    backend._status = (0.0, *backend._status[1:])  # expire the cache
    asyncio.run(backend.check_ready())
    assert backend.capacity() == 2 * 2 + 1
    app.deployments = {"Preprocessor": running}  # listed, but no model deployment: really not ready
    backend._status = (0.0, *backend._status[1:])
    with pytest.raises(ServiceUnavailableError, match="no ModelServer replica"):
        asyncio.run(backend.check_ready())
