"""data: URLs (the bytes decide, not the media type) and opt-in local files under one directory."""

from __future__ import annotations

import base64
import os
from urllib.parse import quote_from_bytes

import pytest

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess.options import PreprocessOptions
from cogvlm_ray.preprocess.sources import decode_data_url, load_image_bytes
from tests.unit.preprocess.conftest import encode_image, noise_image

PNG = encode_image(noise_image(9, 7), "PNG")
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    "url",
    [
        f"data:image/png;base64,{B64}",
        f"data:image/jpeg;base64,{B64}",  # wrong media type: the bytes decide
        f"data:;base64,{B64}",  # missing media type
        f"data:application/octet-stream;base64,{B64}",
        f"data:image/png;charset=utf-8;base64,{B64}",
        f"data:image/png;base64,{B64.rstrip('=')}",  # missing padding
        "data:image/png;base64,"
        + "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),  # MIME line wraps
        f"data:image/png;base64,{base64.urlsafe_b64encode(PNG).decode()}",
        "data:image/png," + quote_from_bytes(PNG),  # percent-encoded, no base64
    ],
)
def test_data_url_variants_give_the_same_bytes(url):
    assert load_image_bytes(url, PreprocessOptions()) == PNG


def test_data_url_byte_cap_checked_before_decoding():
    with pytest.raises(ImageError, match="more than the limit of 100 bytes"):
        decode_data_url("data:image/png;base64," + "A" * 10_000, max_bytes=100)


def test_local_files_disabled_by_default(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    for url in (f"file://{tmp_path}/a.png", str(tmp_path / "a.png")):
        with pytest.raises(ImageError, match="disabled"):
            load_image_bytes(url, PreprocessOptions())


@pytest.fixture
def local_options(tmp_path) -> PreprocessOptions:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return PreprocessOptions(allow_local_files=True, local_files_dir=str(root), max_image_bytes=len(PNG) + 10)


def test_local_file_inside_directory(local_options):
    root = local_options.local_files_dir
    assert load_image_bytes(f"file://{root}/sub/a.png", local_options) == PNG
    assert load_image_bytes(f"{root}/sub/a.png", local_options) == PNG
    assert load_image_bytes("sub/a.png", local_options) == PNG  # relative to the directory


def test_local_symlink_inside_directory_is_fine(local_options):
    root = local_options.local_files_dir
    os.symlink(f"{root}/sub/a.png", f"{root}/link.png")
    assert load_image_bytes("link.png", local_options) == PNG


def test_local_too_large(local_options):
    root = local_options.local_files_dir
    with open(f"{root}/big.png", "wb") as f:
        f.write(PNG + b"\0" * 100)
    with pytest.raises(ImageError, match="more than the limit"):
        load_image_bytes("big.png", local_options)
