"""Load generator without a server: workload bodies, percentiles, summaries, import hygiene."""

from __future__ import annotations

import base64
import io
import math

import pytest
from PIL import Image

from cogvlm_ray.loadgen.client import RequestResult
from cogvlm_ray.loadgen.report import percentile, summarize
from cogvlm_ray.loadgen.workload import WorkloadSpec, build_requests


def _image_url(request) -> str | None:
    for part in request.body["messages"][0]["content"]:
        if part["type"] == "image_url":
            return part["image_url"]["url"]
    return None


def test_percentile_matches_linear_interpolation():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0], 50) == 2.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_workload_shares_are_exact_and_repeated_images_identical():
    spec = WorkloadSpec(image_size=64, image_share=0.5, repeat_image_share=0.5, stream_share=0.25, seed=3)
    requests = build_requests(spec, 40)
    with_image = [r for r in requests if r.has_image]
    repeated = [r for r in with_image if r.is_repeated_image]
    assert len(with_image) == 20
    assert len(repeated) == 10
    assert sum(r.is_stream for r in requests) == 10
    assert len({_image_url(r) for r in repeated}) == 1
    unique = [_image_url(r) for r in with_image if not r.is_repeated_image]
    assert len(set(unique)) == 10 and _image_url(repeated[0]) not in unique
    assert all(_image_url(r) is None for r in requests if not r.has_image)
    for r in requests:
        assert r.body["stream"] is r.is_stream
        assert ("stream_options" in r.body) is r.is_stream


def test_workload_images_decode_at_requested_size_and_are_deterministic():
    spec = WorkloadSpec(image_size=96, prompt_tokens=20, max_tokens=7, seed=1)
    first, again = build_requests(spec, 3), build_requests(spec, 3)
    assert [r.body for r in first] == [r.body for r in again]
    url = _image_url(first[0])
    assert url.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.size == (96, 96) and image.mode == "RGB"
    text = first[0].body["messages"][0]["content"][0]["text"]
    assert len(text.split()) >= 20
    assert first[0].body["ignore_eos"] is True and first[0].body["min_tokens"] == 7
    other = build_requests(WorkloadSpec(image_size=96, seed=2), 1)
    assert _image_url(other[0]) != url


def test_workload_without_ignore_eos_sends_no_extra_fields():
    body = build_requests(WorkloadSpec(ignore_eos=False, image_share=0.0, stream=False), 1)[0].body
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert len(body["messages"][0]["content"]) == 1


@pytest.mark.parametrize("bad", [{"image_share": 1.5}, {"repeat_image_share": -0.1}, {"max_tokens": 0}])
def test_workload_rejects_bad_spec(bad):
    with pytest.raises(ValueError):
        build_requests(WorkloadSpec(**bad), 1)


def test_summarize_counts_only_successes_and_groups_errors():
    def ok(i, ttft, itl, e2e, tokens):
        return RequestResult(
            index=i,
            status="200",
            is_stream=True,
            has_image=False,
            start=0.0,
            e2e_s=e2e,
            ttft_s=ttft,
            itl_s=itl,
            num_output_tokens=tokens,
            num_prompt_tokens=5,
        )

    results = [
        ok(0, 0.1, [0.01, 0.03], 0.2, 3),
        ok(1, 0.3, [0.02], 0.4, 2),
        RequestResult(index=2, status="429", is_stream=True, has_image=False, start=0.0, e2e_s=0.01),
        RequestResult(index=3, status="429", is_stream=False, has_image=True, start=0.0, e2e_s=0.01),
        RequestResult(index=4, status="stream_error", is_stream=True, has_image=True, start=0.0, e2e_s=0.5),
    ]
    summary = summarize(results, duration_s=2.0)
    assert summary.num_ok == 2 and summary.num_requests == 5
    assert summary.errors_by_status == {"429": 2, "stream_error": 1}
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_token_throughput == pytest.approx(2.5)
    assert summary.ttft_ms.p50 == pytest.approx(200.0)
    assert summary.itl_ms.count == 3 and summary.itl_ms.p50 == pytest.approx(20.0)
    assert summary.e2e_ms.max == pytest.approx(400.0)
    assert summary.total_prompt_tokens == 10
    empty = summarize([], 1.0).to_dict()
    assert empty["ttft_ms"]["p50"] is None  # NaN becomes null in JSON
