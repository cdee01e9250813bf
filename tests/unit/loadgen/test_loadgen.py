"""Load generator against an in-process fake OpenAI server with known delays and failures."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from cogvlm_ray.loadgen.cli import main
from cogvlm_ray.loadgen.report import summarize
from cogvlm_ray.loadgen.runner import Progress, RunSettings, run_requests
from cogvlm_ray.loadgen.workload import WorkloadSpec, build_requests
from tests.unit.loadgen.fake_openai import free_port


def _run(url: str, spec: WorkloadSpec, num: int, **settings):
    requests = build_requests(spec, num)
    return asyncio.run(run_requests(requests, RunSettings(url=url + "/v1/chat/completions", **settings)))


def test_streaming_figures_reflect_known_server_delays(fake):
    url, behaviour = fake
    behaviour.ttft_s, behaviour.itl_s = 0.15, 0.02
    spec = WorkloadSpec(image_size=32, max_tokens=5, stream=True)
    results, duration = _run(url, spec, 8, concurrency=4)
    assert [r.status for r in results] == ["200"] * 8
    for r in results:
        # Measured from the client, so never below the server's own delays; generous upper bound.
        assert 0.15 <= r.ttft_s < 0.15 + 2.0
        assert len(r.itl_s) == 4 and sum(r.itl_s) >= 4 * 0.02 * 0.9
        assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
        assert r.num_output_tokens == 5 and r.num_prompt_tokens == 11
        assert r.text == "t0 t1 t2 t3 t4 " and r.finish_reason == "length"
    summary = summarize(results, duration)
    assert summary.total_output_tokens == 40
    assert summary.ttft_ms.count == 8 and summary.ttft_ms.p50 >= 150.0
    assert summary.itl_ms.count == 32 and summary.itl_ms.mean >= 18.0
    assert 2 <= behaviour.max_in_flight <= 4
    # The fixed-length extra fields reached the server.
    assert all(b["ignore_eos"] is True and b["min_tokens"] == 5 for b in behaviour.bodies)


def test_error_counts_by_status_are_exact(fake):
    url, behaviour = fake
    behaviour.reject_every = 3
    results, duration = _run(
        url, WorkloadSpec(image_share=0.0, max_tokens=3, stream_share=0.5), 30, concurrency=5
    )
    summary = summarize(results, duration)
    assert summary.errors_by_status == {"429": 10}
    assert summary.num_ok == 20 and summary.total_output_tokens == 60
    rejected = [r for r in results if r.status == "429"]
    assert all(r.retry_after == "1" and "rate_limit_error" in r.error for r in rejected)


def test_non_streaming_uses_usage_and_has_no_ttft(fake):
    url, behaviour = fake
    behaviour.ttft_s, behaviour.itl_s = 0.05, 0.01
    results, _ = _run(url, WorkloadSpec(image_share=0.0, max_tokens=4, stream=False), 3, concurrency=3)
    for r in results:
        assert r.ok and r.ttft_s is None and r.itl_s == []
        assert r.num_output_tokens == 4 and r.e2e_s >= 0.05 + 3 * 0.01
    assert not any(b["stream"] for b in behaviour.bodies)


@pytest.mark.parametrize(("mode", "status"), [("error_event", "stream_error"), ("truncate", "malformed")])
def test_broken_streams_are_classified(fake, mode, status):
    url, behaviour = fake
    behaviour.stream_mode = mode
    results, _ = _run(url, WorkloadSpec(image_share=0.0, max_tokens=6), 2, concurrency=2)
    assert [r.status for r in results] == [status, status]
    assert summarize(results, 1.0).num_ok == 0


def test_unreachable_server_is_a_transport_error():
    url = f"http://127.0.0.1:{free_port()}"
    results, _ = _run(url, WorkloadSpec(image_share=0.0), 2, concurrency=1, timeout_s=5.0)
    assert [r.status for r in results] == ["transport", "transport"]


def test_poisson_rate_respects_in_flight_cap_and_reports_progress(fake):
    url, behaviour = fake
    behaviour.ttft_s = 0.1
    requests = build_requests(WorkloadSpec(image_share=0.0, max_tokens=2), 12)
    progress_out = io.StringIO()
    progress = Progress("rate=50", len(requests), stream=progress_out, interval_s=0.0)
    settings = RunSettings(url=url + "/v1/chat/completions", concurrency=3, request_rate=50.0, seed=1)
    results, _ = asyncio.run(run_requests(requests, settings, progress))
    assert all(r.ok for r in results)
    assert [r.index for r in results] == list(range(12))
    assert behaviour.max_in_flight <= 3
    lines = progress_out.getvalue().strip().splitlines()
    assert lines[-1].startswith("[rate=50] 12/12 done, 0 errors")


def test_cli_sweep_writes_json_and_png(fake, tmp_path, capsys):
    url, behaviour = fake
    behaviour.reject_every = 4
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "--base-url",
            url,
            "--concurrency",
            "1,2",
            "--num-requests",
            "4",
            "--warmup",
            "0",
            "--image-size",
            "32",
            "--max-tokens",
            "3",
            "--stream-share",
            "0.5",
            "--save-requests",
            "--output",
            str(out),
            "--chart",
            str(chart),
            "--label",
            "unit test",
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["workload"]["model"] == "fake-model"  # discovered via GET /v1/models
    assert [run["concurrency"] for run in document["runs"]] == [1, 2]
    # 8 requests over two levels, every 4th arrival rejected: 2 x 429 in total.
    total_429 = sum(run["summary"]["errors_by_status"].get("429", 0) for run in document["runs"])
    assert total_429 == 2
    assert all(len(run["requests"]) == 4 for run in document["runs"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "== c=2:" in capsys.readouterr().out
