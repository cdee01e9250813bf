"""The batch job: read -> skip done -> preprocess (CPU tasks) -> generate (engine actors) -> write.

    rows = read_rows(input)                            inputs.py       (Ray Data readers, workers)
      .map_batches(skip_completed)                     resume.py       (resume by id)
      .repartition(target_num_rows_per_block=...)                      (small blocks: streaming)
      .map_batches(prepare_batch, num_cpus=...)        preprocessing.py (CPU tasks)
      .map_batches(EngineStage, compute=ActorPoolStrategy(min, max), num_gpus=...)  generation.py
    for batch in rows.iter_batches(): writer.write(batch)                outputs.py (driver)

Ray Data streams blocks between the stages, so images are read, preprocessed, generated and
written at the same time, with bounded memory. The driver (this process: the laptop, or the
RayJob's submitter) writes the output as results arrive, in completion order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from cogvlm_ray.batch.generation import EngineFactory, EngineStage
from cogvlm_ray.batch.inputs import detect_format, read_rows
from cogvlm_ray.batch.options import BatchOptions
from cogvlm_ray.batch.outputs import JsonlWriter, ParquetWriter, ResultWriter
from cogvlm_ray.batch.preprocessing import prepare_batch
from cogvlm_ray.batch.resume import completed_ids, skip_completed, trim_partial_line
from cogvlm_ray.serve.server import EngineLike

logger = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    num_rows: int = 0
    """Rows written by this run (results and error rows)."""
    num_errors: int = 0
    num_skipped: int = 0
    """Ids already answered in the output (resume)."""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.num_rows / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s if self.elapsed_s else 0.0

    def add(self, table: pa.Table) -> None:
        self.num_rows += table.num_rows
        self.num_errors += table.num_rows - table.column("error").null_count
        self.num_prompt_tokens += sum(v or 0 for v in table.column("prompt_tokens").to_pylist())
        self.num_output_tokens += sum(v or 0 for v in table.column("completion_tokens").to_pylist())


def output_format(options: BatchOptions) -> str:
    if options.output_format != "auto":
        return options.output_format
    return "parquet" if options.output.rstrip("/").lower().endswith(".parquet") else "jsonl"


def build_dataset(
    options: BatchOptions,
    *,
    done_ids: frozenset[str] = frozenset(),
    engine_factory: Any = None,
) -> Any:
    """The lazy Ray Data `Dataset` of `RESULT_SCHEMA` rows (nothing runs until it is iterated).

    `engine_factory` (a picklable zero-argument callable returning an engine) defaults to the
    server's engine for `options.app`; tests pass fakes or fault-injecting wrappers."""
    import ray.data

    sizing = options.sizing
    ds = read_rows(options.input, options.request_fields)
    if done_ids:
        ds = ds.map_batches(skip_completed, batch_format="pyarrow", fn_kwargs={"done": done_ids})
    # Small blocks from here on: readers pack many files per block, and a block is the unit of a
    # task's output (the driver sees a row only when its whole block is done), so without this
    # the first results would wait for a whole read block, and preprocessing of one big block
    # could not spread over several CPUs. One engine call per block: results stream out call by
    # call, and an actor's overlapping calls (`max_concurrent_calls_per_actor`) keep its engine full.
    # `strict`: exactly `batch_size` rows a block (the last one aside); otherwise Ray Data's
    # bundler tops up a short block with the next one and a call carries 1.5x its rows.
    ds = ds.repartition(target_num_rows_per_block=sizing.batch_size, strict=True)
    ds = ds.map_batches(
        prepare_batch,
        batch_format="pyarrow",
        batch_size=sizing.preprocess_batch_size,
        num_cpus=sizing.num_cpus_per_preprocess_task,
        fn_kwargs={"app_args_json": options.app.model_dump_json(), "defaults": options.defaults},
    )
    calls = sizing.max_concurrent_calls_per_actor
    max_in_flight = min(sizing.batch_size * calls, options.app.engine.max_waiting)
    return ds.map_batches(
        EngineStage,
        batch_format="pyarrow",
        batch_size=sizing.batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=sizing.min_actors,
            max_size=sizing.max_actors,
            max_tasks_in_flight_per_actor=2 * calls,
            max_concurrent_calls_per_actor=calls,  # overlapping engine calls (threads, one event loop)
        ),
        fn_constructor_kwargs={
            "engine_factory": engine_factory or EngineFactory(options.app),
            "max_in_flight": max_in_flight,
        },
        num_cpus=sizing.num_cpus_per_actor,
        num_gpus=sizing.num_gpus_per_actor,
        # Bounded (Ray Data's default retries forever). Ray 2.60 has no named parameter for these
        # yet, hence its deprecation warning about `ray_remote_args`.
        max_restarts=sizing.max_retries,
        max_task_retries=sizing.max_retries,
    )


def open_writer(options: BatchOptions) -> ResultWriter:
    if output_format(options) == "parquet":
        return ParquetWriter(options.output)
    style = "openai" if detect_format(options.input.path, options.input.format) == "openai" else "plain"
    model = options.model_name or options.app.model_name
    return JsonlWriter(options.output, style=style, model=model, include_token_ids=options.include_token_ids)


def prepare_output(options: BatchOptions) -> frozenset[str]:
    """Ids to skip (resume), or a fresh output when `resume` is off."""
    import shutil
    from pathlib import Path

    path, fmt = Path(options.output), output_format(options)
    if not options.resume:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return frozenset()
    if fmt == "jsonl":
        trim_partial_line(path)
    return frozenset(completed_ids(path, fmt))


def run(options: BatchOptions, *, engine_factory: EngineLike | Any = None) -> BatchSummary:
    """Run the job to the end (Ray must be initialised); returns what this run wrote."""
    done = prepare_output(options)
    if done:
        logger.info("resuming: %d ids already answered in %s are skipped", len(done), options.output)
    summary = BatchSummary(num_skipped=len(done))
    start = time.perf_counter()
    ds = build_dataset(options, done_ids=done, engine_factory=engine_factory)
    writer = open_writer(options)
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.write(table)
            summary.add(table)
    finally:
        writer.close()
        summary.elapsed_s = time.perf_counter() - start
    logger.info(
        "wrote %d rows (%d errors, %d skipped) to %s in %.1f s: %.2f rows/s, %.1f output tokens/s",
        summary.num_rows, summary.num_errors, summary.num_skipped, options.output, summary.elapsed_s,
        summary.rows_per_s, summary.output_tokens_per_s,
    )  # fmt: skip
    return summary
