"""The OpenAI sampling features end to end on the tiny model: the real ingress, PreprocessServer,
ModelServer and Engine in this process (no Ray). Responses are checked against the installed
`openai` package's own response types."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.engine import Engine
from cogvlm_ray.engine.config import EngineConfig
from cogvlm_ray.model import load_model
from cogvlm_ray.preprocess import Preprocessor
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from cogvlm_ray.serve.metrics import Metrics
from cogvlm_ray.serve.server import ModelServer, PreprocessServer
from tests.unit.serve.local_backend import LocalBackend

MESSAGES = [{"role": "user", "content": "Describe a cat in one sentence."}]


@pytest.fixture(scope="module")
def client(fixture_dir):
    model = load_model(fixture_dir, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))
    config = EngineConfig(max_kv_tokens=8192, block_size=4)
    metrics = Metrics()
    backend = LocalBackend(
        PreprocessServer(Preprocessor(fixture_dir), metrics=metrics),
        ModelServer(lambda: Engine(model, tokenizer, config), metrics=metrics, model_name="tiny"),
    )
    app = create_app(backend, IngressSettings(served_model_names=("tiny",), max_n=config.max_n), metrics)
    with TestClient(app) as test_client:  # one event loop for the engine's background task
        yield test_client


def chat(client: TestClient, **body) -> dict:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, **body}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: TestClient, **body) -> list[dict]:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True, **body}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    events = [e[len("data: ") :] for e in text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_greedy_logprobs_are_the_max_of_their_top_logprobs(client):
    body = chat(client, logprobs=True, top_logprobs=5)
    completion = ChatCompletion.model_validate(body)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 5
        best = max(entry.top_logprobs, key=lambda t: t.logprob)
        assert entry.logprob == pytest.approx(best.logprob)
        assert entry.token == best.token and entry.bytes == best.bytes
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.logprob <= 0.0


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
    whole = chat(client, logprobs=True, top_logprobs=3)["choices"][0]["logprobs"]["content"]
    chunks = [ChatCompletionChunk.model_validate(c) for c in stream(client, logprobs=True, top_logprobs=3)]
    streamed = [
        e.model_dump() for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content
    ]
    assert streamed == whole


def test_no_logprobs_unless_asked(client):
    assert chat(client)["choices"][0]["logprobs"] is None
    assert all(ch["logprobs"] is None for c in stream(client) for ch in c["choices"])


def test_n_greedy_choices_are_identical_and_indexed(client):
    body = chat(client, n=3)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["message"]["content"] for c in choices}) == 1
    one = chat(client)["choices"][0]["message"]["content"]
    assert choices[0]["message"]["content"] == one
    assert body["usage"]["completion_tokens"] == 3 * chat(client)["usage"]["completion_tokens"]


def test_n_seeded_choices_are_reproducible_and_streamed_per_index(client):
    first = chat(client, n=3, temperature=1.0, seed=1234, max_tokens=8)
    second = chat(client, n=3, temperature=1.0, seed=1234, max_tokens=8)
    assert [c["message"]["content"] for c in first["choices"]] == [
        c["message"]["content"] for c in second["choices"]
    ]
    chunks = stream(client, n=3, temperature=1.0, seed=1234, max_tokens=8)
    by_index: dict[int, str] = {}
    finishes: dict[int, int] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            by_index[choice["index"]] = by_index.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
            finishes[choice["index"]] = finishes.get(choice["index"], 0) + (
                choice["finish_reason"] is not None
            )
    assert by_index == {c["index"]: c["message"]["content"] for c in first["choices"]}
    assert finishes == {0: 1, 1: 1, 2: 1}


def test_logit_bias_presence_penalty_and_min_p_reach_the_sampler(client):
    greedy = chat(client, logprobs=True)["choices"][0]["logprobs"]["content"]
    tokenizer_id = client.post("/tokenize", json={"prompt": "cat", "add_special_tokens": False}).json()[
        "tokens"
    ][0]
    biased = chat(client, logprobs=True, logit_bias={str(tokenizer_id): 100})["choices"][0]["logprobs"][
        "content"
    ]
    expected = client.post("/detokenize", json={"tokens": [tokenizer_id]}).json()["prompt"]
    assert [e["token"] for e in biased] == [expected] * len(biased) != [e["token"] for e in greedy]
    penalised = chat(
        client, logprobs=True, logit_bias={str(tokenizer_id): 3}, presence_penalty=2.0, frequency_penalty=2.0
    )
    assert penalised["choices"][0]["message"]["content"].count(expected) <= 1 < len(biased)
    # min_p = 1 keeps only the most likely token, so sampling at temperature 1 is greedy
    sampled = chat(client, temperature=1.0, min_p=1.0, seed=7)["choices"][0]["message"]["content"]
    assert sampled == chat(client)["choices"][0]["message"]["content"]


def test_cached_tokens_count_prefix_cache_hits(client):
    messages = [{"role": "user", "content": "A long shared prefix about cats and dogs, repeated. " * 4}]
    first = chat(client, messages=messages)["usage"]
    second = chat(client, messages=messages)["usage"]
    # The template's preamble may already be cached from earlier requests; the text is new.
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert first["prompt_tokens_details"]["cached_tokens"] < cached <= second["prompt_tokens"]
    assert cached >= second["prompt_tokens"] - 4  # every full block of 4 tokens was reused
    chunks = stream(client, messages=messages, stream_options={"include_usage": True})
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_continuous_usage_stats_count_up(client):
    chunks = stream(client, stream_options={"include_usage": True, "continuous_usage_stats": True})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert (
        counts == sorted(counts)
        and counts[-1] == chunks[-1]["usage"]["total_tokens"] - chunks[-1]["usage"]["prompt_tokens"]
    )
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)


def test_tokenize_counts_what_the_model_sees(client, fixture_dir):
    usage = chat(client)["usage"]
    counted = client.post("/tokenize", json={"messages": MESSAGES}).json()
    assert counted["count"] == usage["prompt_tokens"] == len(counted["tokens"])
    assert counted["max_model_len"] > 0
    image = base64.b64encode((fixture_dir / "images" / "img_gray.png").read_bytes()).decode()
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                   {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]  # fmt: skip
    image_count = client.post("/tokenize", json={"messages": with_image}).json()["count"]
    assert image_count == chat(client, messages=with_image, max_tokens=1)["usage"]["prompt_tokens"]
    text = client.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert client.post("/detokenize", json={"tokens": text["tokens"]}).json() == {"prompt": "hello world"}
    assert client.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert client.post("/tokenize", json={"messages": []}).status_code == 400
