"""Coalescing of streamed deltas: fewer, larger messages between the model replica and the client.

Every message on the way out (Ray's streaming generator, the ingress, the HTTP proxy, an SSE
event) costs a fixed ~1-2 ms of CPU per hop whatever it carries (docs/BENCHMARKS.md, full
stack). At one token per message that per-token cost can exceed the engine's own. With
`stream_interval_s > 0` the model server sends the first token at once (TTFT unchanged) and
then at most one message per interval per request, carrying every token produced meanwhile;
the last delta (with `finish_reason`) is never held back. Latency metrics are recorded before
coalescing, so TTFT/ITL histograms keep per-step resolution.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cogvlm_ray.contracts import RequestOutput, merge_outputs


async def coalesce(stream: AsyncIterator[RequestOutput], interval_s: float) -> AsyncIterator[RequestOutput]:
    """Yield `stream`'s deltas merged so that at most one goes out per `interval_s` (after the first).

    A held delta is flushed when the interval expires even if the engine has produced nothing
    since, so no token waits more than `interval_s`. `interval_s <= 0` passes deltas through.
    With n > 1 the choices interleave in one stream: one delta is held per choice (`index`),
    since deltas of different choices never merge, and a flush sends every held one.
    """
    if interval_s <= 0:
        async for output in stream:
            yield output
        return
    loop = asyncio.get_running_loop()
    iterator = aiter(stream)
    pending: dict[int, RequestOutput] = {}
    flush_at = 0.0
    next_item: asyncio.Future[RequestOutput] | None = None
    sent_first: set[int] = set()
    try:
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(anext(iterator))
            if pending:
                # Wait for the next delta only until the held ones are due; never cancel the read
                # (cancelling it would close the engine stream and abort the request).
                done, _ = await asyncio.wait({next_item}, timeout=max(0.0, flush_at - loop.time()))
                if not done:
                    for held in pending.values():
                        yield held
                    pending.clear()
                    flush_at = loop.time() + interval_s
                    continue
            try:
                output = await next_item
            except StopAsyncIteration:
                break
            next_item = None
            held = pending.pop(output.index, None)
            merged = output if held is None else merge_outputs(held, output)
            if output.index not in sent_first or merged.finished or loop.time() >= flush_at:
                sent_first.add(output.index)
                yield merged
                if loop.time() >= flush_at:
                    for other in pending.values():
                        yield other
                    pending.clear()
                    flush_at = loop.time() + interval_s
            else:
                pending[output.index] = merged
        for held in pending.values():
            yield held
    finally:
        if next_item is not None and not next_item.done():
            next_item.cancel()
            with contextlib.suppress(BaseException):
                await next_item
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
