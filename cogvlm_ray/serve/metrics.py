"""Every Prometheus metric of the app, defined once, and the one object that records them.

Owns: the metric table (`METRICS`: name, type, labels, help, buckets, multiprocess mode), the
names it exports (`exported_metric_names()`), and `Metrics`, which records each observation to
two backends:

1. prometheus_client in *multiprocess mode*: every replica process writes its samples to files in
   `PROMETHEUS_MULTIPROC_DIR` (set for every deployment through `runtime_env` by `serve/app.py`),
   and the ingress `GET /metrics` merges all files of the node. So several replicas of each
   deployment give one correct answer, whichever ingress replica the proxy picks. Gauges use a
   `live*` mode, so a dead replica's gauges are dropped (`cleanup_dead_processes`).
2. `ray.serve.metrics` (optional, on by default in the app): Ray's per-node metrics exporter
   publishes the same series as `ray_<name>` (counters `ray_<name>_total`) with `application`,
   `deployment` and `replica` tags. This is what a PodMonitor scrapes on multi-node KubeRay
   clusters, where (1) sees only the ingress's node.

Metric objects live in this module (never in the deployment module: Serve pickles deployment
classes by value, and a module-level metric there would be a copy nobody scrapes). Nothing is
created at import time; deployments call `get_metrics(...)` once per process.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

MetricKind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Base name; counters are exported with a `_total` suffix."""
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    multiprocess_mode: str = "livesum"
    """Gauges only: how prometheus_client merges the replicas' values."""
    recorded_by: str = "model"
    """Which deployment records it (documentation; see docs/serving.md)."""


# Bucket boundaries follow vLLM's, so dashboards built for vLLM translate one to one.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
#: The label every engine metric carries (the served model name), as vLLM's `model_name`.
MODEL_NAME_LABEL = "model_name"
_M = (MODEL_NAME_LABEL,)

_PREPROCESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

TIME_TO_FIRST_TOKEN = MetricSpec(
    "cogvlm_time_to_first_token_seconds",
    "histogram",
    "Time from the engine receiving a request to its first generated token.",
    buckets=_TTFT_BUCKETS,
    labels=_M,
)
INTER_TOKEN_LATENCY = MetricSpec(
    "cogvlm_inter_token_latency_seconds",
    "histogram",
    "Time between two consecutive streamed deltas of one request.",
    buckets=_ITL_BUCKETS,
    labels=_M,
)
E2E_REQUEST_LATENCY = MetricSpec(
    "cogvlm_e2e_request_latency_seconds",
    "histogram",
    "Time from the engine receiving a request to its last token.",
    buckets=_REQUEST_BUCKETS,
    labels=_M,
)
REQUEST_QUEUE_TIME = MetricSpec(
    "cogvlm_request_queue_time_seconds",
    "histogram",
    "Time a request waited in the engine queue before it was first scheduled.",
    buckets=_REQUEST_BUCKETS,
    labels=_M,
)
NUM_REQUESTS_RUNNING = MetricSpec(
    "cogvlm_num_requests_running",
    "gauge",
    "Sequences in the engine's running batch, summed over model replicas.",
    multiprocess_mode="livesum",
    labels=_M,
)
NUM_REQUESTS_WAITING = MetricSpec(
    "cogvlm_num_requests_waiting",
    "gauge",
    "Requests waiting in the engine queue, summed over model replicas.",
    multiprocess_mode="livesum",
    labels=_M,
)
KV_CACHE_USAGE = MetricSpec(
    "cogvlm_kv_cache_usage_perc",
    "gauge",
    "Fraction (0..1) of KV-cache blocks in use; the fullest model replica.",
    multiprocess_mode="livemax",
    labels=_M,
)
PROMPT_TOKENS = MetricSpec(
    "cogvlm_prompt_tokens",
    "counter",
    "Prompt tokens of requests admitted by the engine (image positions included).",
    labels=_M,
)
GENERATION_TOKENS = MetricSpec("cogvlm_generation_tokens", "counter", "Tokens generated.", labels=_M)
REQUEST_SUCCESS = MetricSpec(
    "cogvlm_request_success",
    "counter",
    "Requests that finished in the engine, by finish reason.",
    labels=("finished_reason", MODEL_NAME_LABEL),
)
PREFIX_CACHE_QUERIES = MetricSpec(
    "cogvlm_prefix_cache_queries",
    "counter",
    "Prompt tokens looked up in the prefix cache (every admitted prompt's tokens).",
    labels=_M,
)
PREFIX_CACHE_HITS = MetricSpec(
    "cogvlm_prefix_cache_hits",
    "counter",
    "Prompt tokens whose K/V came from the prefix cache instead of being computed.",
    labels=_M,
)
IMAGE_CACHE_HITS = MetricSpec(
    "cogvlm_image_cache_hits",
    "counter",
    "Image requests whose vision features came from the cache.",
    labels=_M,
)
IMAGE_CACHE_QUERIES = MetricSpec(
    "cogvlm_image_cache_queries",
    "counter",
    "Image requests that looked up the image-feature cache.",
    labels=_M,
)
HTTP_REQUESTS = MetricSpec(
    "cogvlm_http_requests",
    "counter",
    "HTTP requests answered by the ingress, by route template and status (499: the client went away).",
    labels=("route", "status"),
    recorded_by="ingress",
)
PREPROCESS_SECONDS = MetricSpec(
    "cogvlm_preprocess_seconds",
    "histogram",
    "Time to turn messages into a PreparedPrompt (image decode included).",
    buckets=_PREPROCESS_BUCKETS,
    recorded_by="preprocessor",
)
ROUTING_DECISIONS = MetricSpec(
    "cogvlm_routing_decisions",
    "counter",
    "ModelServer routing decisions of the image-affinity router: outcome affinity (reason home or "
    "second_choice), fallback (overloaded, no_load_info) or default (text_only).",
    labels=("outcome", "reason"),
    recorded_by="ingress",
)

METRICS: tuple[MetricSpec, ...] = (
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    E2E_REQUEST_LATENCY,
    REQUEST_QUEUE_TIME,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    KV_CACHE_USAGE,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    PREFIX_CACHE_QUERIES,
    PREFIX_CACHE_HITS,
    IMAGE_CACHE_HITS,
    IMAGE_CACHE_QUERIES,
    HTTP_REQUESTS,
    PREPROCESS_SECONDS,
    ROUTING_DECISIONS,
)

RAY_PREFIX = "ray_"


def sample_names(spec: MetricSpec) -> set[str]:
    """The sample names Prometheus sees for one metric."""
    if spec.kind == "counter":
        return {spec.name + "_total"}
    if spec.kind == "histogram":
        return {spec.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return {spec.name}


def exported_metric_names(*, include_ray: bool = True) -> set[str]:
    """Every sample name we export: the ingress `/metrics` names, plus (by default) the same
    names with the `ray_` prefix that Ray's per-node exporter adds."""
    names = set().union(*(sample_names(spec) for spec in METRICS))
    if include_ray:
        names |= {RAY_PREFIX + name for name in names}
    return names


def cleanup_dead_processes(multiprocess_dir: str, *, all_kinds: bool = False) -> int:
    """Remove metric files of processes on this node that no longer exist.

    By default only live-gauge files go (a replaced replica's gauges must vanish), while counter
    and histogram files stay so totals never go backwards. `all_kinds=True` (used by `build_app`
    at application start) removes every dead process's files: a fresh start begins at zero,
    while replicas still running (a redeploy) keep their samples.
    """
    pattern = "*_*.db" if all_kinds else "gauge_live*_*.db"
    removed = 0
    for path in glob.glob(os.path.join(multiprocess_dir, pattern)):
        match = re.search(r"_(\d+)\.db$", path)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    """Records observations by `MetricSpec`; renders the Prometheus text exposition.

    `multiprocess_dir`: the `PROMETHEUS_MULTIPROC_DIR` of this process (None in unit tests: the
    samples then live in this object's private registry). `use_ray`: also record through
    `ray.serve.metrics` (only inside a Ray worker).
    """

    def __init__(self, *, multiprocess_dir: str | None = None, use_ray: bool = False):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        if multiprocess_dir is not None:
            os.makedirs(multiprocess_dir, exist_ok=True)
            cleanup_dead_processes(multiprocess_dir)
            if values.ValueClass is values.MutexValue:
                # prometheus_client picks its value class when first imported; if that happened
                # before PROMETHEUS_MULTIPROC_DIR was set (the caller sets it), switch now, before
                # any metric below exists, so this process writes to the shared directory.
                values.ValueClass = values.MultiProcessValue()
        self._prom: dict[str, Any] = {}
        for spec in METRICS:
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=self.registry)
            elif spec.kind == "gauge":
                metric = Gauge(
                    spec.name,
                    spec.help,
                    spec.labels,
                    registry=self.registry,
                    multiprocess_mode=spec.multiprocess_mode,
                )
            else:
                metric = Histogram(
                    spec.name, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets
                )
            self._prom[spec.name] = metric
        self._ray: dict[str, Any] = _make_ray_metrics() if use_ray else {}

    def inc(self, spec: MetricSpec, value: float = 1.0, **labels: str) -> None:
        if value <= 0:
            return
        self._child(spec, labels).inc(value)
        ray_metric = self._ray.get(spec.name)
        if ray_metric is not None:
            ray_metric.inc(value, tags=labels or None)

    def observe(self, spec: MetricSpec, value: float, **labels: str) -> None:
        self._child(spec, labels).observe(max(value, 0.0))
        ray_metric = self._ray.get(spec.name)
        if ray_metric is not None:
            ray_metric.observe(max(value, 0.0), tags=labels or None)

    def set(self, spec: MetricSpec, value: float, **labels: str) -> None:
        self._child(spec, labels).set(value)
        ray_metric = self._ray.get(spec.name)
        if ray_metric is not None:
            ray_metric.set(value, tags=labels or None)

    def _child(self, spec: MetricSpec, labels: dict[str, str]) -> Any:
        metric = self._prom[spec.name]
        return metric.labels(**labels) if spec.labels else metric

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for `GET /metrics`: all processes of the node in multiprocess mode."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        return render_directory(self.multiprocess_dir), CONTENT_TYPE_LATEST


def render_directory(multiprocess_dir: str) -> bytes:
    """The merged exposition of every process that wrote to `multiprocess_dir`."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    return generate_latest(registry)


def _make_ray_metrics() -> dict[str, Any]:
    """The same table through `ray.serve.metrics` (exported as `ray_<name>` by Ray's agent)."""
    from ray.serve import metrics as ray_metrics

    made: dict[str, Any] = {}
    for spec in METRICS:
        if spec.kind == "counter":
            made[spec.name] = ray_metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
        elif spec.kind == "gauge":
            made[spec.name] = ray_metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
        else:
            made[spec.name] = ray_metrics.Histogram(
                spec.name, spec.help, boundaries=list(spec.buckets), tag_keys=spec.labels
            )
    return made


_PROCESS_METRICS: Metrics | None = None


def get_metrics(*, multiprocess_dir: str | None = None, use_ray: bool = False) -> Metrics:
    """The process-wide `Metrics` (created on first call; later arguments are ignored), so two
    deployments sharing a process never register the same series twice."""
    global _PROCESS_METRICS
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = Metrics(multiprocess_dir=multiprocess_dir, use_ray=use_ray)
    return _PROCESS_METRICS


def metric_table(specs: Iterable[MetricSpec] = METRICS) -> str:
    """A Markdown table of the metrics (used to keep docs/serving.md honest in a test)."""
    rows = ["| name | type | labels | recorded by | meaning |", "|---|---|---|---|---|"]
    for spec in specs:
        shown = spec.name + ("_total" if spec.kind == "counter" else "")
        rows.append(
            f"| `{shown}` | {spec.kind} | {', '.join(spec.labels) or '-'} | {spec.recorded_by} | {spec.help} |"
        )
    return "\n".join(rows)
