"""The real app (Ingress -> Preprocessor -> ModelServer) on the tiny random model, over HTTP,
driven by the official `openai` client and raw httpx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from cogvlm_ray.serve.metrics import exported_metric_names
from tests.integration.conftest import MAX_NUM_SEQS, ServeApp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TEXT = [{"role": "user", "content": "Tell me a short story about a cat."}]


def image_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.fixture(scope="module")
def client(serve_app: ServeApp) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=serve_app.base_url + "/v1", api_key=serve_app.api_key, max_retries=0, timeout=60
    )


def post(serve_app: ServeApp, body: dict, **kwargs) -> httpx.Response:
    kwargs.setdefault("headers", serve_app.headers)
    return httpx.post(serve_app.base_url + "/v1/chat/completions", json=body, timeout=60, **kwargs)


def test_health_and_models(serve_app: ServeApp, client: openai.OpenAI):
    assert httpx.get(serve_app.base_url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [serve_app.model]


def test_text_chat_and_usage(serve_app: ServeApp, client: openai.OpenAI):
    completion = client.chat.completions.create(
        model=serve_app.model, messages=TEXT, max_tokens=12, temperature=0
    )
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 1 <= usage.completion_tokens <= 12
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12


def test_image_chat_counts_image_positions_in_prompt(serve_app: ServeApp, client: openai.OpenAI):
    question = "What is in this picture?"
    text_only = client.chat.completions.create(
        model=serve_app.model, messages=[{"role": "user", "content": question}], max_tokens=4, temperature=0
    )
    with_image = client.chat.completions.create(
        model=serve_app.model, messages=image_message(image_data_url(), question), max_tokens=4, temperature=0
    )
    assert with_image.choices[0].finish_reason in ("stop", "length")
    # The image adds its vision positions (boi + patches + eoi) to the prompt; the text-only chat
    # template may add a system preamble, so only "more tokens" is asserted here.
    assert with_image.usage.prompt_tokens != text_only.usage.prompt_tokens


@pytest.mark.parametrize("with_image", [False, True])
def test_stream_joined_equals_non_stream_for_greedy(
    serve_app: ServeApp, client: openai.OpenAI, with_image: bool
):
    messages = image_message(image_data_url((10, 120, 240))) if with_image else TEXT
    full = client.chat.completions.create(
        model=serve_app.model, messages=messages, max_tokens=24, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=serve_app.model, messages=messages, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    choice_chunks = [c for c in chunks if c.choices]
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in choice_chunks]
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == full.choices[0].message.content
    assert chunks[-1].choices == []
    # The counts agree; cached_tokens may not (the second request reuses the first's prefix).
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(chunks[-1].usage, k) for k in counts] == [getattr(full.usage, k) for k in counts]


def test_raw_sse_framing_ends_with_done(serve_app: ServeApp):
    with httpx.stream("POST", serve_app.base_url + "/v1/chat/completions", headers=serve_app.headers, timeout=60,
                      json={"messages": TEXT, "max_tokens": 5, "stream": True}) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert all("error" not in json.loads(line[6:]) for line in lines[:-1])


def _two_images() -> list[dict]:
    first, second = image_data_url((255, 0, 0)), image_data_url((0, 0, 255))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": first}},
                                         {"type": "image_url", "image_url": {"url": second}},
                                         {"type": "text", "text": "Compare."}]}]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        ({"messages": image_message("data:image/png;base64,bm90IGFuIGltYWdl")}, None, 400),
        ({"messages": _two_images()}, None, 400),
        ({"messages": TEXT, "n": 9}, None, 400),
        ({"messages": TEXT, "max_tokens": 100_000}, None, 400),
        ({"messages": TEXT}, {"Authorization": "Bearer wrong"}, 401),
        ({"messages": TEXT}, {}, 401),
        ({"messages": TEXT, "model": "gpt-4o"}, None, 404),
        ({"messages": [{"role": "user", "content": "x" * 60_000}] * 40}, None, 413),
        ({"messages": TEXT, "temperature": 5}, None, 400),  # schema errors are 400s, never 422
        ({"messages": TEXT, "functions": [{"name": "f"}]}, None, 400),  # legacy; tools are served
    ],
)
def test_error_statuses_are_openai_shaped_and_server_survives(serve_app: ServeApp, body, headers, status):
    kwargs = {} if headers is None else {"headers": headers}
    for stream in (False, True):
        response = post(serve_app, {**body, "stream": stream}, **kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert post(serve_app, {"messages": TEXT, "max_tokens": 2}).status_code == 200


async def _one_request(client: httpx.AsyncClient, stream: bool) -> tuple[int, str, dict]:
    body = {"messages": TEXT, "max_tokens": 200, "ignore_eos": True, "stream": stream}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        text = (await response.aread()).decode()
        return response.status_code, text, dict(response.headers)


def test_full_model_queue_is_429_with_retry_after(serve_app: ServeApp):
    async def burst():
        async with httpx.AsyncClient(base_url=serve_app.base_url, headers=serve_app.headers, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as client:  # fmt: skip
            return await asyncio.gather(*(_one_request(client, i % 2 == 0) for i in range(60)))

    results = asyncio.run(burst())
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= MAX_NUM_SEQS
    for status, text, headers in results:
        if status == 429:
            assert json.loads(text)["error"]["type"] == "rate_limit_error"
            assert int(headers["retry-after"]) >= 1
        elif headers["content-type"].startswith("text/event-stream"):
            assert text.endswith("data: [DONE]\n\n") and '"error"' not in text
        else:
            assert json.loads(text)["usage"]["completion_tokens"] == 200


def test_twenty_concurrent_streams_all_complete(serve_app: ServeApp):
    async def run():
        client = openai.AsyncOpenAI(
            base_url=serve_app.base_url + "/v1", api_key=serve_app.api_key, max_retries=0
        )

        async def one(i: int) -> tuple[str, str]:
            stream = await client.chat.completions.create(
                model=serve_app.model, messages=[{"role": "user", "content": f"Story number {i}"}],
                max_tokens=16, stream=True, seed=i,
            )  # fmt: skip
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        try:
            return await asyncio.gather(*(one(i) for i in range(20)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 20
    assert all(reason in ("stop", "length") for _, reason in results)


def test_client_disconnect_frees_the_engine_slot(serve_app: ServeApp):
    before = serve_app.model_stats().total_generated_tokens
    body = {"messages": TEXT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", serve_app.base_url + "/v1/chat/completions", json=body,
                      headers=serve_app.headers, timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
    assert any('"content"' in line for line in received)
    deadline = time.monotonic() + 20
    stats = serve_app.model_stats()
    while (stats.num_running or stats.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = serve_app.model_stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    time.sleep(0.5)
    generated = serve_app.model_stats().total_generated_tokens - before
    assert generated < 3000, "generation should stop after the client went away"


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def _value(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_show_every_documented_name_with_plausible_values(serve_app: ServeApp, client: openai.OpenAI):
    url = image_data_url((1, 2, 3))
    for _ in range(2):  # the second identical image is a feature-cache hit
        client.chat.completions.create(
            model=serve_app.model, messages=image_message(url), max_tokens=6, temperature=0
        )
    client.chat.completions.create(model=serve_app.model, messages=TEXT, max_tokens=6, temperature=0)
    post(serve_app, {"messages": TEXT, "n": 3})

    samples = _samples(httpx.get(serve_app.base_url + "/metrics").text)
    missing = exported_metric_names(include_ray=False) - set(samples)
    assert not missing, f"documented metrics missing from /metrics: {sorted(missing)}"
    assert _value(samples, "cogvlm_generation_tokens_total") >= 18
    assert (
        _value(samples, "cogvlm_prompt_tokens_total")
        > _value(samples, "cogvlm_generation_tokens_total") / 100
    )
    assert _value(samples, "cogvlm_request_success_total") >= 3
    assert _value(samples, "cogvlm_image_cache_queries_total") >= 2
    assert (
        1
        <= _value(samples, "cogvlm_image_cache_hits_total")
        <= _value(samples, "cogvlm_image_cache_queries_total")
    )
    assert _value(samples, "cogvlm_http_requests_total", route="/v1/chat/completions", status="200") >= 3
    assert _value(samples, "cogvlm_http_requests_total", route="/v1/chat/completions", status="400") >= 1
    assert _value(samples, "cogvlm_preprocess_seconds_count") >= 3
    ttft_count = _value(samples, "cogvlm_time_to_first_token_seconds_count")
    assert ttft_count == _value(samples, "cogvlm_e2e_request_latency_seconds_count") or ttft_count >= 3
    assert 0.0 <= _value(samples, "cogvlm_kv_cache_usage_perc") <= 1.0
    assert _value(samples, "cogvlm_num_requests_running") >= 0


def test_metrics_also_reach_rays_exporter(serve_app: ServeApp):
    deadline = time.monotonic() + 30
    while True:
        try:
            text = httpx.get(serve_app.ray_metrics_url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        if "ray_cogvlm_generation_tokens_total" in text or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "ray_cogvlm_generation_tokens_total" in text
    assert "ray_cogvlm_time_to_first_token_seconds_bucket" in text
