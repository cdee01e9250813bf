"""Monitoring manifests: every PromQL expression in the PrometheusRule and the Grafana dashboard
uses only metrics that exist (the app's, from `cogvlm_ray.serve.metrics.exported_metric_names()`,
or Ray's built-ins, read from the installed Ray source), with known labels; the PodMonitors
select the RayService's pods on ports those pods declare."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.k8s import promql
from tests.unit.k8s.manifests import (
    KUBERAY_NODE_TYPE_LABEL,
    embedded_serve_config,
    load_dashboard,
    manifests_of_kind,
    ray_groups,
    the_rayservice,
)
from tests.unit.k8s.ray_builtins import ray_builtin_metrics

#: Labels Prometheus / the PodMonitors attach to every scraped series (target labels and our
#: relabelings), plus `le` of histogram buckets.
SCRAPE_LABELS = frozenset(
    {
        "namespace",
        "pod",
        "container",
        "endpoint",
        "job",
        "instance",
        "service",
        "ray_io_cluster",
        "ray_io_group",
        "le",
    }
)
#: Tags Ray Serve adds to metrics recorded through ray.serve.metrics inside a replica.
SERVE_REPLICA_TAGS = frozenset({"application", "deployment", "replica"})


def rule_expressions() -> Iterator[tuple[str, str]]:
    for manifest in manifests_of_kind("PrometheusRule"):
        for group in manifest.doc["spec"]["groups"]:
            for rule in group["rules"]:
                yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dashboard = load_dashboard()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            yield f"variable {variable['name']}", promql.grafana_query_expr(query)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


ALL_EXPRESSIONS = [*rule_expressions(), *dashboard_expressions()]


def test_promql_reader() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (namespace, le) (rate(ray_a_bucket{status=~"5..", x="a,b"}[$__rate_interval])))'
        " > 5 and deriv(sum without (pod) (b_total offset 1h)[15m:1m]) / on(job) group_left(c) d > 1e-3"
    )
    assert promql.metric_names(expr) == {"ray_a_bucket", "b_total", "d"}
    assert promql.grouping_labels(expr) == {"namespace", "le", "pod", "job", "c"}
    assert promql.matchers(expr) == [("status", "=~", "5.."), ("x", "=", "a,b")]
    assert promql.grafana_query_expr('label_values(m{namespace="$namespace"}, ray_io_cluster)') == (
        'm{namespace="$namespace"}'
    )


def app_metric_labels() -> dict[str, set[str]]:
    """Sample name -> labels, for the app's metrics in both exported forms."""
    from cogvlm_ray.serve.metrics import METRICS, RAY_PREFIX, sample_names

    labels: dict[str, set[str]] = {}
    for spec in METRICS:
        for name in sample_names(spec):
            labels[name] = set(spec.labels)
            labels[RAY_PREFIX + name] = set(spec.labels) | SERVE_REPLICA_TAGS
    return labels


def known_metric_names() -> set[str]:
    from cogvlm_ray.serve.metrics import exported_metric_names

    return exported_metric_names() | ray_builtin_metrics().exported_names


def test_ray_builtin_names_are_read_from_ray() -> None:
    builtins = ray_builtin_metrics()
    # A few the notes (shared/notes/ray-serve-facts.md section 6) saw exported; proves the reader works.
    assert {"ray_serve_deployment_replica_healthy", "ray_serve_num_http_requests_total",
            "ray_serve_http_request_latency_ms_bucket", "ray_node_gpus_utilization"} <= builtins.exported_names  # fmt: skip
    assert "ray_cogvlm_time_to_first_token_seconds_bucket" not in builtins.exported_names


@pytest.mark.parametrize("where, expr", ALL_EXPRESSIONS, ids=[w for w, _ in ALL_EXPRESSIONS])
def test_expression_brackets_balance(where: str, expr: str) -> None:
    """A cheap syntax guard: (), [] and {} nest properly outside string literals."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in promql.without_strings(expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs:
            assert stack and stack.pop() == pairs[char], f"{where}: unbalanced {char!r} in {expr!r}"
    assert not stack, f"{where}: unclosed {stack} in {expr!r}"


@pytest.mark.parametrize("where, expr", ALL_EXPRESSIONS, ids=[w for w, _ in ALL_EXPRESSIONS])
def test_expression_uses_only_exported_metrics(where: str, expr: str) -> None:
    names = promql.metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - known_metric_names()
    assert not unknown, (
        f"{where}: {sorted(unknown)} are exported neither by cogvlm_ray.serve.metrics nor by Ray"
    )


@pytest.mark.parametrize("where, expr", ALL_EXPRESSIONS, ids=[w for w, _ in ALL_EXPRESSIONS])
def test_expression_uses_only_known_labels(where: str, expr: str) -> None:
    app_labels = app_metric_labels()
    allowed = set(SCRAPE_LABELS) | ray_builtin_metrics().tag_keys
    for name in promql.metric_names(expr):
        allowed |= app_labels.get(name, set())
    used = promql.grouping_labels(expr) | {label for label, _, _ in promql.matchers(expr)}
    assert used <= allowed, f"{where}: unknown labels {sorted(used - allowed)}"


def test_deployment_and_application_matchers_name_real_ones() -> None:
    """`deployment="ModelServer"` in an alert must match a deployment the serve config runs."""
    config = embedded_serve_config(the_rayservice())
    applications = {a["name"] for a in config["applications"]}
    deployment_names = {d["name"] for a in config["applications"] for d in a.get("deployments", [])}
    for where, expr in ALL_EXPRESSIONS:
        for label, op, value in promql.matchers(expr):
            if op == "=" and label == "deployment":
                assert value in deployment_names, f"{where}: no deployment {value!r}"
            if op == "=" and label == "application":
                assert value in applications, f"{where}: no application {value!r}"


def test_alerts_cover_what_matters() -> None:
    """The issue's alert list: p90 TTFT, growing queue, KV cache near full, error rate, replicas."""
    alerts = {where: expr for where, expr in rule_expressions()}
    used = {where: promql.metric_names(expr) for where, expr in alerts.items()}

    def alert_using(metric: str, text: str = "") -> bool:
        return any(metric in names and text in alerts[where] for where, names in used.items())

    assert alert_using("ray_cogvlm_time_to_first_token_seconds_bucket", "histogram_quantile(0.9")
    assert alert_using("ray_cogvlm_num_requests_waiting", "deriv(")
    assert alert_using("ray_cogvlm_kv_cache_usage_perc")
    assert alert_using("ray_cogvlm_http_requests_total", '"5.."')
    assert alert_using("ray_serve_deployment_replica_healthy")


def test_alert_rules_are_complete() -> None:
    names = []
    for manifest in manifests_of_kind("PrometheusRule"):
        for group in manifest.doc["spec"]["groups"]:
            for rule in group["rules"]:
                names.append(rule["alert"])
                assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                assert rule["for"], rule["alert"]
                assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
    assert len(names) == len(set(names))


def test_podmonitors_select_ray_pods_on_declared_ports() -> None:
    rayservice = the_rayservice()
    namespace = rayservice["metadata"]["namespace"]
    groups = ray_groups(rayservice)
    node_types_covered = set()
    for monitor in manifests_of_kind("PodMonitor"):
        spec = monitor.doc["spec"]
        assert namespace in spec["namespaceSelector"]["matchNames"]
        selector = spec["selector"]["matchLabels"]
        selected = [g for g in groups if selector.items() <= g.pod_labels.items()]
        assert selected, f"{monitor.name} selects no Ray pod"
        node_types_covered |= {g.pod_labels[KUBERAY_NODE_TYPE_LABEL] for g in selected}
        for group in selected:
            ports = {p["name"] for p in group.ray_container.get("ports", [])}
            for endpoint in spec["podMetricsEndpoints"]:
                assert endpoint["port"] in ports, (
                    f"{monitor.name}: {group.name} has no port {endpoint['port']!r}"
                )
        for group in selected:
            assert "metrics" in {e["port"] for e in spec["podMetricsEndpoints"]}
            assert group.rayStartParams.get("metrics-export-port") == str(
                next(p["containerPort"] for p in group.ray_container["ports"] if p["name"] == "metrics")
            )
    assert node_types_covered == {"head", "worker"}


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "cluster"} <= variables
    graphs = [p for p in panels if p["type"] != "row"]
    assert graphs
    for panel in graphs:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every query is scoped to the chosen namespace and Ray cluster(s).
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            assert 'ray_io_cluster=~"$cluster"' in target["expr"], panel["title"]


def test_dashboard_shows_every_app_metric() -> None:
    """Each cogvlm_* metric of the metrics module has a panel (in its Ray-exported form)."""
    from cogvlm_ray.serve.metrics import METRICS, RAY_PREFIX, sample_names

    shown = set().union(*(promql.metric_names(expr) for _, expr in dashboard_expressions()))
    for spec in METRICS:
        assert {RAY_PREFIX + n for n in sample_names(spec)} & shown, f"no panel shows {spec.name}"
