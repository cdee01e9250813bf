"""Shared tools of the reliability suites: replica processes, memory, SSE streams, polling."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

CHAT = "/v1/chat/completions"


def replica_pids(app_name: str, deployment: str) -> list[int]:
    """Pids of the ALIVE replicas of one deployment, from this cluster's GCS actor table.

    The table is scoped to our own cluster, so other Ray clusters on the machine are never touched.
    """
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE")
    name = f"ServeReplica:{app_name}:{deployment}"
    return sorted(int(a["Pid"]) for a in actors.values() if a["ActorClassName"] == name and a["Pid"])


def kill_replica(app_name: str, deployment: str) -> int:
    """SIGKILL the (single) replica of `deployment`; returns its pid."""
    pids = replica_pids(app_name, deployment)
    assert len(pids) == 1, f"expected one {deployment} replica, found {pids}"
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.2, what: str = "condition"
) -> Any:
    """Poll until `predicate()` is truthy; return its value, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # e.g. a replica still starting
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_error!r})")


@dataclass
class StreamLog:
    """What one SSE stream delivered, with arrival times (time.monotonic)."""

    status: int = 0
    contents: list[tuple[float, str]] = field(default_factory=list)
    errors: list[tuple[float, dict]] = field(default_factory=list)
    finish_reason: str | None = None
    is_done: bool = False
    end_time: float | None = None
    body: str = ""


async def read_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict,
    headers: dict[str, str],
    log: StreamLog,
    stop_after_chunks: int | None = None,
) -> StreamLog:
    """POST a streaming chat request and record every event; stop early after N content chunks."""
    async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response:
        log.status = response.status_code
        if response.status_code != 200:
            log.body = (await response.aread()).decode(errors="replace")
            log.end_time = time.monotonic()
            return log
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            now = time.monotonic()
            if data == "[DONE]":
                log.is_done = True
                break
            event = json.loads(data)  # a malformed event fails the test here
            if "error" in event:
                log.errors.append((now, event["error"]))
                continue
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    log.contents.append((now, choice["delta"]["content"]))
                if choice.get("finish_reason"):
                    log.finish_reason = choice["finish_reason"]
            if stop_after_chunks is not None and len(log.contents) >= stop_after_chunks:
                break  # leaving the context manager closes the connection: a client disconnect
    log.end_time = time.monotonic()
    return log


def assert_openai_error(response: httpx.Response, status: int | set[int]) -> dict:
    """The response has the expected status and an OpenAI-shaped JSON error body."""
    expected = {status} if isinstance(status, int) else status
    assert response.status_code in expected, (response.status_code, response.text[:300])
    body = response.json()
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error
