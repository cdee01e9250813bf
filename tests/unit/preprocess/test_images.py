"""Pixels exactly as the official pipeline, uint8 transport, and decoding of awkward modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from cogvlm_ray.errors import ImageError
from cogvlm_ray.model.pixels import normalize_image, official_pixel_values
from cogvlm_ray.preprocess.images import content_hash, decode_image, pixel_hash, resize_to_uint8
from tests.unit.preprocess.conftest import FIXTURE_IMAGES, encode_image, noise_image

MAX_PIXELS = 10_000_000


@pytest.fixture(scope="module")
def golden(fixture_dir):
    return load_file(str(fixture_dir / "preprocess.safetensors"))


@pytest.mark.parametrize("name", ["img_rgba", "img_gray", "img_rgb_odd"])
def test_fixture_images_match_official_pixels(name, fixture_dir, golden):
    data = (fixture_dir / FIXTURE_IMAGES[name]).read_bytes()
    decoded = decode_image(data, image_size=56, max_pixels=MAX_PIXELS)
    assert decoded.pixels.shape == (3, 56, 56) and decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags.c_contiguous and not decoded.pixels.flags.writeable
    rgb = np.asarray(Image.open(fixture_dir / FIXTURE_IMAGES[name]).convert("RGB"))
    expected = golden[f"{name}.pixel_values"]
    normalized = normalize_image(decoded.pixels).numpy()
    if name.endswith("odd"):  # JPEG: decoder may differ by +-1 (fixture README)
        assert np.abs(rgb.astype(int) - golden[f"{name}.decoded_rgb_uint8"]).max() <= 1
        assert np.abs(normalized - expected).max() <= 0.02
    else:
        assert np.array_equal(rgb, golden[f"{name}.decoded_rgb_uint8"])
        assert np.array_equal(normalized, expected)  # bit-exact


def test_normalize_is_bit_identical_to_official_float32_at_1344():
    rgb = noise_image(300, 200, seed=3)
    pixels = resize_to_uint8(rgb, 1344)
    assert not pixels.flags.writeable  # as it arrives from Ray's object store
    ours = normalize_image(pixels)
    official = official_pixel_values(rgb, 1344)
    assert ours.dtype == torch.float32 and ours.shape == (3, 1344, 1344)
    assert torch.equal(ours, official)
    assert torch.equal(normalize_image(torch.from_numpy(pixels.copy())), official)
    assert torch.equal(normalize_image(pixels, dtype=torch.bfloat16), official.to(torch.bfloat16))
    batch = normalize_image(np.stack([pixels, pixels]))
    assert batch.shape == (2, 3, 1344, 1344) and torch.equal(batch[1], official)


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize_image(np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[3, S, S\]"):
        normalize_image(np.zeros((4, 4, 3), dtype=np.uint8))


def test_uint8_payload_is_4x_smaller_than_float32():
    pixels = resize_to_uint8(noise_image(64, 48), 1344)
    assert official_pixel_values(noise_image(64, 48), 1344).numpy().nbytes == 4 * pixels.nbytes


def test_content_hash_is_the_cache_key_of_bytes_and_size():
    data = encode_image(noise_image(50, 40, seed=1), "PNG")
    first = decode_image(data, image_size=56, max_pixels=MAX_PIXELS)
    again = decode_image(data, image_size=56, max_pixels=MAX_PIXELS)
    other_size = decode_image(data, image_size=28, max_pixels=MAX_PIXELS)
    other_image = decode_image(
        encode_image(noise_image(50, 40, seed=2), "PNG"), image_size=56, max_pixels=MAX_PIXELS
    )
    assert first.image_hash == again.image_hash == content_hash(data, 56)
    assert len({first.image_hash, other_size.image_hash, other_image.image_hash}) == 3
    assert first.source_format == "PNG" and first.source_size == (50, 40)
    assert pixel_hash(first.pixels) == pixel_hash(again.pixels) != pixel_hash(other_image.pixels)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_modes_convert_like_official(mode):
    base = noise_image(30, 20, seed=4)
    image = base.convert(mode)
    fmt = {"CMYK": "JPEG", "LA": "PNG", "1": "BMP"}.get(mode, "PNG")
    data = encode_image(image, fmt)
    decoded = decode_image(data, image_size=56, max_pixels=MAX_PIXELS)
    reference = (
        Image.open(__import__("io").BytesIO(data)).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
    )
    assert np.array_equal(decoded.pixels, np.asarray(reference).transpose(2, 0, 1))


def test_rgba_alpha_is_dropped_not_composited():
    rgba = Image.new("RGBA", (8, 8), (200, 10, 30, 0))  # fully transparent red
    decoded = decode_image(encode_image(rgba, "PNG"), image_size=8, max_pixels=MAX_PIXELS)
    assert decoded.pixels[:, 0, 0].tolist() == [200, 10, 30]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey16 = np.full((10, 10), 0x8000, dtype=np.uint16)  # mid grey in 16 bits
    decoded = decode_image(encode_image(Image.fromarray(grey16), "PNG"), image_size=10, max_pixels=MAX_PIXELS)
    assert decoded.pixels.min() == decoded.pixels.max() == 0x80


def test_animated_gif_and_webp_use_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    for fmt in ("GIF", "WEBP"):
        data = encode_image(
            frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, lossless=True
        )
        assert getattr(Image.open(__import__("io").BytesIO(data)), "is_animated", False)
        decoded = decode_image(data, image_size=16, max_pixels=MAX_PIXELS)
        red, green, blue = (int(c) for c in decoded.pixels[:, 8, 8])
        assert red > 200 and green < 50 and blue < 50, fmt


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_supported_formats_decode(fmt):
    image = noise_image(40, 30, seed=5)
    decoded = decode_image(encode_image(image, fmt), image_size=56, max_pixels=MAX_PIXELS)
    assert decoded.pixels.shape == (3, 56, 56) and decoded.source_format == fmt


def test_float_mode_is_refused():
    image = Image.fromarray(np.ones((8, 8), dtype=np.float32))
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        decode_image(encode_image(image, "TIFF"), image_size=8, max_pixels=MAX_PIXELS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_on_cuda_is_bit_identical_to_official_cpu():
    rgb = noise_image(300, 200, seed=9)
    pixels = resize_to_uint8(rgb, 1344)
    on_gpu = normalize_image(pixels, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), official_pixel_values(rgb, 1344))
    assert torch.equal(
        normalize_image(pixels, device="cuda", dtype=torch.bfloat16).cpu(),
        official_pixel_values(rgb, 1344).to(torch.bfloat16),
    )
