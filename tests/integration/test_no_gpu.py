"""A GPU model on a cluster without GPUs: /health and requests answer 503 with the reason, at once,
instead of hanging (a second app in the session cluster, deleted afterwards)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import API_KEY, ServeApp, integration_app_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

APP = "cogvlm_nogpu"
ROUTE = "/nogpu"


def test_model_replicas_that_cannot_be_scheduled_give_503_not_a_hang(
    serve_app: ServeApp, tmp_path_factory: pytest.TempPathFactory
):
    from ray import serve

    from cogvlm_ray.serve.app import IngressDeployment, ModelDeployment, PreprocessorDeployment, parse_args

    raw = parse_args(integration_app_args(tmp_path_factory.mktemp("nogpu"))).model_dump(mode="json")
    # What `num_gpus: 1` in a Serve config does on a CPU-only cluster: the replica stays PENDING.
    model = ModelDeployment.options(ray_actor_options={"num_cpus": 0.1, "num_gpus": 1}).bind(raw)
    preprocessor = PreprocessorDeployment.options(ray_actor_options={"num_cpus": 0.1}).bind(raw)
    app = IngressDeployment.options(ray_actor_options={"num_cpus": 0.1}).bind(raw, preprocessor, model)
    from ray.serve.api import RunTarget

    serve.run_many([RunTarget(app, name=APP, route_prefix=ROUTE)], wait_for_applications_running=False)
    base = serve_app.base_url + ROUTE
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline:  # until the ingress itself is up (404/503 from the proxy before)
            try:  # the proxy holds requests while the new ingress replica starts
                health = httpx.get(base + "/health", timeout=10)
            except httpx.TimeoutException:
                continue
            if health.headers.get("content-type", "").startswith("application/json"):
                break
            time.sleep(1)
        assert health is not None and health.status_code == 503, health.text if health is not None else None
        assert "ModelServer" in health.json()["error"]["message"]

        started = time.monotonic()
        response = httpx.post(base + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"messages": [{"role": "user", "content": "hi"}], "stream": True})  # fmt: skip
        assert response.status_code == 503, response.text
        assert time.monotonic() - started < 10
        assert response.json()["error"]["type"] == "service_unavailable"
        assert int(response.headers["retry-after"]) >= 1
    finally:
        serve.delete(APP, _blocking=False)
