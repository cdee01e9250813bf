"""The CPU stage: `ROW_SCHEMA` rows -> `PREPARED_SCHEMA` rows, through the server's own code.

Each row's chat body goes through exactly what the HTTP ingress does with a request
(`ChatCompletionRequest` validation, `check_supported`, `to_sampling_params`,
`to_conversation`) and then `Preprocessor.prepare`, so a batch row and an HTTP request with the
same content reach the engine as the same `PreparedPrompt` and `SamplingParams`. The row's
image bytes (read from its path when the table held paths) join the conversation as a data URL,
as if the client had sent them, so they pass the preprocessor's size and format checks.

Runs as Ray Data CPU tasks (`map_batches` with a function); each worker process builds its
`Preprocessor` once (tokenizer load) and keeps it for every later task.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from cogvlm_ray.api.chat import (
    ChatDefaults,
    check_supported,
    structured_output,
    to_conversation,
    to_sampling_params,
)
from cogvlm_ray.api.protocol import ChatCompletionRequest
from cogvlm_ray.batch.schema import PREPARED_SCHEMA, error_json, error_row, to_table
from cogvlm_ray.contracts import PreparedPrompt, SamplingParams
from cogvlm_ray.errors import ImageError, InvalidRequestError
from cogvlm_ray.preprocess.messages import Conversation
from cogvlm_ray.serve.args import AppArgs


@functools.lru_cache(maxsize=2)
def cached_preprocessor(app_args_json: str) -> Any:
    """One Preprocessor per worker process and model (built like the server's replica)."""
    from cogvlm_ray.serve.factories import make_preprocessor

    args = AppArgs.model_validate_json(app_args_json)
    return make_preprocessor(args, args.model_dir(weights=False))


def prepare_batch(batch: pa.Table, *, app_args_json: str, defaults: ChatDefaults) -> pa.Table:
    """The `map_batches` function of the stage."""
    preprocessor = cached_preprocessor(app_args_json)
    max_image_bytes = preprocessor.options.max_image_bytes
    rows = [prepare_row(row, preprocessor, defaults, max_image_bytes) for row in batch.to_pylist()]
    return to_table(rows, PREPARED_SCHEMA)


def prepare_row(row: dict[str, Any], preprocessor: Any, defaults: ChatDefaults, max_image_bytes: int) -> dict:
    """One row; any request error becomes an error row (the job goes on)."""
    if row.get("error"):
        return error_row(PREPARED_SCHEMA, row["id"], row["source"], row["error"])
    try:
        prepared, params = prepare_request(
            json.loads(row["request"]), _image_bytes(row, max_image_bytes), preprocessor, defaults
        )
    except Exception as e:  # every row error is reported, never raised: the job goes on
        return error_row(PREPARED_SCHEMA, row["id"], row["source"], error_json(e))
    image = prepared.image
    return {
        "id": row["id"],
        "source": row["source"],
        "sampling": sampling_to_json(params),
        "input_ids": prepared.input_ids,
        "token_type_ids": prepared.token_type_ids,
        "pixels": None if image is None else np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
        "image_size": None if image is None else int(image.shape[-1]),
        "image_hash": prepared.image_hash,
        "error": None,
    }


def prepare_request(
    raw: Any, image: bytes | None, preprocessor: Any, defaults: ChatDefaults
) -> tuple[PreparedPrompt, SamplingParams]:
    """A chat body (+ image bytes for its last user turn) -> what the engine takes, as the ingress
    and the Preprocessor replica compute it. Raises our 400 errors for bad requests."""
    try:
        body = ChatCompletionRequest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise InvalidRequestError(f"invalid chat completion request: {problems}") from None
    check_supported(body)
    if structured_output(body).spec is not None:
        # One text column per row, no tool_calls column, and SamplingParams travel as flat JSON:
        # a constraint would be silently dropped, so the row is refused instead.
        raise InvalidRequestError(
            "structured output (response_format, tools, guided_*) is not supported in batch jobs yet",
            param="response_format",
            code="unsupported_parameter",
        )
    params = to_sampling_params(body, defaults)
    if params.n != 1 or params.logprobs:
        # The batch output has one text per row and no logprobs column (the engine could do
        # both, and the HTTP API serves them).
        param = "n" if params.n != 1 else "logprobs"
        raise InvalidRequestError(
            f"{param} is not supported in batch jobs; send one row per choice",
            param=param,
            code="unsupported_parameter",
        )
    conversation = to_conversation(body)
    if image is not None:
        conversation = with_image(conversation, image)
    prepared = preprocessor.prepare(
        conversation, max_tokens=params.max_tokens, template_version=body.template_version
    )
    return prepared, params


def with_image(conversation: Conversation, image: bytes) -> Conversation:
    """The conversation with `image` added as a data URL (as a client would send it)."""
    url = "data:application/octet-stream;base64," + base64.b64encode(image).decode("ascii")
    return dataclasses.replace(conversation, image_urls=[*conversation.image_urls, url])


def _image_bytes(row: dict[str, Any], max_bytes: int) -> bytes | None:
    if row.get("image") is not None:
        return row["image"]
    return read_image_file(row["image_path"], max_bytes) if row.get("image_path") else None


def read_image_file(path: str, max_bytes: int) -> bytes:
    """A local path or a pyarrow filesystem URI (s3://, gs://, ...), at most `max_bytes`."""
    try:
        if "://" in path and not path.startswith("file://"):
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            with filesystem.open_input_stream(inner) as f:
                data = f.read(max_bytes + 1)
        else:
            with open(os.path.expanduser(path.removeprefix("file://")), "rb") as f:
                data = f.read(max_bytes + 1)
    except (OSError, pa.ArrowException) as e:
        raise ImageError(f"could not read the image file {path!r}: {e}") from None
    if len(data) > max_bytes:
        raise ImageError(f"image file {path!r} is larger than the limit of {max_bytes} bytes")
    return data


def sampling_to_json(params: SamplingParams) -> str:
    return json.dumps(dataclasses.asdict(params))


def sampling_from_json(text: str) -> SamplingParams:
    """Inverse of `sampling_to_json` (JSON arrays back into the dataclass's tuples)."""
    return SamplingParams(**{name: _tuples(value) for name, value in json.loads(text).items()})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def prepared_from_row(row: dict[str, Any]) -> PreparedPrompt:
    """The `PreparedPrompt` a `PREPARED_SCHEMA` row carries (the engine stage's input)."""
    image = None
    if row["pixels"] is not None:
        size = row["image_size"]
        image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(3, size, size).copy()
    return PreparedPrompt(
        input_ids=list(row["input_ids"]),
        token_type_ids=list(row["token_type_ids"]),
        image=image,
        image_hash=row["image_hash"],
    )
