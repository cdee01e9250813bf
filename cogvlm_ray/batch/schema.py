"""The three row layouts between the pipeline's stages, as Arrow schemas.

    read      inputs.py         -> ROW_SCHEMA:      id, source, request (chat body JSON), image
    prepare   preprocessing.py  -> PREPARED_SCHEMA: token ids, token types, uint8 pixels, sampling
    generate  generation.py     -> RESULT_SCHEMA:   text, finish reason, usage, token ids

Every layout carries `id` (ties a result to its input), `source` (the image path, when there
is one) and `error`: a row that failed keeps flowing with its error set (an OpenAI error body
plus its HTTP status, as JSON), so one bad image never stops a job. Stages build their output
with these schemas, so Ray Data never has to guess a type from a batch of nulls.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from cogvlm_ray.errors import CogVLMError

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("request", pa.string()),  # an OpenAI chat completion body, JSON
        ("image", pa.binary()),  # encoded image bytes appended to the request's user turn, or null
        ("image_path", pa.string()),  # ... or a path / URI to read them from (tables of paths)
        ("error", pa.string()),
    ]
)

PREPARED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("sampling", pa.string()),  # SamplingParams fields, JSON
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
        ("pixels", pa.binary()),  # uint8 [3, S, S], C order, or null for text-only
        ("image_size", pa.int32()),  # S
        ("image_hash", pa.string()),
        ("error", pa.string()),
    ]
)

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)


def error_json(error: BaseException) -> str:
    """`{"status_code": 400, "error": {"message", "type", "param", "code"}}` for any exception
    (ours keep their status; anything else is a 500 naming its class)."""
    if isinstance(error, CogVLMError):
        return json.dumps({"status_code": error.status_code, **error.to_dict()})
    body = CogVLMError(f"{type(error).__name__}: {error}", code="internal_error").to_dict()
    return json.dumps({"status_code": 500, **body})


def parse_error(error: str | None) -> dict[str, Any] | None:
    return None if error is None else json.loads(error)


def error_row(schema: pa.Schema, row_id: str, source: str | None, error: str) -> dict[str, Any]:
    """A row of `schema` carrying only its id, source and error (every other column null)."""
    row: dict[str, Any] = dict.fromkeys(schema.names)
    row.update(id=row_id, source=source, error=error)
    return row


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)
