"""What the cluster looks like over time: one `Sample` per interval, taken from the driver.

Each sample joins four views: Serve's (`serve.status()`: ModelServer replicas by state), Ray's
(alive GPU worker nodes, from the GCS), each node's metrics exporter (per-replica ongoing and
total requests: `ray_serve_replica_processing_queries`, `ray_serve_deployment_request_counter_total`,
as Prometheus would scrape them) and the client's (requests in flight, waiting for their first
token, latency of the requests that finished in the interval). `Timeline.to_json` is the
recorded file; `tests/cluster/chart.py` draws it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.load import StreamingLoad, window

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "ModelServer"


@dataclass
class Sample:
    t: float
    replicas: dict[str, int]
    """ModelServer replicas by Serve state (RUNNING, STARTING, STOPPING, ...)."""
    num_gpu_nodes: int
    in_flight: int
    waiting_first_token: int
    replica_ongoing: dict[str, float] = field(default_factory=dict)
    """Per ModelServer replica id: requests it is processing (Ray metrics, ~1 s lag)."""
    replica_requests: dict[str, float] = field(default_factory=dict)
    """Per ModelServer replica id: requests it has received so far."""
    num_finished: int = 0
    p50_latency_s: float | None = None
    max_latency_s: float | None = None
    p50_ttft_s: float | None = None
    event: str | None = None

    @property
    def num_running(self) -> int:
        return self.replicas.get("RUNNING", 0)


def model_replica_states(app_name: str) -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(MODEL_DEPLOYMENT) if app is not None else None
    if deployment is None:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in deployment.replica_states.items() if v}


def alive_gpu_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def scrape_model_replicas(ports: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    """(ongoing, received) per ModelServer replica id, from every node's metrics exporter."""
    ongoing: dict[str, float] = {}
    received: dict[str, float] = {}
    for port in ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name not in (
                "ray_serve_replica_processing_queries",
                "ray_serve_deployment_request_counter",
            ):
                continue
            for s in family.samples:
                if s.labels.get("deployment") != MODEL_DEPLOYMENT or "replica" not in s.labels:
                    continue
                target = ongoing if family.name == "ray_serve_replica_processing_queries" else received
                target[s.labels["replica"]] = target.get(s.labels["replica"], 0.0) + s.value
    return ongoing, received


class Timeline:
    """Samples the cluster every `interval_s` in a background thread while a load runs."""

    def __init__(self, app_name: str, t0: float, interval_s: float = 1.0):
        self.app_name = app_name
        self.t0 = t0
        self.load: StreamingLoad | None = None
        """The load running now (scenarios attach theirs); its counters and latencies are sampled."""
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-timeline", daemon=True)
        self._last_t = 0.0

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def mark(self, event: str, **details: Any) -> float:
        """Record a scenario event (load start, node kill, deploy...) at the load's clock."""
        t = round(self.now(), 3)
        self.events.append({"t": t, "event": event, **details})
        logger.info("t=%.1f %s %s", t, event, details or "")
        return t

    def now(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.samples.append(self.sample())
            except Exception as e:  # a sample can fail while a node dies; the next one will do
                logger.warning("timeline sample failed: %s: %s", type(e).__name__, e)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def sample(self) -> Sample:
        t = self.now()
        nodes = alive_gpu_nodes()
        ports = [n["MetricsExportPort"] for n in nodes if n.get("MetricsExportPort")]
        ongoing, received = scrape_model_replicas(ports)
        load = self.load
        counters = load.snapshot() if load is not None else {"in_flight": 0, "waiting_first_token": 0}
        w = window(list(load.results) if load is not None else [], self._last_t, t)
        self._last_t = t
        return Sample(
            t=round(t, 3),
            replicas=model_replica_states(self.app_name),
            num_gpu_nodes=len(nodes),
            in_flight=counters["in_flight"],
            waiting_first_token=counters["waiting_first_token"],
            replica_ongoing=ongoing,
            replica_requests=received,
            num_finished=w.num_finished,
            p50_latency_s=w.p50_latency_s,
            max_latency_s=w.max_latency_s,
            p50_ttft_s=w.p50_ttft_s,
        )

    def to_json(self) -> dict[str, Any]:
        return {"samples": [asdict(s) for s in self.samples], "events": list(self.events)}
