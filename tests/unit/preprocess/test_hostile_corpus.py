"""A corpus of malformed and hostile inputs, each driven through `Preprocessor.prepare` with its
expected typed error (the ingress maps all of them to HTTP 400). Nothing may crash or hang.
"""

from __future__ import annotations

import base64
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvlm_ray.errors import CogVLMError, ImageError, InvalidRequestError, PromptTooLongError
from tests.unit.preprocess.conftest import data_url, encode_image, noise_image, user_image_message

# Pillow warns (89 M pixels) before our own cap refuses; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

PNG = encode_image(noise_image(64, 48, seed=7), "PNG")
JPEG = encode_image(noise_image(64, 48, seed=7), "JPEG", quality=90)


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims another size (CRC fixed, so only the size lies)."""
    data = bytearray(PNG)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode_image(Image.new("P", (4, 4)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    descriptor = data.index(b"\x2c", 10)
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def corrupt_png_data() -> bytes:
    data = bytearray(PNG)
    data[len(data) // 2] ^= 0xFF  # inside IDAT: zlib stream / CRC broken
    return bytes(data)


def url_message(url: object) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def b64_message(data: bytes, media_type: str = "image/png") -> list[dict]:
    return url_message(data_url(data, media_type))


@dataclass(frozen=True)
class Hostile:
    name: str
    messages: Callable[[Path], list[dict]]
    error: type[CogVLMError]
    match: str
    options: dict = field(default_factory=dict)
    resolver: dict | None = None


HTTP_ON = {"allow_http": True, "http_allowed_hosts": ("*",)}

CORPUS = [
    # --- decompression bombs and size lies
    Hostile(
        "png_header_claims_10G_pixels",
        lambda _: b64_message(png_claiming(100_000, 100_000)),
        ImageError,
        "decompression bomb",
    ),
    Hostile(
        "png_header_claims_100M_pixels",
        lambda _: b64_message(png_claiming(10_000, 10_000)),
        ImageError,
        "decompression bomb",
    ),
    Hostile(
        "png_over_our_pixel_cap",
        lambda _: b64_message(png_claiming(7_000, 7_000)),
        ImageError,
        "7000x7000 = 49000000 pixels, more than the limit",
    ),
    Hostile(
        "gif_header_claims_65535_squared",
        lambda _: b64_message(gif_claiming(65535, 65535)),
        ImageError,
        "decompression bomb",
    ),
    Hostile("png_zero_width", lambda _: b64_message(png_claiming(0, 5)), ImageError, "zero size"),
    Hostile(
        "encoded_bytes_over_cap",
        lambda _: b64_message(PNG),
        ImageError,
        "more than the limit of 1000 bytes",
        {"max_image_bytes": 1000},
    ),
    # --- truncated / corrupt / not an image
    Hostile(
        "png_truncated_in_idat",
        lambda _: b64_message(PNG[: len(PNG) // 2]),
        ImageError,
        "truncated or corrupt",
    ),
    Hostile(
        "jpeg_truncated",
        lambda _: b64_message(JPEG[: len(JPEG) // 2], "image/jpeg"),
        ImageError,
        "could not decode the image",
    ),
    Hostile(
        "png_corrupt_idat",
        lambda _: b64_message(corrupt_png_data()),
        ImageError,
        "could not decode the image",
    ),
    Hostile("png_signature_only", lambda _: b64_message(PNG[:8]), ImageError, "not a supported format"),
    Hostile(
        "random_bytes",
        lambda _: b64_message(np.random.default_rng(0).bytes(4096)),
        ImageError,
        "not a supported format",
    ),
    Hostile(
        "html_with_text_media_type",
        lambda _: b64_message(b"<html><body>hi</body></html>", "text/html"),
        ImageError,
        "not a supported format",
    ),
    Hostile(
        "svg_script",
        lambda _: b64_message(
            b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "image/svg+xml"
        ),
        ImageError,
        "not a supported format",
    ),
    Hostile(
        "eps_decoder_not_allowed",
        lambda _: b64_message(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        ImageError,
        "not a supported format",
    ),
    Hostile(
        "float_tiff_mode_F",
        lambda _: b64_message(encode_image(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF")),
        ImageError,
        "unsupported pixel mode 'F'",
    ),
    Hostile(
        "int32_tiff_mode_I",
        lambda _: b64_message(encode_image(Image.new("I", (4, 4)), "TIFF")),
        ImageError,
        "unsupported pixel mode 'I'",
    ),
    # --- data URL syntax
    Hostile("empty_data_url", lambda _: url_message("data:image/png;base64,"), ImageError, "no data"),
    Hostile(
        "bad_base64_characters",
        lambda _: url_message("data:image/png;base64,iVBOR!!!*&"),
        ImageError,
        "not valid base64",
    ),
    Hostile(
        "bad_base64_length",
        lambda _: url_message("data:image/png;base64,iVBORw0KG"),
        ImageError,
        "not valid base64",
    ),
    Hostile(
        "data_url_without_comma",
        lambda _: url_message("data:image/png;base64"),
        ImageError,
        "malformed data URL",
    ),
    Hostile(
        "raw_base64_without_data_prefix",
        lambda _: url_message(base64.b64encode(PNG).decode()),
        ImageError,
        "must be a data: URL",
    ),
    Hostile(
        "non_string_url", lambda _: url_message(12345), InvalidRequestError, "url must be a non-empty string"
    ),
    Hostile(
        "javascript_scheme",
        lambda _: url_message("javascript:alert(1)"),
        ImageError,
        "scheme 'javascript' is not supported",
    ),
    Hostile(
        "ftp_scheme_with_http_on",
        lambda _: url_message("ftp://example.com/a.png"),
        ImageError,
        "scheme 'ftp' is not supported",
        HTTP_ON,
    ),
    # --- http(s): off by default, SSRF refused after DNS resolution
    Hostile(
        "http_disabled_by_default",
        lambda _: url_message("https://example.com/a.png"),
        ImageError,
        "http\\(s\\) image URLs are disabled",
    ),
    Hostile(
        "ssrf_loopback_literal",
        lambda _: url_message("http://127.0.0.1:8000/a.png"),
        ImageError,
        "resolves to 127.0.0.1",
        HTTP_ON,
    ),
    Hostile(
        "ssrf_metadata_service",
        lambda _: url_message("http://169.254.169.254/latest/meta-data/"),
        ImageError,
        "resolves to 169.254.169.254",
        HTTP_ON,
    ),
    Hostile(
        "ssrf_private_10",
        lambda _: url_message("http://10.0.0.1/a.png"),
        ImageError,
        "resolves to 10.0.0.1",
        HTTP_ON,
    ),
    Hostile(
        "ssrf_ipv6_loopback",
        lambda _: url_message("http://[::1]:8080/a.png"),
        ImageError,
        "resolves to ::1",
        HTTP_ON,
    ),
    Hostile(
        "ssrf_decimal_ip",
        lambda _: url_message("http://2130706433/a.png"),
        ImageError,
        "resolves to 127.0.0.1",
        HTTP_ON,
        {"2130706433": ["127.0.0.1"]},
    ),
    Hostile(
        "ssrf_dns_to_private",
        lambda _: url_message("https://images.example.com/a.png"),
        ImageError,
        "resolves to 192.168.0.10",
        {"allow_http": True, "http_allowed_hosts": ("*.example.com",)},
        {"images.example.com": ["192.168.0.10"]},
    ),
    Hostile(
        "host_not_in_allow_list",
        lambda _: url_message("https://evil.test/a.png"),
        ImageError,
        "'evil.test' is not in the allow-list",
        {"allow_http": True, "http_allowed_hosts": ("images.example.com",)},
    ),
    Hostile(
        "userinfo_host_confusion",
        lambda _: url_message("https://images.example.com@evil.test/a.png"),
        ImageError,
        "'evil.test' is not in the allow-list",
        {"allow_http": True, "http_allowed_hosts": ("images.example.com",)},
    ),
    # --- local files: off by default, no escapes
    Hostile("local_file_disabled", lambda root: url_message(f"file://{root}/ok.png"), ImageError, "disabled"),
    Hostile(
        "file_url_outside_dir",
        lambda _: url_message("file:///etc/passwd"),
        ImageError,
        "outside the allowed directory",
        {"local": True},
    ),
    Hostile(
        "dotdot_escape",
        lambda root: url_message("../secret.png"),
        ImageError,
        "must not contain '..'",
        {"local": True},
    ),
    Hostile(
        "encoded_dotdot_escape",
        lambda root: url_message(f"file://{root}/%2e%2e/secret.png"),
        ImageError,
        "must not contain '..'",
        {"local": True},
    ),
    Hostile(
        "symlink_escape",
        lambda root: url_message("escape.png"),
        ImageError,
        "outside the allowed directory",
        {"local": True},
    ),
    Hostile(
        "file_url_remote_host",
        lambda _: url_message("file://fileserver/share/a.png"),
        ImageError,
        "file URL host 'fileserver'",
        {"local": True},
    ),
    Hostile(
        "local_path_is_directory",
        lambda root: url_message("sub"),
        ImageError,
        "not a regular file",
        {"local": True},
    ),
    Hostile(
        "local_file_missing", lambda root: url_message("nope.png"), ImageError, "not found", {"local": True}
    ),
    # --- conversation rules
    Hostile(
        "two_different_images",
        lambda _: [
            user_image_message(data_url(PNG)),
            {"role": "assistant", "content": "ok"},
            user_image_message(data_url(JPEG, "image/jpeg")),
        ],
        ImageError,
        "one image per conversation",
    ),
    Hostile(
        "two_images_one_message",
        lambda _: [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(PNG)}},
                    {"type": "image_url", "image_url": {"url": data_url(JPEG)}},
                ],
            }
        ],
        ImageError,
        "2 different images",
    ),
    Hostile(
        "prompt_too_long",
        lambda _: [{"role": "user", "content": "word " * 9000}],
        PromptTooLongError,
        "maximum context length is 8192 tokens",
    ),
]


@pytest.fixture
def local_root(tmp_path) -> Path:
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    return root


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 25 and len({case.name for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_input_gets_its_typed_400(case, local_root, make_preprocessor):
    options = dict(case.options)
    if options.pop("local", False):
        options.update(allow_local_files=True, local_files_dir=str(local_root))
    table = case.resolver
    if table is not None:
        options["resolver"] = lambda host, port: table[host]
    preprocessor = make_preprocessor(**options)
    with pytest.raises(case.error, match=case.match) as excinfo:
        preprocessor.prepare(case.messages(local_root), max_tokens=16)
    assert excinfo.value.status_code == 400
    # The preprocessor still works afterwards.
    assert preprocessor.prepare([{"role": "user", "content": "ok"}], max_tokens=1).num_prompt_tokens > 1
