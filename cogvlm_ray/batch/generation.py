"""The engine stage: `PREPARED_SCHEMA` rows -> `RESULT_SCHEMA` rows, in a pool of Ray Data actors.

Each actor holds one continuous-batching `Engine` (built by the same factory as a Serve model
replica) and runs it on the actor's event loop. A call submits every row of its batch to the
engine at once and awaits them together; Ray Data overlaps several calls per actor
(`max_concurrency`), so the engine's waiting queue is refilled before the previous batch's last
rows finish and its running batch stays full.

Failures: a row the engine refuses (prompt too long, bad sampling) becomes an error row. When
the engine loop itself dies, the actor process exits on purpose: Ray Data then restarts it
(bounded `max_restarts`) and retries the call (`max_task_retries`) on the fresh engine, as it
does when an actor is killed or its node is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from cogvlm_ray.batch.preprocessing import prepared_from_row, sampling_from_json
from cogvlm_ray.batch.schema import RESULT_SCHEMA, error_json, error_row, to_table
from cogvlm_ray.errors import CogVLMError, EngineDeadError, ServiceUnavailableError
from cogvlm_ray.serve.args import AppArgs
from cogvlm_ray.serve.server import EngineLike

logger = logging.getLogger(__name__)


class EngineFactory:
    """Builds the server's engine for this actor's devices (picklable: Ray ships it to actors)."""

    def __init__(self, app_args: AppArgs):
        self.app_args_json = app_args.model_dump_json()

    def __call__(self) -> EngineLike:
        from cogvlm_ray.serve.factories import load_engine

        args = AppArgs.model_validate_json(self.app_args_json)
        return load_engine(args, args.model_dir())


class EngineStage:
    """Ray Data callable class (`map_batches(EngineStage, batch_format="pyarrow", ...)`)."""

    def __init__(self, engine_factory: Callable[[], EngineLike], max_in_flight: int):
        self.engine = engine_factory()
        self.max_in_flight = max_in_flight
        """Rows this actor has in the engine at once (running + waiting), under the engine's
        `max_waiting` so it never answers 429."""
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        await self.engine.start()
        if self._slots is None:  # created on the event loop that runs the engine
            self._slots = asyncio.Semaphore(self.max_in_flight)
        rows = await asyncio.gather(*(self.generate_row(row) for row in batch.to_pylist()))
        return to_table(list(rows), RESULT_SCHEMA)

    async def generate_row(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["error"]:
            return error_row(RESULT_SCHEMA, row["id"], row["source"], row["error"])
        assert self._slots is not None
        async with self._slots:
            try:
                return await self._generate(row)
            except EngineDeadError:
                self._exit_for_restart()
                raise
            except CogVLMError as e:
                return error_row(RESULT_SCHEMA, row["id"], row["source"], error_json(e))

    async def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        request_id = f"batch-{uuid.uuid4().hex}"
        stream = self.engine.add_request(
            prepared_from_row(row), sampling_from_json(row["sampling"]), request_id
        )
        token_ids: list[int] = []
        text: list[str] = []
        last = None
        async for output in stream:
            token_ids.extend(output.new_token_ids)
            text.append(output.new_text)
            last = output
        assert last is not None and last.finish_reason is not None
        if last.finish_reason == "abort":
            raise ServiceUnavailableError("the engine aborted this row (shutting down)", code="aborted")
        return {
            "id": row["id"],
            "source": row["source"],
            "text": "".join(text),
            "finish_reason": last.finish_reason,
            "prompt_tokens": last.num_prompt_tokens,
            "completion_tokens": last.num_generated_tokens,
            "token_ids": token_ids,
            "error": None,
        }

    def _exit_for_restart(self) -> None:
        """The engine cannot recover in this process: let Ray restart the actor and retry."""
        logger.error("engine loop died; exiting this actor so Ray Data restarts it and retries its rows")
        logging.shutdown()
        os._exit(1)
