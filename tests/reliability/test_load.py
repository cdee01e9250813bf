"""Load: many mixed requests (image/text, streaming/not) through the real app.

Every request must end as a complete answer (exactly max_tokens tokens, a finish_reason, and
`[DONE]` for streams) or as a clean JSON 429/503; zero timeouts (hangs), zero malformed
responses, zero mid-stream errors. Afterwards the engine is idle (no leaked slots or KV), and
the resident memory of each replica stays within a bound after warm-up.

Default: 200 requests at concurrency 16. `-m slow`: 1,000 requests at concurrency 64.
The load comes from our own load generator (`cogvlm_ray.loadgen`).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from cogvlm_ray.loadgen.report import summarize
from cogvlm_ray.loadgen.runner import RunSettings, run_requests
from cogvlm_ray.loadgen.workload import WorkloadSpec, build_requests
from tests.integration.conftest import APP_NAME
from tests.reliability.helpers import replica_pids, rss_mib, wait_for

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

DEPLOYMENTS = ("Ingress", "Preprocessor", "ModelServer")
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 120.0
"""A request still unanswered after this long counts as a hang."""
RSS_GROWTH_BOUND_MIB = 100.0
"""Allowed RSS growth per replica between the end of warm-up and the end of the load run."""


def _spec(serve_app, seed: int) -> WorkloadSpec:
    return WorkloadSpec(
        model=serve_app.model,
        image_size=96,
        image_share=0.5,
        repeat_image_share=0.3,
        prompt_tokens=16,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        stream_share=0.5,
        seed=seed,
    )


def _run(serve_app, num_requests: int, concurrency: int, seed: int):
    requests = build_requests(_spec(serve_app, seed), num_requests)
    settings = RunSettings(url=serve_app.base_url + "/v1/chat/completions", concurrency=concurrency,
                           timeout_s=REQUEST_TIMEOUT_S, api_key=serve_app.api_key)  # fmt: skip
    results, duration = asyncio.run(run_requests(requests, settings))
    return requests, results, duration


def _replica_rss() -> dict[str, float]:
    return {name: sum(rss_mib(pid) for pid in replica_pids(APP_NAME, name)) for name in DEPLOYMENTS}


def _check_load(serve_app, num_requests: int, concurrency: int, num_warmup: int) -> None:
    wait_for(lambda: all(replica_pids(APP_NAME, name) for name in DEPLOYMENTS), 90, what="all replicas")
    _run(serve_app, num_warmup, concurrency, seed=1)  # warm-up: caches, allocator arenas, lazy imports
    rss_before = _replica_rss()

    requests, results, duration = _run(serve_app, num_requests, concurrency, seed=2)
    summary = summarize(results, duration)
    logger.info("load %d @ %d: %s", num_requests, concurrency, json.dumps(summary.to_dict()))

    def is_idle() -> bool:
        stats = serve_app.model_stats()
        return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0

    wait_for(is_idle, 15, what="the engine to be idle after the load")
    rss_after = _replica_rss()
    logger.info("replica RSS MiB before %s after %s", rss_before, rss_after)

    assert len(results) == num_requests
    unexpected = {status: n for status, n in summary.errors_by_status.items() if status not in ("429", "503")}
    assert not unexpected, (unexpected, [r.error for r in results if r.status in unexpected][:3])
    for request, result in zip(requests, results, strict=True):
        if result.ok:
            assert result.num_output_tokens == MAX_TOKENS, result
            assert result.finish_reason == "length"
            assert result.is_stream == request.is_stream
        else:  # a clean, OpenAI-shaped rejection
            error = json.loads(result.error or "")["error"]
            assert error["type"] and error["message"]
            if result.status == "429":
                assert result.retry_after is not None
    # Rejections are fine (the test app admits 4 running + 24 queued), but the app must do real work.
    assert summary.num_ok >= num_requests // 10, summary.errors_by_status
    assert summary.total_output_tokens == summary.num_ok * MAX_TOKENS
    growth = {name: rss_after[name] - rss_before[name] for name in DEPLOYMENTS}
    assert all(g <= RSS_GROWTH_BOUND_MIB for g in growth.values()), (rss_before, rss_after)


def test_load_bounded(serve_app):
    _check_load(serve_app, num_requests=200, concurrency=16, num_warmup=48)


@pytest.mark.slow
def test_load_full(serve_app):
    _check_load(serve_app, num_requests=1000, concurrency=64, num_warmup=128)
