"""Writers and resume: lines tie to ids, finished ids are skipped, transient errors are retried."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from cogvlm_ray.batch.outputs import JsonlWriter, ParquetWriter, openai_line, plain_line
from cogvlm_ray.batch.resume import completed_ids, skip_completed, trim_partial_line
from cogvlm_ray.batch.schema import RESULT_SCHEMA, ROW_SCHEMA, error_json, error_row, to_table
from cogvlm_ray.errors import ImageError, ServiceUnavailableError


def _results() -> pa.Table:
    ok = {"id": "a", "source": "/i/a.jpg", "text": "hello", "finish_reason": "stop", "prompt_tokens": 5,
          "completion_tokens": 2, "token_ids": [7, 8], "error": None}  # fmt: skip
    bad = error_row(RESULT_SCHEMA, "b", "/i/b.jpg", error_json(ImageError("cannot decode")))
    flaky = error_row(
        RESULT_SCHEMA, "c", None, error_json(ServiceUnavailableError("aborted", code="aborted"))
    )
    return to_table([ok, bad, flaky], RESULT_SCHEMA)


def test_plain_and_openai_lines():
    ok, bad, _ = _results().to_pylist()
    line = plain_line(ok, include_token_ids=True)
    assert line == {"id": "a", "source": "/i/a.jpg", "text": "hello", "finish_reason": "stop",
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, "error": None,
                    "token_ids": [7, 8]}  # fmt: skip
    assert (
        plain_line(bad)["error"]["status_code"] == 400 and plain_line(bad)["error"]["code"] == "invalid_image"
    )

    out = openai_line(ok, model="cogvlm2", created=1)
    assert out["custom_id"] == "a" and out["error"] is None and out["response"]["status_code"] == 200
    body = out["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "cogvlm2"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == 7
    failed = openai_line(bad, model="cogvlm2")
    assert (
        failed["response"]["status_code"] == 400
        and failed["response"]["body"]["error"]["code"] == "invalid_image"
    )
    assert failed["error"]["code"] == "invalid_image"


@pytest.mark.parametrize("style", ["plain", "openai"])
def test_jsonl_resume_skips_results_and_request_errors_but_retries_transient_ones(tmp_path, style):
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path, style=style, model="m", include_token_ids=False)
    writer.write(_results())
    writer.close()
    assert len(path.read_text().splitlines()) == 3
    assert completed_ids(path, "jsonl") == {"a", "b"}  # "c" failed with a 503: run it again


def test_partial_last_line_is_trimmed(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "error": null}\n{"id": "b", "err')
    assert completed_ids(path, "jsonl") == {"a"}
    assert trim_partial_line(path) == len('{"id": "b", "err')
    assert path.read_text() == '{"id": "a", "error": null}\n'
    assert trim_partial_line(path) == 0 and trim_partial_line(tmp_path / "missing.jsonl") == 0


def test_parquet_parts_and_resume(tmp_path):
    folder = tmp_path / "out.parquet"
    writer = ParquetWriter(folder, rows_per_file=2)
    writer.write(_results())
    writer.write(_results().slice(0, 1))
    writer.close()
    parts = sorted(p.name for p in folder.iterdir())
    assert len(parts) == 2 and all(p.startswith("part-") and p.endswith(".parquet") for p in parts)
    (folder / ".part-crashed.parquet.tmp").write_bytes(b"half a file")
    assert completed_ids(folder, "parquet") == {"a", "b"}
    assert completed_ids(tmp_path / "none.parquet", "parquet") == set()


def test_skip_completed_keeps_the_rest():
    rows = to_table([{"id": i, "source": None, "request": "{}", "image": None, "image_path": None, "error": None}
                     for i in ("a", "b", "c")], ROW_SCHEMA)  # fmt: skip
    kept = skip_completed(rows, done=frozenset({"b"}))
    assert kept.column("id").to_pylist() == ["a", "c"] and kept.schema == ROW_SCHEMA
    assert skip_completed(rows, done=frozenset()) is rows


def test_error_json_keeps_our_status_and_hides_nothing():
    assert json.loads(error_json(ImageError("x")))["status_code"] == 400
    other = json.loads(error_json(KeyError("k")))
    assert other["status_code"] == 500 and "KeyError" in other["error"]["message"]
