"""Reliability suites run against the integration suite's app: one Ray cluster per pytest session.

`serve_app` reuses `tests/integration/conftest.py` (its app args, `ServeApp`, constants). When
the integration fixture already runs in this session (a full `pytest` run: integration tests
come first), the cluster and app are reused as they are, never started twice; when the
reliability suites run alone, the same app is started here and torn down at the end.

Every module is marked `integration` (they need Ray); the full-size versions are also `slow`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import (
    API_KEY,
    APP_NAME,
    ServeApp,
    free_port,
    integration_app_args,
)

SERVED_MODEL = "cogvlm2-tiny"


def _attach(ray) -> ServeApp:
    """The app of the integration fixture, found in the running cluster."""
    from ray import serve

    status = serve.status()
    if APP_NAME not in status.applications:
        raise RuntimeError(f"Ray is up but Serve app {APP_NAME!r} is not; cannot share the cluster")
    client = serve.context._get_global_client()
    port = ray.get(client._controller.get_http_config.remote()).port
    node = ray._private.worker.global_worker.node
    return ServeApp(
        base_url=f"http://127.0.0.1:{port}",
        api_key=API_KEY,
        model=SERVED_MODEL,
        ray_metrics_url=f"http://127.0.0.1:{node.metrics_export_port}/metrics",
        metrics_dir=None,  # type: ignore[arg-type]  # not needed by these suites
    )


@pytest.fixture(scope="session")
def serve_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    if ray.is_initialized():
        yield _attach(ray)
        return

    from cogvlm_ray.serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="warning",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(integration_app_args(tmp)), name=APP_NAME, route_prefix="/")
        yield ServeApp(
            base_url=f"http://127.0.0.1:{port}",
            api_key=API_KEY,
            model=SERVED_MODEL,
            ray_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            metrics_dir=tmp / "prom",
        )
    finally:
        ray.shutdown()
