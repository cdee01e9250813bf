"""Reading a job's inputs into rows of `schema.ROW_SCHEMA` (one chat request per row).

Three input kinds, each ending up as the same row (id, source, request, image):

* a folder or glob of images + one prompt template -> one request per image; id = its path;
* an OpenAI Batch API JSONL (`custom_id`, `method`, `url`, `body`) -> the body as it is;
  id = `custom_id`;
* a Parquet or CSV table with an image column (encoded bytes, or a path / URI) and an optional
  prompt column; id = the id column, else the image path, else a content hash.

The row builders are plain functions over Arrow tables (tested without Ray); `read_rows` wires
them behind Ray Data's readers, which read on the workers (local paths or any filesystem
pyarrow knows, e.g. s3://). A row that cannot become a request (bad JSON line, missing column
value, template naming an unknown field) becomes an error row here and is answered as one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import string
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa

from cogvlm_ray.batch.options import IMAGE_EXTENSIONS, InputFormat, InputSpec
from cogvlm_ray.batch.schema import ROW_SCHEMA, error_json, error_row, to_table
from cogvlm_ray.errors import InvalidRequestError

logger = logging.getLogger(__name__)

OPENAI_URL = "/v1/chat/completions"
_TABLE_SUFFIXES = (".parquet", ".csv")
_JSONL_SUFFIXES = (".jsonl", ".json")


def detect_format(path: str, declared: InputFormat = "auto") -> InputFormat:
    """`images`, `openai` or `table` from the path (a declared format other than auto wins)."""
    if declared != "auto":
        return declared
    lowered = path.lower().rstrip("/")
    if lowered.endswith(_JSONL_SUFFIXES):
        return "openai"
    if lowered.endswith(_TABLE_SUFFIXES):
        return "table"
    return "images"


# ---- row builders (no Ray) --------------------------------------------------------------------
def user_request(prompt: str, request_fields: Mapping[str, Any]) -> str:
    """The chat body of a generated row: one user turn with the prompt (the image is added by
    the preprocessing stage, after the text, as the server's clients send it)."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    return json.dumps({**body, **request_fields})


class _Fields(dict):
    def __missing__(self, key: str) -> Any:
        raise InvalidRequestError(
            f"the prompt template names {{{key}}}, which this row does not have "
            f"(available: {', '.join(sorted(self))})",
            param="prompt",
            code="invalid_prompt_template",
        )


def render_prompt(template: str, fields: Mapping[str, Any]) -> str:
    """`template` with `{field}` replaced (`{{` and `}}` are literal braces)."""
    return string.Formatter().vformat(template, (), _Fields(fields))


def path_fields(path: str) -> dict[str, str]:
    name = PurePosixPath(path.replace("\\", "/")).name
    return {"path": path, "name": name, "stem": name.rsplit(".", 1)[0] if "." in name else name}


def image_rows(batch: pa.Table, *, prompt: str, request_fields: Mapping[str, Any]) -> pa.Table:
    """Rows from Ray Data's `read_binary_files(include_paths=True)` batch (`bytes`, `path`)."""
    rows = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True):
        try:
            request = user_request(render_prompt(prompt, path_fields(path)), request_fields)
        except InvalidRequestError as e:
            rows.append(error_row(ROW_SCHEMA, path, path, error_json(e)))
            continue
        rows.append({"id": path, "source": path, "request": request, "image": data, "image_path": None})
    return to_table(rows, ROW_SCHEMA)


def openai_row(line: str) -> dict[str, Any]:
    """One OpenAI Batch API input line -> a row (an error row when the line is not one)."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return _line_error(line, f"the line is not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
        return _line_error(line, "each line needs a non-empty string custom_id")
    custom_id = item["custom_id"]
    problem = None
    if str(item.get("method", "POST")).upper() != "POST":
        problem = f"method must be POST, got {item.get('method')!r}"
    elif item.get("url", OPENAI_URL) != OPENAI_URL:
        problem = f"url must be {OPENAI_URL}, got {item.get('url')!r}"
    elif not isinstance(item.get("body"), dict):
        problem = "body must be a JSON object (a chat completion request)"
    if problem is not None:
        error = error_json(InvalidRequestError(problem, code="invalid_batch_line"))
        return error_row(ROW_SCHEMA, custom_id, None, error)
    return {"id": custom_id, "source": None, "request": json.dumps(item["body"]), "image": None,
            "image_path": None}  # fmt: skip


def _line_error(line: str, message: str) -> dict[str, Any]:
    # Without a custom_id, the line's content hash is the only stable id it has (resume works).
    row_id = "invalid-line-" + hashlib.sha256(line.encode("utf-8", "replace")).hexdigest()[:16]
    return error_row(
        ROW_SCHEMA, row_id, None, error_json(InvalidRequestError(message, code="invalid_batch_line"))
    )


def openai_rows(batch: pa.Table) -> pa.Table:
    """Rows from Ray Data's `read_text` batch (`text`: one line each)."""
    return to_table([openai_row(line) for line in batch.column("text").to_pylist()], ROW_SCHEMA)


def table_rows(batch: pa.Table, spec: InputSpec, request_fields: Mapping[str, Any]) -> pa.Table:
    """Rows from a Parquet / CSV batch: image column of bytes or paths, optional prompt/id columns."""
    if spec.image_column not in batch.column_names:
        raise ValueError(
            f"the table has no image column {spec.image_column!r}; columns: {batch.column_names}"
        )
    is_binary = pa.types.is_binary(batch.schema.field(spec.image_column).type) or pa.types.is_large_binary(
        batch.schema.field(spec.image_column).type
    )
    rows = []
    for record in batch.to_pylist():
        image = record[spec.image_column]
        path = None if is_binary or image is None else str(image)
        own_prompt = record.get(spec.prompt_column) if spec.prompt_column else None
        row_id = _table_row_id(record, spec, path, image if is_binary else None, own_prompt or spec.prompt)
        try:
            if image is None:
                raise InvalidRequestError(f"the {spec.image_column!r} column is empty", code="missing_image")
            if isinstance(own_prompt, str) and own_prompt:
                prompt = own_prompt  # a prompt column is taken literally; only --prompt is a template
            else:
                fields = {k: v for k, v in record.items() if not isinstance(v, bytes)}
                prompt = render_prompt(spec.prompt, {**fields, **(path_fields(path) if path else {})})
        except InvalidRequestError as e:
            rows.append(error_row(ROW_SCHEMA, row_id, path, error_json(e)))
            continue
        rows.append({"id": row_id, "source": path, "request": user_request(prompt, request_fields),
                     "image": image if is_binary else None, "image_path": path})  # fmt: skip
    return to_table(rows, ROW_SCHEMA)


def _table_row_id(
    record: dict[str, Any], spec: InputSpec, path: str | None, data: bytes | None, prompt: Any
) -> str:
    id_column = spec.id_column or ("id" if "id" in record else None)
    if id_column is not None and record.get(id_column) is not None:
        return str(record[id_column])
    if path is not None:
        return path
    digest = hashlib.sha256(data or b"")
    digest.update(str(prompt).encode())
    return "sha256-" + digest.hexdigest()[:24]


# ---- Ray Data readers ---------------------------------------------------------------------------
def expand_image_paths(path: str) -> str | list[str]:
    """A glob becomes the sorted list of matching image files; folders and URIs pass through
    (Ray Data lists them on the cluster)."""
    if not glob.has_magic(path):
        return path
    matches = sorted(
        p for p in glob.glob(os.path.expanduser(path), recursive=True)
        if os.path.isfile(p) and p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
    )  # fmt: skip
    if not matches:
        raise ValueError(f"no image files match {path!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return matches


def read_rows(spec: InputSpec, request_fields: Mapping[str, Any]) -> Any:
    """A Ray Data `Dataset` of `ROW_SCHEMA` rows for the input."""
    import ray.data

    kind = detect_format(spec.path, spec.format)
    fields = dict(request_fields)
    if kind == "images":
        extensions = [*IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)]
        ds = ray.data.read_binary_files(
            expand_image_paths(spec.path), include_paths=True, file_extensions=extensions
        )
        ds = _limit(ds, spec.limit)
        return ds.map_batches(image_rows, batch_format="pyarrow", fn_kwargs={"prompt": spec.prompt,
                              "request_fields": fields})  # fmt: skip
    if kind == "openai":
        ds = _limit(ray.data.read_text(spec.path), spec.limit)
        return ds.map_batches(openai_rows, batch_format="pyarrow")
    path = os.path.expanduser(spec.path)
    ds = ray.data.read_csv(path) if path.lower().endswith(".csv") else ray.data.read_parquet(path)
    ds = _limit(ds, spec.limit)
    return ds.map_batches(
        table_rows, batch_format="pyarrow", fn_kwargs={"spec": spec, "request_fields": fields}
    )


def _limit(ds: Any, limit: int | None) -> Any:
    return ds if limit is None else ds.limit(limit)
