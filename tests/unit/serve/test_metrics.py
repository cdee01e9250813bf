"""The metric table, its exported names, and multiprocess aggregation across replica processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cogvlm_ray.serve import metrics as m

REQUIRED_NAMES = {
    "cogvlm_time_to_first_token_seconds", "cogvlm_inter_token_latency_seconds",
    "cogvlm_e2e_request_latency_seconds", "cogvlm_request_queue_time_seconds",
    "cogvlm_num_requests_running", "cogvlm_num_requests_waiting", "cogvlm_kv_cache_usage_perc",
    "cogvlm_prompt_tokens_total", "cogvlm_generation_tokens_total", "cogvlm_request_success_total",
    "cogvlm_image_cache_hits_total", "cogvlm_image_cache_queries_total", "cogvlm_http_requests_total",
    "cogvlm_preprocess_seconds", "cogvlm_prefix_cache_hits_total", "cogvlm_prefix_cache_queries_total",
}  # fmt: skip

#: Metrics recorded by the model replicas: each carries vLLM's `model_name` label.
ENGINE_METRICS = {
    "cogvlm_time_to_first_token_seconds", "cogvlm_inter_token_latency_seconds",
    "cogvlm_e2e_request_latency_seconds", "cogvlm_request_queue_time_seconds",
    "cogvlm_num_requests_running", "cogvlm_num_requests_waiting", "cogvlm_kv_cache_usage_perc",
    "cogvlm_prompt_tokens", "cogvlm_generation_tokens", "cogvlm_request_success",
    "cogvlm_image_cache_hits", "cogvlm_image_cache_queries", "cogvlm_prefix_cache_hits",
    "cogvlm_prefix_cache_queries",
}  # fmt: skip

# A replica process: writes through Metrics in multiprocess mode, then exits.
WRITER = """
import sys
from cogvlm_ray.serve import metrics as m
metrics = m.Metrics(multiprocess_dir=sys.argv[1])
metrics.inc(m.GENERATION_TOKENS, float(sys.argv[2]), model_name="m")
metrics.inc(m.HTTP_REQUESTS, route="/v1/chat/completions", status="200")
metrics.set(m.NUM_REQUESTS_RUNNING, float(sys.argv[2]), model_name="m")
metrics.set(m.KV_CACHE_USAGE, float(sys.argv[2]) / 10, model_name="m")
metrics.observe(m.PREPROCESS_SECONDS, 0.01)
print("ready", flush=True)
sys.stdin.read()  # stay alive (a running replica) until the test closes stdin
"""


def test_every_issue_metric_is_defined_once_with_exported_names():
    names = [spec.name for spec in m.METRICS]
    assert len(names) == len(set(names))
    shown = {spec.name + ("_total" if spec.kind == "counter" else "") for spec in m.METRICS}
    assert shown >= REQUIRED_NAMES
    exported = m.exported_metric_names()
    assert {"cogvlm_ttft_seconds_bucket"}.isdisjoint(exported)
    assert {"cogvlm_time_to_first_token_seconds_bucket", "cogvlm_time_to_first_token_seconds_sum",
            "cogvlm_time_to_first_token_seconds_count", "cogvlm_prompt_tokens_total",
            "cogvlm_kv_cache_usage_perc", "ray_cogvlm_prompt_tokens_total",
            "ray_cogvlm_e2e_request_latency_seconds_bucket"} <= exported  # fmt: skip
    assert all(name.startswith(("cogvlm_", "ray_cogvlm_")) for name in exported)
    assert m.exported_metric_names(include_ray=False) == {n for n in exported if not n.startswith("ray_")}
    labels = {spec.name: spec.labels for spec in m.METRICS}
    assert labels["cogvlm_request_success"] == ("finished_reason", "model_name")
    assert {name for name, names in labels.items() if "model_name" in names} == ENGINE_METRICS
    assert labels["cogvlm_http_requests"] == ("route", "status")


def test_in_process_metrics_render_exported_names():
    metrics = m.Metrics()
    for spec in m.METRICS:
        labels = dict.fromkeys(spec.labels, "x")
        {"counter": metrics.inc, "gauge": metrics.set, "histogram": metrics.observe}[spec.kind](
            spec, 1.0, **labels
        )
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    sample_names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert m.exported_metric_names(include_ray=False) <= sample_names


def _values(body: bytes) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if "le" not in sample.labels:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def test_multiprocess_mode_aggregates_replicas_and_drops_dead_gauges(tmp_path: Path):
    directory = str(tmp_path / "prom")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    os.makedirs(directory)
    writers = []
    for tokens in ("3", "4"):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, directory, tokens], env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert writer.stdout.readline().strip() == "ready"
        writers.append(writer)
    before = _values(m.render_directory(directory))
    for writer in writers:
        writer.communicate("", timeout=60)
    assert before["cogvlm_generation_tokens_total"] == 7
    assert before["cogvlm_http_requests_total"] == 2
    assert before["cogvlm_preprocess_seconds_count"] == 2
    assert before["cogvlm_num_requests_running"] == 7  # livesum over both writers' files
    assert before["cogvlm_kv_cache_usage_perc"] == 0.4  # livemax

    # Both writers have exited: their gauges go, their counters stay (totals never go backwards).
    assert m.cleanup_dead_processes(directory) == 4  # livesum + livemax file per writer
    after = _values(m.render_directory(directory))
    assert after["cogvlm_generation_tokens_total"] == 7
    assert "cogvlm_num_requests_running" not in after
    # At application start (build_app) every dead process's files go.
    m.cleanup_dead_processes(directory, all_kinds=True)
    assert _values(m.render_directory(directory)) == {}
