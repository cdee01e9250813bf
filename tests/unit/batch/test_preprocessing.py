"""The CPU stage: rows reach the engine exactly as the same HTTP request would, or as error rows."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from cogvlm_ray.api.chat import ChatDefaults, to_conversation, to_sampling_params
from cogvlm_ray.api.protocol import ChatCompletionRequest
from cogvlm_ray.batch.inputs import user_request
from cogvlm_ray.batch.preprocessing import (
    prepare_row,
    prepared_from_row,
    read_image_file,
    sampling_from_json,
    with_image,
)
from cogvlm_ray.contracts import SamplingParams
from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess import Preprocessor

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "cogvlm2-tiny"
IMAGE = FIXTURE / "images" / "img_rgb_odd.jpg"
MAX_BYTES = 1 << 20


@pytest.fixture(scope="module")
def preprocessor() -> Preprocessor:
    return Preprocessor(FIXTURE)


def _row(request: str, *, image: bytes | None = None, image_path: str | None = None) -> dict:
    return {"id": "r", "source": image_path, "request": request, "image": image, "image_path": image_path,
            "error": None}  # fmt: skip


def test_an_image_row_is_prepared_like_the_same_http_request(preprocessor):
    data = IMAGE.read_bytes()
    defaults = ChatDefaults(max_tokens=7, temperature=0.0)
    out = prepare_row(
        _row(user_request("What is it?", {"seed": 5}), image=data), preprocessor, defaults, MAX_BYTES
    )
    assert out["error"] is None

    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    http = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}], "seed": 5})  # fmt: skip
    params = to_sampling_params(http, defaults)
    expected = preprocessor.prepare(
        to_conversation(http), max_tokens=params.max_tokens, template_version=None
    )

    got = prepared_from_row(out)
    assert got.input_ids == expected.input_ids and got.token_type_ids == expected.token_type_ids
    assert np.array_equal(got.image, expected.image) and got.image_hash == expected.image_hash
    assert (
        sampling_from_json(out["sampling"]) == params == SamplingParams(max_tokens=7, temperature=0.0, seed=5)
    )


def test_image_paths_are_read_and_text_only_bodies_pass(preprocessor):
    out = prepare_row(
        _row(user_request("Hi", {}), image_path=str(IMAGE)), preprocessor, ChatDefaults(), MAX_BYTES
    )
    assert out["error"] is None and out["pixels"] is not None and out["image_size"] == 56
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
    out = prepare_row(_row(body), preprocessor, ChatDefaults(), MAX_BYTES)
    assert out["error"] is None and out["pixels"] is None and prepared_from_row(out).image is None


@pytest.mark.parametrize(
    ("row", "code"),
    [
        (_row(user_request("x", {}), image=b"not an image"), "invalid_image"),
        (_row(user_request("x", {}), image_path="/no/such/file.jpg"), "invalid_image"),
        (_row(user_request("x " * 5000, {"max_tokens": 8000}), image=IMAGE.read_bytes()), "context_length_exceeded"),
        (_row(json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2})), "unsupported_parameter"),
        (_row(json.dumps({"messages": [{"role": "user", "content": "x"}], "logprobs": True})), "unsupported_parameter"),
        (_row(json.dumps({"messages": [], "colour": "red"})), None),  # schema error
        (_row(json.dumps({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})), "unsupported_parameter"),
    ],
)  # fmt: skip
def test_bad_rows_become_400_error_rows(preprocessor, row, code):
    out = prepare_row(row, preprocessor, ChatDefaults(), MAX_BYTES)
    error = json.loads(out["error"])
    assert error["status_code"] == 400 and error["error"]["code"] == code
    assert out["id"] == "r" and out["input_ids"] is None


def test_error_rows_pass_through(preprocessor):
    row = {**_row(None), "error": json.dumps({"status_code": 400, "error": {"message": "m"}})}
    assert prepare_row(row, preprocessor, ChatDefaults(), MAX_BYTES)["error"] == row["error"]


def test_with_image_adds_the_bytes_as_a_data_url():
    conversation = to_conversation(
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}]})
    )
    (url,) = with_image(conversation, b"img").image_urls
    assert url.startswith("data:") and url.endswith(base64.b64encode(b"img").decode())
    assert conversation.image_urls == []  # a new conversation; the parsed one is unchanged


def test_read_image_file_caps_the_size(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 100)
    assert read_image_file(str(big), 100) == b"x" * 100
    with pytest.raises(ImageError, match="larger than"):
        read_image_file(str(big), 99)
