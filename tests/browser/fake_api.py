"""A small fake of our OpenAI API, so the page can be driven without Ray or a model.

It speaks the same wire format as `serve/ingress.py` (SSE chunks, `data: [DONE]`, usage with
`stream_options.include_usage`, OpenAI error JSON built by our `errors` classes) and records every
request body, so tests can check what the page sent. `gate` holds each stream after its first
chunks until the test opens it: that makes "the answer is visible while still streaming"
observable without timing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError

from cogvlm_ray.errors import AuthenticationError, CogVLMError, ImageError
from cogvlm_ray.serve.playground import mount_playground

MODEL_ID = "cogvlm2-fake"
NUM_CHUNKS_BEFORE_GATE = 2
GATE_TIMEOUT_S = 30.0


@dataclass
class FakeApi:
    """State shared between the test thread and the server thread."""

    api_key: str | None = None
    requests: list[dict] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()  # open unless a test closes it


def decode_image(url: str) -> Image.Image:
    """The fake's stand-in for preprocessing: a data URL that PIL can open, or ImageError."""
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise ImageError("Only base64 data URLs are accepted by this fake.")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ImageError("Could not decode the image: not a supported image file.") from exc
    return image


def answer_for(messages: list[dict]) -> str:
    """A deterministic answer that shows what the fake saw: turn number, question, image size."""
    images = [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]
    size = "no image"
    if images:
        width, height = decode_image(images[0]).size
        size = f"a {width}x{height} image"
    num_user_turns = sum(message["role"] == "user" for message in messages)
    last = messages[-1]["content"]
    question = last if isinstance(last, str) else next(p["text"] for p in last if p["type"] == "text")
    return f"Answer {num_user_turns} about {size}: you asked {question!r} with {len(messages)} messages."


def create_fake_app(fake: FakeApi, *, playground: bool = True) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(CogVLMError)
    async def on_error(request: Request, exc: CogVLMError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

    def check_key(request: Request) -> None:
        if fake.api_key is not None and request.headers.get("authorization") != f"Bearer {fake.api_key}":
            raise AuthenticationError("Incorrect API key provided.")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "cogvlm-ray"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        check_key(request)
        body = await request.json()
        fake.requests.append(body)
        text = answer_for(body["messages"])  # raises ImageError -> 400 before the stream starts
        return StreamingResponse(stream(fake, text), media_type="text/event-stream")

    if playground:
        mount_playground(app, require_api_key=fake.api_key is not None)
    return app


async def stream(fake: FakeApi, text: str) -> AsyncIterator[str]:
    words = text.split(" ")
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = MODEL_ID
    for index, word in enumerate(words):
        if index == NUM_CHUNKS_BEFORE_GATE:
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while not fake.gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        delta = {"content": word if index == 0 else " " + word}
        is_last = index == len(words) - 1
        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if is_last else None}
        yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
        await asyncio.sleep(0.005)
    # The stop token counts as generated (as in vLLM), so usage differs from the number of chunks.
    num_tokens = len(words) + 1
    usage = {"prompt_tokens": 10, "completion_tokens": num_tokens, "total_tokens": 10 + num_tokens}
    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
