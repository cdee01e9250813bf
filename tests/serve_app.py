"""The real app on the tiny random model, for every suite that needs Ray (integration,
reliability, router, browser): one local Ray cluster per pytest session, started by the
`serve_app` fixture in tests/conftest.py (each extra cluster would cost ~20 s on 2 cores).

The app runs with small limits so queueing and back-pressure are reachable with a few requests:
4 running sequences per model replica, 24 queued, 2 MiB bodies, API key "test-key", and the
playground on (the browser test drives it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cogvlm_ray.serve.ports import free_port

API_KEY = "test-key"
APP_NAME = "cogvlm"
MAX_NUM_SEQS = 4
MAX_QUEUED_REQUESTS = 24


@dataclass(frozen=True)
class ServeApp:
    base_url: str
    """http://127.0.0.1:<port> (no /v1)."""
    api_key: str
    model: str
    """The served model name."""
    ray_metrics_url: str
    """Ray's per-node metrics exporter (`ray_`-prefixed series)."""
    metrics_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def model_stats(self):
        """EngineStats of the (single) ModelServer replica."""
        from ray import serve

        return serve.get_deployment_handle("ModelServer", app_name=APP_NAME).get_stats.remote().result()


def integration_app_args(tmp: Path) -> dict:
    return {
        "model": "tiny-random",
        "served_model_name": "cogvlm2-tiny",
        "dtype": "float32",
        "device": "cpu",
        "cache_dir": str(tmp / "models"),
        "engine": {"max_num_seqs": MAX_NUM_SEQS, "max_kv_tokens": 16384, "image_cache_bytes": 1 << 24},
        "max_queued_requests": MAX_QUEUED_REQUESTS,
        "api_key": API_KEY,
        "max_request_bytes": 2 * 1024 * 1024,
        "request_timeout_s": 60,
        "default_max_tokens": 16,
        "metrics_dir": str(tmp / "prom"),
        "playground": True,
    }


@contextmanager
def start_serve_app(tmp: Path) -> Iterator[ServeApp]:
    """Start a local Ray cluster with the app; shut everything down on exit."""
    import ray
    from ray import serve

    from cogvlm_ray.serve.app import build_app

    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=8,  # logical: several apps share this cluster (tests/integration/test_router.py)
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(integration_app_args(tmp)), name=APP_NAME, route_prefix="/")
        yield ServeApp(
            base_url=f"http://127.0.0.1:{port}",
            api_key=API_KEY,
            model="cogvlm2-tiny",
            ray_metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            metrics_dir=tmp / "prom",
        )
    finally:
        ray.shutdown()  # kills every actor; serve.shutdown() would only add ~5 s
