"""serve/streaming.py: coalescing deltas never loses, reorders or delays tokens beyond the interval."""

from __future__ import annotations

import asyncio
import time

import pytest

from cogvlm_ray.contracts import RequestOutput, merge_outputs
from cogvlm_ray.serve.server import ModelServer
from cogvlm_ray.serve.streaming import coalesce


def delta(i: int, *, last: bool = False) -> RequestOutput:
    now = time.monotonic()
    return RequestOutput(
        request_id="r",
        new_token_ids=[i],
        new_text=f"t{i} ",
        finish_reason="length" if last else None,
        num_prompt_tokens=5,
        num_generated_tokens=i + 1,
        arrival_time=1.0,
        first_token_time=now if i == 0 else None,
        emit_time=now,
        image_cache_hit=True if i == 0 else None,
    )


async def produce(n: int, gap_s: float, closed: list[bool] | None = None):
    try:
        for i in range(n):
            if i:
                await asyncio.sleep(gap_s)
            yield delta(i, last=i == n - 1)
    finally:
        if closed is not None:
            closed.append(True)


async def collect(interval_s: float, n: int, gap_s: float) -> list[tuple[float, RequestOutput]]:
    start = time.monotonic()
    return [(time.monotonic() - start, o) async for o in coalesce(produce(n, gap_s), interval_s)]


def test_interval_zero_passes_every_delta_through():
    out = asyncio.run(collect(0.0, 6, 0.001))
    assert [o.new_token_ids for _, o in out] == [[i] for i in range(6)]


def test_coalesced_stream_has_the_same_tokens_text_and_counts():
    out = asyncio.run(collect(0.05, 30, 0.005))
    outputs = [o for _, o in out]
    assert sum((o.new_token_ids for o in outputs), []) == list(range(30))
    assert "".join(o.new_text for o in outputs) == "".join(f"t{i} " for i in range(30))
    assert len(outputs) < 30 / 3  # actually coalesced (a 5 ms producer, 50 ms interval)
    assert outputs[0].new_token_ids == [0]  # the first token is never held back (TTFT)
    assert outputs[0].first_token_time is not None and outputs[0].image_cache_hit is True
    assert [o.finish_reason for o in outputs] == [None] * (len(outputs) - 1) + ["length"]
    assert outputs[-1].num_generated_tokens == 30


def test_a_held_delta_goes_out_when_its_interval_expires_even_if_the_engine_is_silent():
    # Tokens 20 ms apart, then the producer stalls 400 ms before the last one: the tokens made
    # before the stall must not wait for it.
    async def stalling():
        for i in range(4):
            await asyncio.sleep(0.02)
            yield delta(i)
        await asyncio.sleep(0.4)
        yield delta(4, last=True)

    async def run():
        start = time.monotonic()
        return [(time.monotonic() - start, o) async for o in coalesce(stalling(), 0.05)]

    out = asyncio.run(run())
    before_stall = [t for t, o in out if 4 not in o.new_token_ids]
    assert sum(len(o.new_token_ids) for t, o in out if 4 not in o.new_token_ids) == 4
    assert max(before_stall) < 0.3  # flushed by the timer, not by the last token at ~0.48 s


def test_closing_the_coalesced_stream_closes_the_source():
    closed: list[bool] = []

    async def run():
        stream = coalesce(produce(100, 0.01, closed), 0.05)
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(run())
    assert closed == [True]


def test_merge_keeps_start_marks_from_the_first_and_progress_from_the_later():
    a, b = delta(0), delta(1, last=True)
    merged = merge_outputs(a, b)
    assert merged.new_token_ids == [0, 1] and merged.new_text == "t0 t1 "
    assert merged.first_token_time == a.first_token_time and merged.emit_time == b.emit_time
    assert merged.finish_reason == "length" and merged.num_generated_tokens == 2


class _Engine:
    def __init__(self):
        self.aborted: list[str] = []

    async def start(self):
        pass

    def add_request(self, prepared, sampling_params, request_id):
        return produce(12, 0.005)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def get_stats(self):
        from cogvlm_ray.engine.stats import EngineStats

        return EngineStats()

    def check_health(self):
        pass

    async def shutdown(self, timeout_s=30.0):
        pass


@pytest.mark.parametrize("interval_s", [0.0, 0.03])
def test_model_server_streams_every_token_with_or_without_coalescing(interval_s):
    async def run():
        server = ModelServer(_Engine, stream_interval_s=interval_s)
        outs = [o async for o in server.generate(None, None, "r")]
        await server.shutdown()
        return server, outs

    server, outs = asyncio.run(run())
    assert sum((o.new_token_ids for o in outs), []) == list(range(12))
    assert outs[-1].finished and server.engine.aborted == []


def test_choices_of_an_n_request_are_coalesced_separately():
    """n > 1 interleaves choices in one stream; deltas of different choices never merge."""

    async def interleaved():
        for i in range(20):
            for index in range(3):
                await asyncio.sleep(0.002)
                output = delta(i, last=i == 19)
                output.index = index
                yield output

    async def run() -> list[RequestOutput]:
        return [o async for o in coalesce(interleaved(), 0.05)]

    outputs = asyncio.run(run())
    assert len(outputs) < 60 / 2  # coalesced
    for index in range(3):
        mine = [o for o in outputs if o.index == index]
        assert sum((o.new_token_ids for o in mine), []) == list(range(20))
        assert [o.finish_reason for o in mine] == [None] * (len(mine) - 1) + ["length"]
