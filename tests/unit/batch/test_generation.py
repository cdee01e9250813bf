"""The engine stage without Ray: all rows of a call are in the engine at once, errors become rows."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow as pa
import pytest

from cogvlm_ray.batch import generation
from cogvlm_ray.batch.generation import EngineStage
from cogvlm_ray.batch.preprocessing import sampling_to_json
from cogvlm_ray.batch.schema import PREPARED_SCHEMA, error_json, to_table
from cogvlm_ray.contracts import RequestOutput, SamplingParams
from cogvlm_ray.errors import EngineDeadError, ImageError, PromptTooLongError


class CountingEngine:
    """Answers each request with its prompt length as tokens, after every request has arrived."""

    def __init__(self, expected: int, refuse_long: int = 10**9, dead: bool = False):
        self.expected = expected
        self.refuse_long = refuse_long
        self.dead = dead
        self.in_flight = 0
        self.max_in_flight = 0
        self.all_arrived = asyncio.Event()

    async def start(self) -> None: ...

    def add_request(self, prepared, sampling_params, request_id):
        if self.dead:
            raise EngineDeadError("engine loop died")
        if len(prepared.input_ids) > self.refuse_long:
            raise PromptTooLongError("too long")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.in_flight >= self.expected:
            self.all_arrived.set()
        return self._stream(prepared, request_id)

    async def _stream(self, prepared, request_id):
        await asyncio.wait_for(self.all_arrived.wait(), 5)  # deadlocks unless submitted concurrently
        n = len(prepared.input_ids)
        yield RequestOutput(
            request_id, new_token_ids=[n], new_text="a", num_prompt_tokens=n, num_generated_tokens=1
        )
        yield RequestOutput(request_id, new_token_ids=[n + 1], new_text="b", finish_reason="length",
                            num_prompt_tokens=n, num_generated_tokens=2)  # fmt: skip
        self.in_flight -= 1


def _prepared(row_id: str, num_tokens: int, *, image: bool = False, error: str | None = None) -> dict:
    pixels = np.zeros((3, 4, 4), np.uint8).tobytes() if image else None
    return {"id": row_id, "source": None, "sampling": sampling_to_json(SamplingParams(max_tokens=2)),
            "input_ids": [1] * num_tokens, "token_type_ids": [0] * num_tokens, "pixels": pixels,
            "image_size": 4 if image else None, "image_hash": "h" if image else None, "error": error}  # fmt: skip


def _run(stage: EngineStage, rows: list[dict]) -> list[dict]:
    return asyncio.run(stage(to_table(rows, PREPARED_SCHEMA))).to_pylist()


def test_every_row_of_a_call_is_submitted_at_once_and_errors_become_rows():
    engine = CountingEngine(expected=3, refuse_long=50)
    stage = EngineStage(lambda: engine, max_in_flight=8)
    upstream = error_json(ImageError("bad"))
    rows = [_prepared("a", 3), _prepared("b", 4, image=True), _prepared("c", 5), _prepared("d", 60),
            _prepared("e", 0, error=upstream)]  # fmt: skip
    out = {r["id"]: r for r in _run(stage, rows)}
    assert engine.max_in_flight == 3
    assert (
        out["a"]["text"] == "ab" and out["a"]["token_ids"] == [3, 4] and out["a"]["finish_reason"] == "length"
    )
    assert (out["b"]["prompt_tokens"], out["b"]["completion_tokens"]) == (4, 2)
    assert json.loads(out["d"]["error"])["error"]["code"] == "context_length_exceeded"
    assert out["e"]["error"] == upstream


def test_max_in_flight_bounds_what_is_in_the_engine():
    engine = CountingEngine(expected=2)
    stage = EngineStage(lambda: engine, max_in_flight=2)
    out = _run(stage, [_prepared(str(i), 2) for i in range(4)])
    assert engine.max_in_flight == 2 and all(r["error"] is None for r in out)


def test_a_dead_engine_exits_the_actor_for_ray_to_restart(monkeypatch):
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(generation.os, "_exit", fake_exit)
    stage = EngineStage(lambda: CountingEngine(expected=1, dead=True), max_in_flight=4)
    with pytest.raises(SystemExit):
        _run(stage, [_prepared("a", 2)])
    assert exits == [1]


def test_table_schema_is_exact():
    engine = CountingEngine(expected=1)
    table = asyncio.run(
        EngineStage(lambda: engine, max_in_flight=1)(to_table([_prepared("a", 1)], PREPARED_SCHEMA))
    )
    assert isinstance(table, pa.Table) and table.schema.names[:3] == ["id", "source", "text"]
