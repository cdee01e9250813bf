"""Judge a recorded cluster run (`tests/cluster/run.py`'s JSON): figures and failures.

Each `check_*` returns `(figures, failures)`: the measured numbers that go into
docs/BENCHMARKS.md and a list of human-readable failures (empty when the scenario passed).
The rules: zero 5xx, zero lost or hung requests, every non-200 a documented
429/503 with `Retry-After`; after a node loss only the dead replica's streams end, each with
the clean error event, within `STREAM_ERROR_BOUND_S`.
"""

from __future__ import annotations

from typing import Any

STATUS_CACHE_S = 2.0
"""The ingress refreshes its replica count at most once a second (`RayChatBackend.status_cache_s`);
two seconds of slack before a new replica must be reflected in its capacity."""
STREAM_ERROR_BOUND_S = 30.0
"""A stream on a killed node must end (with the error event) this soon after the kill. After a
raylet dies its replica process keeps streaming until the GCS declares the node dead (Ray's
node health check: 3 s period x 5 failures by default, ~15 s); the rest is slack for a loaded
2-core machine."""
CLEAN_ERROR_CODES = ("replica_died", "no_replica", "stream_ended")

Result = dict[str, Any]


def rule_failures(results: list[Result], *, allow_stream_errors: bool = False) -> list[str]:
    """The always-on rules: nothing cut, hung or failed in transport, no undocumented status."""
    failures = []
    for r in results:
        outcome = r["outcome"]
        if outcome in ("ok", "rejected"):
            continue
        if outcome == "stream_error" and allow_stream_errors:
            continue
        failures.append(f"request {r['index']}: {outcome} (status {r['status']}, {r['error']})")
    return failures[:20]


def _rejected(results: list[Result]) -> list[Result]:
    return [r for r in results if r["outcome"] == "rejected"]


def check_scale(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    sc = report["scenarios"].get("scale") or {"error": report.get("error", "not run")}
    if "error" in sc:
        return {}, [f"scale scenario did not finish: {sc['error']}"]
    results, samples = sc["results"], report["timeline"]["samples"]
    max_replicas = sc["profile"]["max_replicas"]
    failures = rule_failures(results)
    in_scenario = [s for s in samples if sc["t_load_start"] <= s["t"] <= sc["t_nodes_min"]]
    max_running = max(s["replicas"].get("RUNNING", 0) for s in in_scenario)
    max_nodes = max(s["num_gpu_nodes"] for s in in_scenario)
    if max_running < max_replicas or max_nodes < max_replicas:
        failures.append(f"peak {max_running} replicas on {max_nodes} GPU nodes, wanted {max_replicas}")
    per_replica: dict[str, float] = {}  # requests each replica received (its counter's peak)
    for s in in_scenario:
        for rid, n in s["replica_requests"].items():
            per_replica[rid] = max(per_replica.get(rid, 0.0), n)
    served = {rid for rid, n in per_replica.items() if n > 0}
    unserved = set(sc["scaled_replicas"]) - served
    if unserved:
        failures.append(f"replicas that never received a request: {sorted(unserved)}")
    # The ingress's 429 capacity follows the running replica count: the burst is larger than one
    # replica's capacity (429s) and smaller than max_replicas' (none once they all run).
    early = [r for r in _rejected(results) if r["start"] < sc["t_all_serving"]]
    late = [
        r for r in _rejected(results) if sc["t_all_serving"] + STATUS_CACHE_S <= r["start"] < sc["t_trickle"]
    ]
    if not early:
        failures.append("no 429 before the scale-up: the burst never exceeded one replica's capacity")
    if late:
        failures.append(f"{len(late)} requests rejected after all {max_replicas} replicas were serving")
    removed = set(sc["scaled_replicas"]) - set(_final_replicas(report))
    drained = {
        rid: max((o["ongoing"].get(rid, 0) for o in sc.get("stopping_observations", [])), default=0)
        for rid in removed
    }
    figures = {
        "scale_up_s": round(sc["t_all_serving"] - sc["t_load_start"], 1),
        "scale_down_s": round(sc["t_replicas_min"] - sc["t_trickle"], 1),
        "nodes_down_s": round(sc["t_nodes_min"] - sc["t_load_stop"], 1),
        "peak_replicas": max_running,
        "peak_gpu_nodes": max_nodes,
        "requests": len(results),
        "outcomes": sc["summary"]["outcomes"],
        "rejected_before_scale_up": len(early),
        "rejected_at_max_replicas": len(late),
        "requests_per_replica": per_replica,
        "removed_replicas_ongoing_while_stopping": drained,
        "lost": sum(1 for r in results if r["outcome"] not in ("ok", "rejected")),
    }
    return figures, failures


def _final_replicas(report: dict[str, Any]) -> list[str]:
    for event in reversed(report["timeline"]["events"]):
        if event["event"] == "replicas_back_to_min":
            return event["replicas"]
    return []


def check_node_loss(report: dict[str, Any], max_num_seqs: int) -> tuple[dict[str, Any], list[str]]:
    sc = report["scenarios"].get("node_loss") or {"error": report.get("error", "not run")}
    if "error" in sc:
        return {}, [f"node-loss scenario did not finish: {sc['error']}"]
    results, t_kill, t_recovered = sc["results"], sc["t_kill"], sc["t_recovered"]
    failures = rule_failures(results, allow_stream_errors=True)
    if sc["running_before"] > 0 and not sc["replicas_after"]:
        failures.append("no ModelServer replica after recovery")
    errored = [r for r in results if r["outcome"] == "stream_error"]
    if not errored:
        failures.append("no stream ended with an error event: the killed replica served nothing")
    if len(errored) > max_num_seqs:
        failures.append(f"{len(errored)} streams errored; one replica runs at most {max_num_seqs}")
    for r in errored:  # started before the kill, or in the window before the node was declared dead
        if r["end"] - t_kill > STREAM_ERROR_BOUND_S:
            failures.append(f"request {r['index']} ended {r['end'] - t_kill:.1f} s after the kill")
        if r["error_code"] not in CLEAN_ERROR_CODES:
            failures.append(f"request {r['index']}: unexpected error event {r['error_code']}: {r['error']}")
    overlapping_ok = [r for r in results if r["start"] < t_kill < r["end"] and r["outcome"] == "ok"]
    after = [r for r in results if r["start"] >= t_recovered]
    after_ok = [r for r in after if r["outcome"] == "ok"]
    if not after_ok or len(after_ok) != len([r for r in after if r["outcome"] != "rejected"]):
        failures.append(f"after recovery: {len(after_ok)} of {len(after)} requests succeeded")
    figures = {
        "recovery_s": round(t_recovered - t_kill, 1),
        "detection_s": round(sc["t_replica_dead"] - t_kill, 1),
        "streams_errored": len(errored),
        "max_error_delay_s": round(max((r["end"] - t_kill for r in errored), default=0.0), 2),
        "streams_across_kill_ok": len(overlapping_ok),
        "requests_after_recovery_ok": len(after_ok),
        "ongoing_at_kill": sc["ongoing_at_kill"],
        "outcomes": sc["summary"]["outcomes"],
        "lost": sum(1 for r in results if r["outcome"] not in ("ok", "rejected", "stream_error")),
    }
    return figures, failures


def check_rolling_update(report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    sc = report["scenarios"].get("rolling_update") or {"error": report.get("error", "not run")}
    if "error" in sc:
        return {}, [f"rolling-update scenario did not finish: {sc['error']}"]
    results = sc["results"]
    failures = [
        f"request {r['index']}: {r['outcome']} ({r['error']})" for r in results if r["outcome"] != "ok"
    ]
    if set(sc["old_replicas"]) & set(sc["new_replicas"]):
        failures.append("old ModelServer replicas survived the update")
    if sc["default_tokens_after"] != sc["new_default_max_tokens"]:
        failures.append(f"new default_max_tokens not served: got {sc['default_tokens_after']} tokens")
    overlapping = [r for r in results if r["start"] < sc["t_updated"] and r["end"] > sc["t_deploy"]]
    figures = {
        "update_s": round(sc["t_updated"] - sc["t_deploy"], 1),
        "requests": len(results),
        "requests_during_update": len(overlapping),
        "outcomes": sc["summary"]["outcomes"],
        "lost": sum(1 for r in results if r["outcome"] != "ok"),
    }
    return figures, failures[:20]
