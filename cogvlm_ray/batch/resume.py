"""Resume by id: which rows an existing output already answers, and skipping them.

A row counts as done when its output line is a result, or an error that would recur
(status < 500: a bad image, a prompt too long). Rows that failed for a transient reason
(5xx: the engine aborted, an actor died past its retries) are run again, and their new line is
appended after the old one: the last line for an id wins.

A crash can leave a partial last JSONL line; `trim_partial_line` cuts it before appending.
Parquet outputs are folders of complete part files (see outputs.py); temporary files of a
crashed run are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogvlm_ray.batch.schema import ROW_SCHEMA

logger = logging.getLogger(__name__)


def is_final(status_code: int | None) -> bool:
    """A written row that a rerun would not change (success, or an error of the request itself)."""
    return status_code is None or status_code < 500


def completed_ids(output: str | os.PathLike, output_format: str) -> set[str]:
    """Ids already answered in `output` (empty when it does not exist)."""
    path = Path(output)
    if not path.exists():
        return set()
    return _parquet_ids(path) if output_format == "parquet" else _jsonl_ids(path)


def _jsonl_ids(path: Path) -> set[str]:
    done: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line
            if not isinstance(item, dict):
                continue
            if "custom_id" in item:  # an OpenAI Batch API line
                row_id = item["custom_id"]
                status = (item.get("response") or {}).get("status_code")
                final = status is not None and is_final(status)
            else:
                row_id = item.get("id")
                error = item.get("error")
                final = is_final(None if error is None else error.get("status_code"))
            if row_id is None:
                continue
            if final:
                done.add(str(row_id))
    return done


def _parquet_ids(folder: Path) -> set[str]:
    done: set[str] = set()
    for part in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["id", "error"])
        for row_id, error in zip(
            table.column("id").to_pylist(), table.column("error").to_pylist(), strict=True
        ):
            if error is None or is_final(json.loads(error)["status_code"]):
                done.add(row_id)
    return done


def trim_partial_line(path: str | os.PathLike) -> int:
    """Cut a JSONL file after its last newline; returns the bytes removed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        position = size
        while position > 0:
            step = min(65536, position)
            f.seek(position - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                position = position - step + newline + 1
                break
            position -= step
        if position < size:
            f.truncate(position)
            logger.warning("removed a partial last line (%d bytes) from %s", size - position, path)
        return size - position


def skip_completed(batch: pa.Table, *, done: frozenset[str]) -> pa.Table:
    """The `map_batches` filter in front of preprocessing: drop rows already answered."""
    if not done:
        return batch
    keep = pa.array([row_id not in done for row_id in batch.column("id").to_pylist()], type=pa.bool_())
    return batch.filter(keep).cast(ROW_SCHEMA)
