"""A small fake OpenAI-compatible chat server with known delays, for testing the load generator.

Behaviour is set per test through `FakeBehaviour` (mutable, read on each request):
TTFT delay, inter-token delay, a 429 for every k-th request, or a broken stream.
Runs under uvicorn on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeBehaviour:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    reject_every: int = 0
    """Answer every k-th request (1-based arrival count) with a 429; 0 = never."""
    stream_mode: str = "ok"
    """"ok", "error_event" (an error event after 2 tokens), "truncate" (no [DONE])."""
    num_received: int = 0
    num_in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict] = field(default_factory=list)

    def reset(self, **changes) -> None:
        fresh = FakeBehaviour(**changes)
        self.__dict__.update(fresh.__dict__)


def _chunk(content: str | None = None, finish_reason: str | None = None, usage: dict | None = None) -> str:
    payload: dict = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake-model"}
    payload["choices"] = (
        []
        if usage
        else [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish_reason}]
    )
    if usage:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


def create_fake_app(behaviour: FakeBehaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        behaviour.num_received += 1
        behaviour.bodies.append(body)
        if behaviour.reject_every and behaviour.num_received % behaviour.reject_every == 0:
            return JSONResponse(
                {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": None}},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        num_tokens = int(body.get("max_tokens", 16))
        usage = {"prompt_tokens": 11, "completion_tokens": num_tokens, "total_tokens": 11 + num_tokens}
        behaviour.num_in_flight += 1
        behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.num_in_flight)
        if not body.get("stream"):
            try:
                await asyncio.sleep(behaviour.ttft_s + behaviour.itl_s * (num_tokens - 1))
            finally:
                behaviour.num_in_flight -= 1
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "fake-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "x" * num_tokens},
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            }

        async def events():
            try:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
                await asyncio.sleep(behaviour.ttft_s)
                for i in range(num_tokens):
                    if i:
                        await asyncio.sleep(behaviour.itl_s)
                    if behaviour.stream_mode == "error_event" and i == 2:
                        yield 'data: {"error": {"message": "replica died", "type": "internal_error"}}\n\n'
                        return
                    if behaviour.stream_mode == "truncate" and i == 2:
                        return
                    last = i == num_tokens - 1
                    yield _chunk(f"t{i} ", finish_reason="length" if last else None)
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield _chunk(usage=usage)
                yield "data: [DONE]\n\n"
            finally:
                behaviour.num_in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """uvicorn in a daemon thread; `url` is the server root."""

    def __init__(self, behaviour: FakeBehaviour):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_fake_app(behaviour), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, timeout_s: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
