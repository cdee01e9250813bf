"""OpenAI compatibility on the live app (few, cheap cases; the rest is tests/unit/api and
tests/unit/serve over the real ingress): the official client with the sampling fields and
the harmless ones, /tokenize, one x-request-id, and the replica logs of a bad image and of a
disconnect."""

from __future__ import annotations

import glob
import os
import time
import uuid

import httpx
import openai
import pytest

from tests.integration.conftest import ServeApp
from tests.integration.test_serve_app import TEXT, image_message

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def client(serve_app: ServeApp) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=serve_app.base_url + "/v1", api_key=serve_app.api_key, max_retries=0, timeout=60
    )


def test_the_official_client_with_sampling_and_harmless_fields(client: openai.OpenAI, serve_app: ServeApp):
    completion = client.chat.completions.create(
        model=serve_app.model, messages=TEXT, max_tokens=4, temperature=0, n=2, logprobs=True, top_logprobs=2,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"13": -5}, seed=3,
        store=False, metadata={"suite": "integration"}, service_tier="auto", reasoning_effort="low", user="u-1",
        extra_body={"min_p": 0.05, "some_framework_field": True},
    )  # fmt: skip
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].message.content == completion.choices[1].message.content  # greedy
    for entry in completion.choices[0].logprobs.content:
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
    assert completion.usage.prompt_tokens_details.cached_tokens is not None
    chunks = list(client.chat.completions.create(
        model=serve_app.model, messages=TEXT, max_tokens=4, temperature=0, stream=True, logprobs=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ))  # fmt: skip
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in completion.choices[0].logprobs.content]
    assert all(c.usage is not None for c in chunks)
    with pytest.raises(openai.BadRequestError) as info:  # legacy functions stay refused; tools are served
        client.chat.completions.create(model=serve_app.model, messages=TEXT, functions=[
            {"name": "f", "parameters": {"type": "object"}}])  # fmt: skip
    assert info.value.status_code == 400 and info.value.body["param"] == "functions"


def test_tokenize_and_one_request_id(serve_app: ServeApp):
    headers = {**serve_app.headers, "x-request-id": "compat-trace-1"}
    response = httpx.post(serve_app.base_url + "/v1/chat/completions", headers=headers, timeout=60,
                          json={"messages": TEXT, "max_tokens": 1})  # fmt: skip
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["compat-trace-1"]
    assert response.json()["id"] == "chatcmpl-compat-trace-1"
    counted = httpx.post(
        serve_app.base_url + "/tokenize", headers=serve_app.headers, json={"messages": TEXT}
    ).json()
    assert counted["count"] == response.json()["usage"]["prompt_tokens"]


def _serve_log_lines(marker: str) -> list[str]:
    import ray

    logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
    lines: list[str] = []
    for path in glob.glob(os.path.join(logs_dir, "serve", "*.log")):
        with open(path, errors="replace") as f:
            lines += [line.rstrip("\n") for line in f if marker in line]
    return lines


def _wait_for(marker: str, predicate, timeout_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    lines = _serve_log_lines(marker)
    while not predicate(lines) and time.monotonic() < deadline:
        time.sleep(0.3)
        lines = _serve_log_lines(marker)
    return lines


def test_a_bad_image_and_a_disconnect_each_log_one_line(serve_app: ServeApp):
    bad = f"compat-bad-image-{uuid.uuid4().hex[:6]}"
    body = {"messages": image_message("data:image/png;base64,bm90IGFuIGltYWdl"), "max_tokens": 2}
    response = httpx.post(serve_app.base_url + "/v1/chat/completions", json=body, timeout=60,
                          headers={**serve_app.headers, "x-request-id": bad})  # fmt: skip
    assert response.status_code == 400
    lines = _wait_for(bad, lambda found: any("invalid_image" in line for line in found))
    assert len([line for line in lines if "invalid_image" in line]) == 1, lines
    assert not [line for line in lines if "Request failed" in line or "Traceback" in line], lines

    gone = f"compat-disconnect-{uuid.uuid4().hex[:6]}"
    body = {"messages": TEXT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", serve_app.base_url + "/v1/chat/completions", json=body, timeout=60,
                      headers={**serve_app.headers, "x-request-id": gone}) as streamed:  # fmt: skip
        lines_iter = streamed.iter_lines()
        [next(lines_iter) for _ in range(4)]
    lines = _wait_for(gone, lambda found: any("client disconnected" in line for line in found))
    assert len([line for line in lines if "client disconnected" in line]) == 1, lines
    assert not [line for line in lines if "Traceback" in line or "TaskCancelledError" in line], lines

    done = f"compat-complete-{uuid.uuid4().hex[:6]}"
    body = {"messages": TEXT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", serve_app.base_url + "/v1/chat/completions", json=body, timeout=60,
                      headers={**serve_app.headers, "x-request-id": done}) as streamed:  # fmt: skip
        assert "data: [DONE]" in list(streamed.iter_lines())
    time.sleep(1.0)
    assert not [line for line in _serve_log_lines(done) if "disconnect" in line.lower()]
