"""Bad input: a corpus of malformed/hostile requests with their expected 4xx, then a schema fuzz.

Every answer must be the expected status with an OpenAI-shaped JSON error body, and the server
must answer a normal request afterwards. The fuzz mutates a valid request with random JSON
values in random fields and requires that no answer is a 5xx.
"""

from __future__ import annotations

import json
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.corpus import build_corpus, chat_body, data_url, image_message, png_bytes
from tests.reliability.helpers import CHAT, assert_openai_error

pytestmark = pytest.mark.integration

MAX_REQUEST_BYTES = 2 * 1024 * 1024  # integration_app_args
MAX_MODEL_LEN = 8192  # tiny-random: the real config's context window
CORPUS = build_corpus(MAX_REQUEST_BYTES, MAX_MODEL_LEN)
KNOWN_BUGS: dict[str, str] = {}  # case name -> why it fails today (strict xfail until fixed)


def _params() -> list:
    marks = {name: pytest.mark.xfail(strict=True, reason=reason) for name, reason in KNOWN_BUGS.items()}
    return [pytest.param(case, id=case.name, marks=marks.get(case.name, ())) for case in CORPUS]


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.base_url, timeout=60.0) as client:
        yield client


def _auth(serve_app) -> dict[str, str]:
    return {"authorization": f"Bearer {serve_app.api_key}"}


def test_corpus_is_large_and_covers_every_status():
    assert len(CORPUS) >= 40
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    assert {case.expected for case in CORPUS} == {400, 401, 404, 405, 413}


@pytest.mark.parametrize("case", _params())
def test_bad_request_gets_expected_status(serve_app, http, case):
    headers = dict(case.headers)
    if case.send_api_key:
        headers.update(_auth(serve_app))
    response = http.request(case.method, case.path, content=case.body, headers=headers)
    assert_openai_error(response, case.expected)


def test_server_healthy_after_the_corpus(serve_app, http):
    for case in CORPUS:  # order-independent: replay the hostile cases first (statuses checked above)
        headers = {**case.headers, **(_auth(serve_app) if case.send_api_key else {})}
        http.request(case.method, case.path, content=case.body, headers=headers)
    assert http.get("/health").status_code == 200
    body = chat_body(image_message(data_url(png_bytes())), model=serve_app.model, max_tokens=3, temperature=0)
    response = http.post(CHAT, json=body, headers=_auth(serve_app))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# ---- property-based fuzz of the request schema ---------------------------------------------------

FIELDS = [
    "messages", "model", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p",
    "top_k", "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "stream",
    "stream_options", "template_version", "user", "n", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "tools", "tool_choice", "response_format", "unknown_field",
    "min_p", "store", "metadata", "service_tier", "reasoning_effort", "audio", "modalities", "prediction",
    "web_search_options", "parallel_tool_calls", "functions", "function_call", "verbosity",
]  # fmt: skip

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=string.printable + "é中\u0000\ufffd", max_size=24)
    | st.sampled_from(["data:image/png;base64,AAAA", "http://169.254.169.254/", "user", "assistant", "text"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)
message_mutations = st.fixed_dictionaries(
    {},
    optional={
        "role": json_values,
        "content": json_values
        | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                          optional={"text": json_values, "image_url": json_values}), max_size=3),
        "name": json_values,
        "extra": json_values,
        "tool_calls": json_values,
        "tool_call_id": json_values,
    },
)  # fmt: skip


def _bounded(body: dict) -> dict:
    """Keep valid long generations out of the fuzz (they test nothing and cost seconds each)."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 8 < value <= 2**20:
            body[key] = 8
    return body


def _check_fuzz_case(serve_app, http, fields: dict, message: dict) -> None:
    body = chat_body("describe", model=serve_app.model, max_tokens=2)
    body["messages"][0].update(message)
    body.update(fields)
    response = http.post(CHAT, content=json.dumps(_bounded(body)).encode(), headers=_auth(serve_app))
    assert response.status_code < 500, (response.status_code, response.text[:300], body)
    assert response.status_code != 422, (response.text[:300], body)  # schema errors are 400s
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)


FUZZ_INPUTS = {
    "fields": st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3),
    "message": message_mutations,
}


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ_INPUTS)
def test_schema_fuzz_never_5xx(serve_app, http, fields, message):
    _check_fuzz_case(serve_app, http, fields, message)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ_INPUTS)
def test_schema_fuzz_never_5xx_long(serve_app, http, fields, message):
    _check_fuzz_case(serve_app, http, fields, message)
