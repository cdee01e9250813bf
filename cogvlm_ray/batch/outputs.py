"""Writing result rows as they arrive: JSONL (plain or OpenAI Batch API) or Parquet part files.

The driver iterates the pipeline's output and hands each batch to one writer; nothing waits for
the whole job. Rows are written in completion order, not input order: `id` (and `custom_id`
in the OpenAI format) ties every line to its input.

* JSONL, plain: `{"id", "source", "text", "finish_reason", "usage", "error"}` per line
  (+ `token_ids` on request); `error` is null or `{"status_code", "message", "type", "param",
  "code"}`. Appended and flushed per batch, so a crash loses at most a partial last line
  (resume trims it).
* JSONL, OpenAI Batch API output: `{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error"}`. `body` is the server's `chat.completion` object, or its
  OpenAI error body for a failed row; `error` is then `{"code", "message"}` as well.
* Parquet: `RESULT_SCHEMA` columns in a folder of part files, each written whole (temporary name,
  then renamed) every `rows_per_file` rows, so every file in the folder is complete.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from cogvlm_ray.api.responses import CompletionBuilder
from cogvlm_ray.batch.schema import RESULT_SCHEMA, parse_error
from cogvlm_ray.contracts import RequestOutput

JsonlStyle = Literal["plain", "openai"]


class ResultWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


def usage(row: dict[str, Any]) -> dict[str, int]:
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def flat_error(row: dict[str, Any]) -> dict[str, Any] | None:
    error = parse_error(row["error"])
    return None if error is None else {"status_code": error["status_code"], **error["error"]}


def plain_line(row: dict[str, Any], *, include_token_ids: bool = False) -> dict[str, Any]:
    line = {"id": row["id"], "source": row["source"], "text": row["text"],
            "finish_reason": row["finish_reason"], "usage": usage(row), "error": flat_error(row)}  # fmt: skip
    if include_token_ids:
        line["token_ids"] = row["token_ids"]
    return line


def openai_line(row: dict[str, Any], *, model: str, created: int | None = None) -> dict[str, Any]:
    """One OpenAI Batch API output line (the body is what the HTTP server would answer)."""
    request_id = f"batch_req_{uuid.uuid4().hex}"
    error = parse_error(row["error"])
    if error is not None:
        body = {"error": error["error"]}
        return {"id": request_id, "custom_id": row["id"],
                "response": {"status_code": error["status_code"], "request_id": request_id, "body": body},
                "error": {"code": error["error"].get("code"), "message": error["error"]["message"]}}  # fmt: skip
    last = RequestOutput(request_id=request_id, new_text=row["text"], finish_reason=row["finish_reason"],
                         num_prompt_tokens=row["prompt_tokens"], num_generated_tokens=row["completion_tokens"])  # fmt: skip
    created = int(time.time()) if created is None else created
    builder = CompletionBuilder(1, logprobs=False)
    builder.add(last)
    body = builder.body(f"chatcmpl-{uuid.uuid4().hex}", model, created)
    return {"id": request_id, "custom_id": row["id"],
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}  # fmt: skip


class JsonlWriter:
    """Appends one JSON object per result row to `path`, flushed after every batch."""

    def __init__(self, path: str | os.PathLike, *, style: JsonlStyle, model: str, include_token_ids: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.style = style
        self.model = model
        self.include_token_ids = include_token_ids
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            line = (
                openai_line(row, model=self.model)
                if self.style == "openai"
                else plain_line(row, include_token_ids=self.include_token_ids)
            )
            self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ParquetWriter:
    """Writes `RESULT_SCHEMA` rows into `folder/part-<run>-<n>.parquet` files of `rows_per_file`."""

    def __init__(self, folder: str | os.PathLike, *, rows_per_file: int = 1000):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._pending: list[pa.Table] = []
        self._num_pending = 0
        self._num_files = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA))
        self._num_pending += table.num_rows
        if self._num_pending >= self.rows_per_file:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self._num_pending:
            return
        name = f"part-{self.run_id}-{self._num_files:05d}.parquet"
        scratch = self.folder / f".{name}.tmp"
        pq.write_table(pa.concat_tables(self._pending), scratch)
        os.replace(scratch, self.folder / name)
        self._num_files += 1
        self._pending, self._num_pending = [], 0
