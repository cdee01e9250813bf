"""Faults: replicas SIGKILLed mid-stream (by pid), and clients that hang up under load.

* Model replica killed while streams are running: every stream ends with an error event within
  seconds (never a hang, never a silent normal finish), and new requests succeed once Serve has
  replaced the replica (meanwhile they may get a clean JSON 503, never a 500 or a hang).
* Preprocessor replica killed while image requests are in flight: each of them gets an answer
  (200 or a clean JSON 5xx) and new image requests succeed after the replacement.
* Clients disconnecting mid-stream: the engine's running and waiting counts return to zero.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from tests.integration.conftest import APP_NAME, MAX_NUM_SEQS
from tests.reliability.corpus import chat_body, data_url, image_message, png_bytes
from tests.reliability.helpers import (
    CHAT,
    StreamLog,
    assert_openai_error,
    kill_replica,
    read_stream,
    replica_pids,
    wait_for,
)

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

MODEL_SERVER = "ModelServer"
PREPROCESSOR = "Preprocessor"
STREAM_END_BOUND_S = 10.0
"""An in-flight stream must end within this long after its replica is killed."""
RECOVERY_BOUND_S = 90.0
"""New requests must succeed within this long after a kill (replica restart on 2 busy cores)."""
LONG = 4000
"""max_tokens that cannot finish before the kill (ignore_eos keeps them generating)."""


def _headers(serve_app) -> dict[str, str]:
    return {"authorization": f"Bearer {serve_app.api_key}"}


def _request_until_ok(serve_app, body: dict, timeout_s: float = RECOVERY_BOUND_S) -> list[int]:
    """Send `body` until a 200; every earlier answer must be a clean JSON 503/429. Returns the statuses."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=serve_app.base_url, timeout=60.0) as client:
        while time.monotonic() < deadline:
            response = client.post(CHAT, json=body, headers=_headers(serve_app))
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
                return statuses
            assert_openai_error(response, {429, 503})
            time.sleep(0.5)
    raise AssertionError(f"no successful request within {timeout_s}s after the kill: {statuses}")


async def _streams_then_kill(
    serve_app, num_streams: int, deployment: str
) -> tuple[list[StreamLog], float, int]:
    """Start streams, wait until each has 3 chunks, SIGKILL the replica; return the logs, kill time, pid."""
    body = chat_body(
        "tell me a long story", model=serve_app.model, max_tokens=LONG, ignore_eos=True, temperature=0
    )
    logs = [StreamLog() for _ in range(num_streams)]
    async with httpx.AsyncClient(base_url=serve_app.base_url, timeout=STREAM_END_BOUND_S + 60) as client:
        tasks = [
            asyncio.create_task(read_stream(client, CHAT, body, _headers(serve_app), log)) for log in logs
        ]
        deadline = time.monotonic() + 60
        while not all(len(log.contents) >= 3 for log in logs):
            assert time.monotonic() < deadline, f"streams did not start: {[log.status for log in logs]}"
            for task in tasks:
                if task.done():
                    task.result()  # re-raise a client-side failure as it is
                    raise AssertionError(f"a stream ended before the kill: {[log.status for log in logs]}")
            await asyncio.sleep(0.05)
        killed_at = time.monotonic()
        pid = kill_replica(APP_NAME, deployment)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=STREAM_END_BOUND_S + 30)
    return logs, killed_at, pid


@pytest.mark.parametrize("num_streams", [3])  # < MAX_NUM_SEQS: all running, none queued
def test_model_replica_killed_mid_stream(serve_app, num_streams):
    logs, killed_at, pid = asyncio.run(_streams_then_kill(serve_app, num_streams, MODEL_SERVER))
    for log in logs:
        assert log.status == 200
        assert log.errors, f"stream ended without an error event (finish_reason={log.finish_reason})"
        assert log.finish_reason is None  # never a silent "normal" finish
        assert log.end_time - killed_at < STREAM_END_BOUND_S
        assert {"message", "type"} <= set(log.errors[0][1])
    statuses = _request_until_ok(serve_app, chat_body("hi", model=serve_app.model, max_tokens=4))
    new_pids = wait_for(lambda: replica_pids(APP_NAME, MODEL_SERVER), 30, what="a new ModelServer replica")
    assert pid not in new_pids
    logger.info("model kill: streams ended %.2fs after the kill; statuses before recovery %s",
                max(log.end_time for log in logs) - killed_at, statuses)  # fmt: skip


def test_preprocessor_killed_with_image_requests_in_flight(serve_app):
    async def burst() -> list[httpx.Response | BaseException]:
        async with httpx.AsyncClient(base_url=serve_app.base_url, timeout=90.0) as client:
            bodies = [
                chat_body(image_message(data_url(png_bytes(64, (i * 30 % 256, 90, 160)))), model=serve_app.model,
                          max_tokens=4)
                for i in range(8)
            ]  # fmt: skip
            tasks = [
                asyncio.create_task(client.post(CHAT, json=b, headers=_headers(serve_app))) for b in bodies
            ]
            await asyncio.sleep(0.05)
            kill_replica(APP_NAME, PREPROCESSOR)
            return await asyncio.gather(*tasks, return_exceptions=True)

    pid_before = replica_pids(APP_NAME, PREPROCESSOR)
    responses = asyncio.run(burst())
    for response in responses:
        assert isinstance(response, httpx.Response), f"no answer: {response!r}"  # e.g. a timeout = a hang
        if response.status_code != 200:
            assert_openai_error(response, 503)
    body = chat_body(image_message(data_url(png_bytes(48, (1, 2, 3)))), model=serve_app.model, max_tokens=4)
    _request_until_ok(serve_app, body)
    assert set(wait_for(lambda: replica_pids(APP_NAME, PREPROCESSOR), 30)) != set(pid_before)


def test_client_disconnects_free_engine_slots(serve_app):
    async def disconnecting_clients(num: int) -> list[StreamLog]:
        body = chat_body("go on", model=serve_app.model, max_tokens=LONG, ignore_eos=True)
        async with httpx.AsyncClient(base_url=serve_app.base_url, timeout=60.0) as client:
            logs = [StreamLog() for _ in range(num)]
            await asyncio.gather(
                *(
                    read_stream(client, CHAT, body, _headers(serve_app), log, stop_after_chunks=2)
                    for log in logs
                )
            )
            return logs

    _request_until_ok(serve_app, chat_body("warm", model=serve_app.model, max_tokens=2))  # replica is up
    logs = asyncio.run(disconnecting_clients(8))
    assert all(log.status == 200 and len(log.contents) >= 2 for log in logs)

    def is_idle() -> bool:
        stats = serve_app.model_stats()
        return stats.num_running == 0 and stats.num_waiting == 0

    wait_for(is_idle, 15, what="the engine to drop the disconnected requests")
    assert serve_app.model_stats().kv_cache_usage == 0.0


@pytest.mark.slow
def test_repeated_model_kills_under_load(serve_app):
    """Three kill/recover cycles, each with a full engine batch of streams in flight."""
    for _ in range(3):
        logs, killed_at, _ = asyncio.run(_streams_then_kill(serve_app, MAX_NUM_SEQS, MODEL_SERVER))
        assert all(log.errors and log.end_time - killed_at < STREAM_END_BOUND_S for log in logs)
        _request_until_ok(serve_app, chat_body("hi", model=serve_app.model, max_tokens=4))
