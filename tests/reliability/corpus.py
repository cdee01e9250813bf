"""A corpus of malformed and hostile requests, each with the status the API must answer.

Statuses follow the serving issue: 400 for bad input the schema cannot see (broken JSON,
bad images, two images, disallowed URLs, unsupported features, too long), 404 for an
unknown model or route, 401 for a missing or wrong API key, 405 for a wrong method, 413 for an
oversized body. Schema violations (wrong types, out-of-range values, NaN) are 400 too, as
OpenAI answers them (never 422); unknown fields are accepted (logged once), so none is here.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class BadCase:
    name: str
    expected: int
    body: bytes
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    send_api_key: bool = True
    """False for the authentication cases (the test adds the right key to every other case)."""


def png_bytes(size: int = 32, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(raw).decode("ascii")


def png_bomb_header(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with a tiny IDAT (a decompression bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def chat_body(content: Any = "hello", **fields: Any) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    body.update(fields)
    return body


def image_message(url: str, text: str = "what is this?") -> list[dict]:
    return [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def build_corpus(max_request_bytes: int, max_model_len: int) -> list[BadCase]:
    """Every case with its expected status; needs the app's body limit and context window."""
    good_png = png_bytes()
    cases: list[BadCase] = []

    def add(name: str, expected: int, body: Any, **kw: Any) -> None:
        raw = body if isinstance(body, bytes) else _json(body)
        cases.append(BadCase(name, expected, raw, **kw))

    # ---- not JSON at all (400) ---------------------------------------------------------------
    add("broken_json", 400, b'{"messages": [')
    add("empty_body", 400, b"")
    add("invalid_utf8", 400, b'{"messages": "\xff\xfe"}')
    add("deeply_nested_json", 400, b"[" * 100_000 + b"]" * 100_000)
    add("trailing_garbage", 400, _json(chat_body()) + b"}}")
    # ---- size (413) --------------------------------------------------------------------------
    add("huge_body", 413, _json(chat_body("x" * (max_request_bytes + 1024))))
    # ---- schema (400, never 422) -------------------------------------------------------------
    add("top_level_array", 400, [1, 2])
    add("top_level_string", 400, "hello")
    add("top_level_null", 400, None)
    add("missing_messages", 400, {"max_tokens": 2})
    add("empty_messages", 400, {"messages": []})
    add("messages_not_list", 400, {"messages": "hi"})
    add("message_without_role", 400, {"messages": [{"content": "hi"}]})
    add("unknown_role", 400, {"messages": [{"role": "robot", "content": "hi"}]})
    add("content_is_number", 400, chat_body(42))
    add("unknown_part_type", 400, chat_body([{"type": "audio", "audio": "..."}]))
    add("image_part_without_url", 400, chat_body([{"type": "image_url", "image_url": {}}]))
    add("max_tokens_string", 400, chat_body(max_tokens="ten"))
    add("max_tokens_zero", 400, chat_body(max_tokens=0))
    add("max_tokens_negative", 400, chat_body(max_tokens=-5))
    add("max_tokens_absurd", 400, chat_body(max_tokens=2**40))
    add("temperature_negative", 400, chat_body(temperature=-1))
    add("temperature_huge", 400, chat_body(temperature=1e308))
    add("temperature_nan", 400, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    add("top_p_infinity", 400, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}')
    add("top_p_zero", 400, chat_body(top_p=0))
    add("top_p_above_one", 400, chat_body(top_p=1.5))
    add("top_k_below_minus_one", 400, chat_body(top_k=-2))
    add("repetition_penalty_zero", 400, chat_body(repetition_penalty=0))
    add("seed_too_large", 400, chat_body(seed=2**70))
    add("too_many_stop_strings", 400, chat_body(stop=["a", "b", "c", "d", "e"]))
    add("stop_string_too_long", 400, chat_body(stop="s" * 500))
    add("stream_not_bool", 400, chat_body(stream=[]))
    add("content_null", 400, chat_body(None))
    add("logit_bias_out_of_range", 400, chat_body(logit_bias={"5": 500}))
    add("top_logprobs_above_20", 400, chat_body(logprobs=True, top_logprobs=21))
    add("too_many_messages", 400, {"messages": [{"role": "user", "content": "hi"}] * 1000, "max_tokens": 2})
    add("text_too_long", 400, chat_body("y" * 100_000))
    # ---- semantics the schema cannot see (400) ------------------------------------------------
    add("n_above_server_max", 400, chat_body(n=9))
    add(
        "tool_choice_unknown_function",
        400,
        chat_body(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
    )
    add("top_logprobs_without_logprobs", 400, chat_body(top_logprobs=2))
    add("logit_bias_not_a_token_id", 400, chat_body(logit_bias={"abc": 1}))
    add(
        "audio_output",
        400,
        chat_body(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}),
    )
    add("min_tokens_above_max", 400, chat_body(min_tokens=5, max_tokens=2))
    add("last_message_from_assistant", 400, {"messages": [{"role": "assistant", "content": "hi"}]})
    other_png = png_bytes(color=(0, 0, 255))  # a different image: repeats of the same bytes are allowed
    add(
        "two_images_one_message",
        400,
        chat_body(image_message(data_url(good_png)) + image_message(data_url(other_png))[1:]),
    )
    add(
        "two_images_two_messages",
        400,
        {
            "messages": [
                {"role": "user", "content": image_message(data_url(good_png))},
                {"role": "assistant", "content": "a red square"},
                {"role": "user", "content": image_message(data_url(other_png))},
            ],
            "max_tokens": 2,
        },
    )
    add("image_in_assistant_message", 400, {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": image_message(data_url(good_png))},
        {"role": "user", "content": "and?"},
    ], "max_tokens": 2})  # fmt: skip
    add("bad_base64", 400, chat_body(image_message("data:image/png;base64,@@@not-base64@@@")))
    add("data_url_without_comma", 400, chat_body(image_message("data:image/png;base64")))
    add("empty_data_url", 400, chat_body(image_message("data:image/png;base64,")))
    add("not_an_image", 400, chat_body(image_message(data_url(b"%PDF-1.4 this is not a picture" * 10))))
    add("truncated_png", 400, chat_body(image_message(data_url(good_png[: len(good_png) // 2]))))
    add("decompression_bomb", 400, chat_body(image_message(data_url(png_bomb_header()))))
    for name, url in [
        ("loopback_url", "http://127.0.0.1:8000/v1/models"),
        ("loopback_v6_url", "http://[::1]/image.png"),
        ("cloud_metadata_url", "http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ("gcp_metadata_url", "http://metadata.google.internal/computeMetadata/v1/"),
        ("private_network_url", "https://10.0.0.1/image.png"),
        ("file_url", "file:///etc/passwd"),
        ("plain_path", "/etc/passwd"),
        ("path_traversal", "../../../../etc/shadow"),
        ("ftp_url", "ftp://example.com/image.png"),
        ("javascript_url", "javascript:alert(1)"),
    ]:
        add(name, 400, chat_body(image_message(url)))
    add("prompt_plus_max_tokens_over_context", 400, chat_body(max_tokens=max_model_len))
    # ~30,000 tokens in 60,000 characters: over the context window, under the text-length bound.
    add("prompt_over_context", 400, chat_body("7 " * 30_000))
    add(
        "response_format_json_schema",
        400,
        chat_body(response_format={"type": "json_schema", "json_schema": {}}),
    )
    # Refused by the engine's grammar compiler on the model replica: the 400 crosses the Ray hop.
    add(
        "response_format_invalid_schema",
        400,
        chat_body(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        ),
    )
    add("guided_regex_invalid", 400, chat_body(guided_regex="(unclosed"))
    # ---- authentication (401) -----------------------------------------------------------------
    add("missing_api_key", 401, chat_body(), send_api_key=False)
    add("wrong_api_key", 401, chat_body(), send_api_key=False,
        headers={"content-type": "application/json", "authorization": "Bearer not-the-key"})  # fmt: skip
    # ---- routing -----------------------------------------------------------------------------
    add("unknown_model", 404, chat_body(model="gpt-4-does-not-exist"))
    add("unknown_route", 404, chat_body(), path="/v1/completions-nope")
    add("wrong_method", 405, b"", method="GET")
    return cases
