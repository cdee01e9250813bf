"""Fixtures for the preprocessing tests: the tiny checkpoint's config/tokenizer and image factories."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast

from cogvlm_ray.config import ModelConfig
from cogvlm_ray.preprocess import PreprocessOptions, Preprocessor

FIXTURE_IMAGES = {
    "img_rgb_odd": "images/img_rgb_odd.jpg",
    "img_rgba": "images/img_rgba.png",
    "img_gray": "images/img_gray.png",
}


@pytest.fixture(scope="session")
def tokenizer(fixture_dir: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(fixture_dir))


@pytest.fixture(scope="session")
def model_config(fixture_dir: Path) -> ModelConfig:
    return ModelConfig.from_pretrained(fixture_dir)


@pytest.fixture
def make_preprocessor(model_config, tokenizer) -> Callable[..., Preprocessor]:
    def make(**option_overrides) -> Preprocessor:
        resolver = option_overrides.pop("resolver", None)
        return Preprocessor(model_config, tokenizer, PreprocessOptions(**option_overrides), resolver=resolver)

    return make


def encode_image(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def user_image_message(url: str, text: str = "What is this?") -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
    }
