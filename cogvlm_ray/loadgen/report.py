"""Turn per-request results into the usual serving figures.

Latency percentiles use linear interpolation between order statistics (numpy's default).
TTFT and ITL come from streaming requests only; e2e from every successful request.
Throughputs divide by the wall time of the whole run (first send to last completion), and
count successful requests and their output tokens only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

from cogvlm_ray.loadgen.client import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for an empty list."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LatencyStats:
    """Milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of_seconds(cls, values_s: list[float]) -> LatencyStats:
        ms = [v * 1000.0 for v in values_s]
        return cls(
            mean=sum(ms) / len(ms) if ms else math.nan,
            p50=percentile(ms, 50),
            p90=percentile(ms, 90),
            p99=percentile(ms, 99),
            max=max(ms) if ms else math.nan,
            count=len(ms),
        )


@dataclass
class RunSummary:
    num_requests: int
    num_ok: int
    duration_s: float
    request_throughput: float
    """Successful requests per second."""
    output_token_throughput: float
    """Output tokens of successful requests per second."""
    total_output_tokens: int
    total_prompt_tokens: int
    errors_by_status: dict[str, int]
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats

    def to_dict(self) -> dict:
        return _finite(asdict(self))


def summarize(results: list[RequestResult], duration_s: float) -> RunSummary:
    ok = [r for r in results if r.ok]
    stream_ok = [r for r in ok if r.is_stream and r.ttft_s is not None]
    output_tokens = sum(r.num_output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    errors = Counter(r.status for r in results if not r.ok)
    return RunSummary(
        num_requests=len(results),
        num_ok=len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) / duration,
        output_token_throughput=output_tokens / duration,
        total_output_tokens=output_tokens,
        total_prompt_tokens=sum(r.num_prompt_tokens or 0 for r in ok),
        errors_by_status=dict(sorted(errors.items())),
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in stream_ok if r.ttft_s is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in stream_ok for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in ok]),
    )


def format_summary(label: str, summary: RunSummary) -> str:
    """A few human-readable lines for the terminal."""
    s = summary
    errors = ", ".join(f"{k}: {v}" for k, v in s.errors_by_status.items()) or "none"
    return "\n".join(
        [
            f"== {label}: {s.num_ok}/{s.num_requests} ok in {s.duration_s:.2f}s; errors {errors}",
            f"   throughput {s.request_throughput:.2f} req/s, {s.output_token_throughput:.1f} output tok/s",
            f"   TTFT ms p50 {s.ttft_ms.p50:.1f} p90 {s.ttft_ms.p90:.1f} p99 {s.ttft_ms.p99:.1f}",
            f"   ITL  ms p50 {s.itl_ms.p50:.1f} p90 {s.itl_ms.p90:.1f} p99 {s.itl_ms.p99:.1f}",
            f"   e2e  ms p50 {s.e2e_ms.p50:.1f} p90 {s.e2e_ms.p90:.1f} p99 {s.e2e_ms.p99:.1f}",
        ]
    )


def _finite(value):
    """JSON has no NaN: replace it with None recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
