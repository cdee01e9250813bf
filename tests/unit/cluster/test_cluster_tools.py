"""The cluster suite's own tools, without a cluster: how the load classifies an SSE stream, how
the checks judge a recording, and the autoscaler config the fake cluster starts with."""

from __future__ import annotations

import json

from tests.cluster import checks
from tests.cluster.load import StreamingLoad, StreamResult
from tests.cluster.local_cluster import HEAD_NODE_TYPE, LocalAutoscalingCluster


def _stream(lines: list[str], max_tokens: int = 2) -> StreamResult:
    result = StreamResult(index=0, has_image=False, max_tokens=max_tokens, start=0.0)
    for line in lines:
        if not StreamingLoad._read_event(line, result):
            break
    if result.outcome == "pending":
        result.outcome = "cut"
    return result


def _data(event: dict | str) -> str:
    return "data: " + (event if isinstance(event, str) else json.dumps(event))


def _chunk(text: str, finish: str | None = None) -> str:
    return _data({"choices": [{"delta": {"content": text}, "finish_reason": finish}]})


USAGE_2 = _data({"choices": [], "usage": {"completion_tokens": 2}})


def test_a_complete_stream_is_ok_and_a_short_or_unterminated_one_is_cut():
    assert _stream([_chunk("a"), _chunk("b", "length"), USAGE_2, _data("[DONE]")]).outcome == "ok"
    short = [
        _chunk("a", "length"),
        _data({"choices": [], "usage": {"completion_tokens": 1}}),
        _data("[DONE]"),
    ]
    assert _stream(short).outcome == "cut"
    assert _stream([_chunk("a"), _chunk("b", "length"), USAGE_2]).outcome == "cut"  # no [DONE]


def test_an_error_event_is_a_stream_error_with_its_code():
    error = _data({"error": {"message": "replica died", "type": "server_error", "code": "replica_died"}})
    result = _stream([_chunk("a"), error, _data("[DONE]")])
    assert (result.outcome, result.error_code) == ("stream_error", "replica_died")


def _result(index: int, start: float, outcome: str = "ok", status: int = 200) -> dict:
    return {"index": index, "start": start, "end": start + 1.0, "outcome": outcome, "status": status,
            "error": None, "error_code": None}  # fmt: skip


def _scale_report(results: list[dict]) -> dict:
    samples = [
        {"t": 1.0, "replicas": {"RUNNING": 1}, "num_gpu_nodes": 1, "replica_requests": {"a": 3.0}},
        {"t": 20.0, "replicas": {"RUNNING": 2}, "num_gpu_nodes": 2, "replica_requests": {"a": 9.0, "b": 4.0}},
        {"t": 40.0, "replicas": {"RUNNING": 1}, "num_gpu_nodes": 1, "replica_requests": {"a": 12.0}},
    ]
    scale = {"profile": {"max_replicas": 2}, "t_load_start": 0.0, "t_all_serving": 20.0, "t_trickle": 30.0,
             "t_replicas_min": 38.0, "t_load_stop": 39.0, "t_nodes_min": 40.0, "scaled_replicas": ["a", "b"],
             "results": results, "summary": {"outcomes": {}}, "stopping_observations": []}  # fmt: skip
    events = [{"t": 38.0, "event": "replicas_back_to_min", "replicas": ["a"]}]
    return {"scenarios": {"scale": scale}, "timeline": {"samples": samples, "events": events}}


def test_scale_check_passes_a_good_recording_and_reports_its_figures():
    results = [_result(0, 1.0, "rejected", 429), _result(1, 2.0), _result(2, 25.0)]
    figures, failures = checks.check_scale(_scale_report(results))
    assert failures == []
    assert figures["scale_up_s"] == 20.0 and figures["scale_down_s"] == 8.0
    assert figures["requests_per_replica"] == {"a": 12.0, "b": 4.0}
    assert figures["lost"] == 0


def test_scale_check_fails_on_lost_requests_and_on_429s_at_full_capacity():
    results = [_result(0, 1.0, "rejected", 429), _result(1, 25.0, "rejected", 429), _result(2, 26.0, "cut")]
    _, failures = checks.check_scale(_scale_report(results))
    assert any("rejected after all 2 replicas" in f for f in failures)
    assert any("request 2: cut" in f for f in failures)
    _, failures = checks.check_scale(_scale_report([_result(1, 2.0)]))
    assert any("no 429 before the scale-up" in f for f in failures)


def test_fake_cluster_config_has_a_gpu_less_head_and_on_demand_gpu_workers():
    workers = {
        "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 1, "max_workers": 3}
    }
    cluster = LocalAutoscalingCluster({"CPU": 2}, workers, idle_timeout_minutes=0.1)
    config = cluster.config
    assert config["provider"]["type"] == "fake_multinode"
    assert config["available_node_types"][HEAD_NODE_TYPE] == {"resources": {"CPU": 2}, "node_config": {},
                                                              "max_workers": 0}  # fmt: skip
    assert config["available_node_types"]["gpu"]["max_workers"] == 3
    assert config["idle_timeout_minutes"] == 0.1
    assert (
        cluster.dashboard_port != 8265 and cluster.worker_raylet_pids() == {}
    )  # not started: nothing to find
