"""ModelServer / PreprocessServer over scripted engines: streaming, metrics, abort, health, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cogvlm_ray.contracts import PreparedPrompt, RequestOutput, SamplingParams
from cogvlm_ray.engine.stats import EngineStats
from cogvlm_ray.errors import EngineDeadError, ImageError, OverloadedError
from cogvlm_ray.serve.metrics import Metrics
from cogvlm_ray.serve.server import ModelServer, PreprocessServer

PROMPT = PreparedPrompt(input_ids=[1, 2, 3], token_type_ids=[0, 0, 0], image=None, image_hash=None)


class ScriptedEngine:
    """Honours the engine contract: yields `num_tokens` deltas, one per `step_s`."""

    def __init__(self, num_tokens: int = 4, step_s: float = 0.0, image_cache_hit: bool | None = None):
        self.num_tokens = num_tokens
        self.step_s = step_s
        self.image_cache_hit = image_cache_hit
        self.started = 0
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.dead = False
        self.shutdown_timeout: float | None = None
        self.overloaded = False

    async def start(self) -> None:
        self.started += 1

    def add_request(self, prepared, sampling_params, request_id) -> AsyncIterator[RequestOutput]:
        if self.overloaded:
            raise OverloadedError("engine queue is full")
        self.running.add(request_id)
        return self._stream(prepared, request_id)

    async def _stream(self, prepared, request_id) -> AsyncIterator[RequestOutput]:
        arrival = 100.0
        try:
            for i in range(self.num_tokens):
                await asyncio.sleep(self.step_s)
                if request_id in self.aborted:
                    return
                yield RequestOutput(
                    request_id, [10 + i], f"t{i}", "length" if i == self.num_tokens - 1 else None,
                    num_prompt_tokens=prepared.num_prompt_tokens, num_generated_tokens=i + 1,
                    arrival_time=arrival, first_scheduled_time=arrival + 0.5, first_token_time=arrival + 1.0,
                    emit_time=arrival + 1.0 + 0.25 * i, image_cache_hit=self.image_cache_hit,
                    num_cached_tokens=2,
                )  # fmt: skip
        finally:
            self.running.discard(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_waiting=2, kv_cache_usage=0.25)

    def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("engine loop died")

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        self.shutdown_timeout = timeout_s


def samples(metrics: Metrics) -> dict[str, float]:
    body, _ = metrics.render()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            # model_name is on every engine metric (checked in the first test); keys leave it out
            labels = sorted((k, v) for k, v in sample.labels.items() if k not in ("le", "model_name"))
            key = sample.name + "".join(f"[{k}={v}]" for k, v in labels)
            if "le" not in sample.labels:
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def collect(server: ModelServer, request_id: str = "r1") -> list[RequestOutput]:
    return [o async for o in server.generate(PROMPT, SamplingParams(max_tokens=4), request_id)]


def test_generate_streams_deltas_and_records_engine_metrics():
    engine = ScriptedEngine(num_tokens=4, image_cache_hit=True)
    server = ModelServer(lambda: engine, metrics=Metrics(), model_name="tiny")
    outputs = asyncio.run(collect(server))
    assert [o.new_text for o in outputs] == ["t0", "t1", "t2", "t3"] and outputs[-1].finished
    body = server.metrics.render()[0].decode()
    assert 'cogvlm_generation_tokens_total{model_name="tiny"} 4.0' in body
    assert 'cogvlm_prefix_cache_queries_total{model_name="tiny"} 3.0' in body
    assert 'cogvlm_prefix_cache_hits_total{model_name="tiny"} 2.0' in body
    assert engine.started >= 1 and engine.aborted == []
    s = samples(server.metrics)
    assert s["cogvlm_generation_tokens_total"] == 4
    assert s["cogvlm_prompt_tokens_total"] == 3
    assert s["cogvlm_request_success_total[finished_reason=length]"] == 1
    assert s["cogvlm_time_to_first_token_seconds_sum"] == pytest.approx(1.0)
    assert s["cogvlm_request_queue_time_seconds_sum"] == pytest.approx(0.5)
    assert s["cogvlm_inter_token_latency_seconds_count"] == 3
    assert s["cogvlm_inter_token_latency_seconds_sum"] == pytest.approx(0.75)
    assert s["cogvlm_e2e_request_latency_seconds_sum"] == pytest.approx(1.75)
    assert (s["cogvlm_image_cache_queries_total"], s["cogvlm_image_cache_hits_total"]) == (1, 1)


def test_consumer_going_away_aborts_the_request():
    engine = ScriptedEngine(num_tokens=100, step_s=0.001)
    server = ModelServer(lambda: engine, metrics=Metrics())

    async def take_two_then_close():
        stream = server.generate(PROMPT, SamplingParams(max_tokens=100), "gone")
        received = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return received

    assert len(asyncio.run(take_two_then_close())) == 2
    assert engine.aborted == ["gone"]
    assert "cogvlm_request_success_total[finished_reason=length]" not in samples(server.metrics)


def test_engine_rejections_surface_before_any_delta():
    engine = ScriptedEngine()
    engine.overloaded = True
    server = ModelServer(lambda: engine, metrics=Metrics())
    # Returned as the stream's only item, not raised: Ray Serve logs a traceback for every
    # exception raised in a replica.
    (error,) = asyncio.run(collect(server))
    assert isinstance(error, OverloadedError)


def test_a_failed_preprocessing_argument_is_passed_on_as_a_value():
    engine = ScriptedEngine()
    server = ModelServer(lambda: engine, metrics=Metrics())
    refused = ImageError("cannot decode image")
    outputs = asyncio.run(_collect_from(server, refused))
    assert outputs == [refused] and engine.running == set()


async def _collect_from(server: ModelServer, prepared) -> list:
    return [o async for o in server.generate(prepared, SamplingParams(max_tokens=4), "r")]


def test_gauges_health_and_shutdown():
    engine = ScriptedEngine()
    server = ModelServer(lambda: engine, metrics=Metrics(), shutdown_timeout_s=7)
    server.refresh_gauges()
    s = samples(server.metrics)
    assert (s["cogvlm_num_requests_waiting"], s["cogvlm_kv_cache_usage_perc"]) == (2, 0.25)
    server.check_health()
    engine.dead = True
    with pytest.raises(EngineDeadError):
        server.check_health()

    async def start_then_shutdown():
        await server.start()
        await server.shutdown()

    asyncio.run(start_then_shutdown())
    assert engine.shutdown_timeout == 7
    assert samples(server.metrics)["cogvlm_num_requests_running"] == 0


def test_preprocess_server_times_prepare():
    class Prep:
        def prepare(self, messages, *, max_tokens, template_version):
            assert (max_tokens, template_version) == (5, "vqa")
            return PROMPT

    server = PreprocessServer(Prep(), metrics=Metrics())
    assert asyncio.run(server.prepare([{"role": "user", "content": "x"}], 5, "vqa")) is PROMPT
    assert samples(server.metrics)["cogvlm_preprocess_seconds_count"] == 1


def test_preprocess_server_returns_client_errors_instead_of_raising():
    class Prep:
        max_model_len = 8192

        def prepare(self, messages, *, max_tokens, template_version):
            raise ImageError("cannot decode image")

        def tokenize(self, conversation, *, template_version):
            return PROMPT

        def encode_text(self, text, *, add_special_tokens=True):
            return [5, 6]

        def decode(self, token_ids):
            raise ImageError("never")

    from cogvlm_ray.api.tokenize import TokenizeJob

    server = PreprocessServer(Prep(), metrics=Metrics())
    assert isinstance(asyncio.run(server.prepare([], 5, None)), ImageError)
    assert isinstance(asyncio.run(server.detokenize([1])), ImageError)
    result = asyncio.run(server.tokenize(TokenizeJob(prompt="ab")))
    assert (result.token_ids, result.max_model_len) == ([5, 6], 8192)
