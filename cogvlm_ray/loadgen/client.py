"""Send one chat completion request and time it (streaming SSE or plain JSON).

Timing marks, all `time.perf_counter()` on the client:
  TTFT = first chunk with non-empty content - request sent (streaming only);
  ITL  = gaps between consecutive content chunks (one chunk is one token on our server;
         a server that coalesces tokens into one chunk shows larger gaps, as in vLLM's tool);
  e2e  = last byte received - request sent.

Outcome classes (`RequestResult.status`): the HTTP status for a response that was not 200;
"stream_error" for an `{"error": ...}` event inside a 200 stream; "malformed" for a body or
stream that does not parse or ends without `[DONE]`/`finish_reason`; "timeout" and
"transport" for client-side failures. Only `status == "200"` counts as success.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from cogvlm_ray.loadgen.workload import BenchRequest


@dataclass
class RequestResult:
    index: int
    status: str
    """"200" on success, else the HTTP status or an outcome class (see module docstring)."""
    is_stream: bool
    has_image: bool
    start: float
    """perf_counter() when the request was sent."""
    e2e_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    num_prompt_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    retry_after: str | None = None
    """The Retry-After header of a 429/503, if any."""

    @property
    def ok(self) -> bool:
        return self.status == "200"


class MalformedResponse(ValueError):
    """The server's answer does not follow the OpenAI chat completion format."""


async def send_request(
    client: httpx.AsyncClient, url: str, request: BenchRequest, *, headers: dict[str, str] | None = None
) -> RequestResult:
    """POST `request.body` to `url` and time it; never raises for server or network failures."""
    result = RequestResult(
        index=request.index,
        status="transport",
        is_stream=request.is_stream,
        has_image=request.has_image,
        start=time.perf_counter(),
    )
    try:
        if request.is_stream:
            await _send_stream(client, url, request.body, headers, result)
        else:
            await _send_plain(client, url, request.body, headers, result)
    except httpx.TimeoutException as exc:
        result.status, result.error = "timeout", repr(exc)
    except httpx.HTTPError as exc:
        result.status, result.error = "transport", repr(exc)
    except MalformedResponse as exc:
        result.status, result.error = "malformed", str(exc)
    result.e2e_s = time.perf_counter() - result.start
    return result


async def _send_plain(client, url, body, headers, result: RequestResult) -> None:
    response = await client.post(url, json=body, headers=headers)
    if response.status_code != 200:
        _record_http_error(result, response.status_code, response.headers, response.content)
        return
    try:
        payload = response.json()
        choice = payload["choices"][0]
        result.text = choice["message"]["content"] or ""
        result.finish_reason = choice["finish_reason"]
        usage = payload["usage"]
        result.num_output_tokens = int(usage["completion_tokens"])
        result.num_prompt_tokens = int(usage["prompt_tokens"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise MalformedResponse(f"bad completion body: {exc!r}: {response.text[:200]}") from exc
    if result.finish_reason is None:
        raise MalformedResponse("completion without finish_reason")
    result.status = "200"


async def _send_stream(client, url, body, headers, result: RequestResult) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            _record_http_error(result, response.status_code, response.headers, await response.aread())
            return
        is_done = False
        num_content_chunks = 0
        last_token_time: float | None = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                is_done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise MalformedResponse(f"bad SSE data: {data[:200]}") from exc
            if not isinstance(chunk, dict):
                raise MalformedResponse(f"bad SSE data: {data[:200]}")
            if "error" in chunk:
                result.status = "stream_error"
                result.error = json.dumps(chunk["error"])[:500]
                return
            now = time.perf_counter()
            usage = chunk.get("usage")
            if usage:
                result.num_output_tokens = int(usage.get("completion_tokens", 0))
                result.num_prompt_tokens = usage.get("prompt_tokens")
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    num_content_chunks += 1
                    result.text += content
                    if last_token_time is None:
                        result.ttft_s = now - result.start
                    else:
                        result.itl_s.append(now - last_token_time)
                    last_token_time = now
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
    if not is_done:
        raise MalformedResponse("stream ended without data: [DONE]")
    if result.finish_reason is None:
        raise MalformedResponse("stream without finish_reason")
    if not result.num_output_tokens:
        result.num_output_tokens = num_content_chunks  # server sent no usage chunk
    result.status = "200"


def _record_http_error(
    result: RequestResult, status_code: int, headers: httpx.Headers, content: bytes
) -> None:
    result.status = str(status_code)
    result.retry_after = headers.get("retry-after")
    result.error = content[:500].decode("utf-8", errors="replace")
