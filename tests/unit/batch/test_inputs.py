"""Input rows: every input kind becomes (id, source, request, image) or an error row."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from cogvlm_ray.batch.inputs import (
    detect_format,
    expand_image_paths,
    image_rows,
    openai_row,
    openai_rows,
    render_prompt,
    table_rows,
)
from cogvlm_ray.batch.options import InputSpec
from cogvlm_ray.errors import InvalidRequestError


def _user_text(row: dict) -> str:
    (message,) = json.loads(row["request"])["messages"]
    return message["content"][0]["text"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [("in/", "images"), ("in/*.jpg", "images"), ("batch.jsonl", "openai"), ("t.parquet", "table"),
     ("s3://b/t.CSV", "table")],
)  # fmt: skip
def test_detect_format(path, expected):
    assert detect_format(path) == expected
    assert detect_format(path, "openai") == "openai"


def test_image_rows_fill_the_template_and_keep_the_path_as_id():
    batch = pa.table({"bytes": [b"a", b"b"], "path": ["/d/cat.jpg", "/d/dog.png"]})
    rows = image_rows(batch, prompt="Caption {name} ({stem})", request_fields={"seed": 3}).to_pylist()
    assert [r["id"] for r in rows] == ["/d/cat.jpg", "/d/dog.png"]
    assert [r["image"] for r in rows] == [b"a", b"b"]
    assert _user_text(rows[0]) == "Caption cat.jpg (cat)"
    assert json.loads(rows[0]["request"])["seed"] == 3
    assert rows[0]["error"] is None


def test_template_naming_an_unknown_field_is_an_error_row():
    with pytest.raises(InvalidRequestError, match=r"\{colour\}"):
        render_prompt("a {colour} thing", {"name": "x"})
    batch = pa.table({"bytes": [b"a"], "path": ["/d/cat.jpg"]})
    (row,) = image_rows(batch, prompt="a {colour} thing", request_fields={}).to_pylist()
    assert row["id"] == "/d/cat.jpg" and row["request"] is None
    assert json.loads(row["error"])["status_code"] == 400


def test_openai_lines():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    ok = openai_row(
        json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": body})
    )
    assert ok["id"] == "r1" and json.loads(ok["request"]) == body and ok.get("error") is None

    wrong_url = openai_row(
        json.dumps({"custom_id": "r2", "method": "POST", "url": "/v1/embeddings", "body": {}})
    )
    assert wrong_url["id"] == "r2" and "url must be" in json.loads(wrong_url["error"])["error"]["message"]

    not_json = openai_row("{nope")
    assert not_json["id"].startswith("invalid-line-") and json.loads(not_json["error"])["status_code"] == 400
    assert openai_row("{nope")["id"] == not_json["id"]  # stable: resume skips it next time

    no_id = openai_row(json.dumps({"body": body}))
    assert "custom_id" in json.loads(no_id["error"])["error"]["message"]
    assert openai_rows(pa.table({"text": ["{nope"]})).num_rows == 1


def test_table_rows_bytes_paths_prompts_and_ids():
    spec = InputSpec(path="t.parquet", prompt="About {label}", prompt_column="question")
    batch = pa.table(
        {"image": pa.array([b"\x89PNG", b"\xff\xd8", None], pa.binary()), "label": ["a", "b", "c"],
         "question": [None, "Literal {label}?", None], "id": ["x1", "x2", "x3"]}
    )  # fmt: skip
    rows = table_rows(batch, spec, {}).to_pylist()
    assert [r["id"] for r in rows] == ["x1", "x2", "x3"]
    assert _user_text(rows[0]) == "About a"  # no prompt in the column: the template
    assert _user_text(rows[1]) == "Literal {label}?"  # the column's prompt is taken literally
    assert rows[0]["image"] == b"\x89PNG" and rows[0]["image_path"] is None
    assert json.loads(rows[2]["error"])["error"]["code"] == "missing_image"

    paths = pa.table({"image": ["/imgs/a.jpg", "/imgs/b.jpg"]})
    rows = table_rows(paths, InputSpec(path="t.csv", prompt="{stem}"), {}).to_pylist()
    assert [r["id"] for r in rows] == ["/imgs/a.jpg", "/imgs/b.jpg"]  # no id column: the path
    assert rows[0]["image_path"] == "/imgs/a.jpg" and rows[0]["image"] is None and _user_text(rows[0]) == "a"

    no_ids = pa.table({"image": pa.array([b"same", b"same", b"other"], pa.binary())})
    ids = [r["id"] for r in table_rows(no_ids, InputSpec(path="t.parquet"), {}).to_pylist()]
    assert ids[0] == ids[1] != ids[2] and ids[0].startswith("sha256-")  # content hash

    with pytest.raises(ValueError, match="no image column"):
        table_rows(pa.table({"picture": [b"x"]}), InputSpec(path="t.parquet"), {})


def test_glob_expands_to_image_files_only(tmp_path):
    for name in ("b.JPG", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_image_paths(str(tmp_path / "*")) == [str(tmp_path / "a.png"), str(tmp_path / "b.JPG")]
    assert expand_image_paths(str(tmp_path)) == str(tmp_path)  # folders are listed by Ray Data
    with pytest.raises(ValueError, match="no image files"):
        expand_image_paths(str(tmp_path / "*.gif"))
