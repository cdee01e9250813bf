"""Image decoding, safety checks and resizing (numpy + Pillow, no torch).

Owns: encoded bytes -> RGB -> bicubic S x S -> uint8 [3, S, S] + content hash, with every
decoding failure turned into an `ImageError`.
Does not own: where the bytes come from (`sources.py`), prompt building, or the float CLIP
normalisation, which is the vision tower's input contract (`model/pixels.py`, run by the
model replica).

Pixel contract of the official pipeline: `convert("RGB")` (alpha dropped, not composited;
grey copied to the three channels), PIL bicubic resize to S x S ignoring the aspect ratio;
then, on the model side, `x / 255` and `(x - mean) / std` per channel in float32.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess.options import DEFAULT_IMAGE_FORMATS

logger = logging.getLogger(__name__)

#: Modes Pillow converts to RGB the way the official `convert("RGB")` does.
_CONVERTIBLE_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA"}
)
#: 16-bit greyscale modes: scaled to 8 bits (keep the high byte) instead of Pillow's clipping.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HASH_TAG = "cogvlm-ray-image-v1"


@dataclass(frozen=True)
class DecodedImage:
    """A request image ready to cross to the model replica."""

    pixels: np.ndarray
    """uint8 [3, S, S], C-contiguous, read-only."""
    image_hash: str
    """`content_hash` of the encoded bytes and size (the model's image-feature cache key)."""
    source_format: str
    """Pillow format name of the encoded image (JPEG, PNG, ...)."""
    source_size: tuple[int, int]
    """(width, height) before resizing."""


def decode_image(
    data: bytes,
    *,
    image_size: int,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
    image_hash: str | None = None,
) -> DecodedImage:
    """Decode encoded image bytes into the resized uint8 [3, S, S] the model replica needs.

    `image_hash` may be passed when the caller already computed `content_hash(data, image_size)`.
    """
    image = open_image(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats)
    source_format = image.format or "unknown"
    source_size = image.size
    rgb = to_rgb(image)
    pixels = resize_to_uint8(rgb, image_size)
    return DecodedImage(pixels, image_hash or content_hash(data, image_size), source_format, source_size)


def open_image(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS,
) -> Image.Image:
    """Open and fully decode the first frame, refusing bombs, truncation and empty images.

    The size check uses the header before any pixel data is decoded, so a small file that
    claims a huge canvas costs nothing.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {max_bytes} bytes")
    # No warnings.catch_warnings() here: it is not thread-safe. Pillow's DecompressionBombWarning
    # (above 89 M pixels) is harmless because our own cap below refuses before any decoding.
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise ImageError(
            "could not decode the image: not a supported format, or its header is corrupt, truncated "
            f"or declares a zero size (accepted formats: {', '.join(formats)})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large (decompression bomb refused): {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"could not decode the image: corrupt header ({exc})") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels} "
            "(decompression bomb refused)"
        )
    if getattr(image, "is_animated", False):
        # CogVLM2 takes a still image: use the first frame (documented behaviour).
        logger.debug("animated %s: using the first frame", image.format)
        image.seek(0)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large (decompression bomb refused): {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError(f"could not decode the image: truncated or corrupt data ({exc})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """`convert("RGB")` as the official demos do; 16-bit grey is scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's I;16 -> RGB clips at 255 (almost everything turns white); keep the high byte.
        grey = np.asarray(image).astype(np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if mode not in _CONVERTIBLE_MODES:
        raise ImageError(
            f"unsupported pixel mode {mode!r} (supported: 8-bit RGB/grey/palette/CMYK, 16-bit grey)"
        )
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"could not convert pixel mode {mode!r} to RGB ({exc})") from None


def resize_to_uint8(rgb: Image.Image, image_size: int) -> np.ndarray:
    """Bicubic resize to image_size x image_size; returns read-only uint8 [3, S, S]."""
    if rgb.mode != "RGB":
        raise ValueError(f"resize_to_uint8 expects an RGB image, got {rgb.mode}")
    size = (image_size, image_size)
    resized = rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC)
    # Channels first without an HWC round trip: Pillow packs one band at a time ("raw", "R"),
    # ~4x cheaper than np.asarray + transpose (same bytes; tested).
    chw = np.empty((3, image_size, image_size), dtype=np.uint8)
    for index, band in enumerate("RGB"):
        chw[index] = np.frombuffer(resized.tobytes("raw", band), dtype=np.uint8).reshape(size[1], size[0])
    chw.flags.writeable = False
    return chw


def content_hash(data: bytes, image_size: int) -> str:
    """The image-cache key: sha256 over a version tag, the target size and the encoded bytes.

    Equal keys mean equal pixels (decoding and resizing are deterministic), and hashing the
    encoded bytes is 4-100x cheaper than hashing the 5.4 MB of resized pixels. Bump the tag if
    the pixel pipeline ever changes.
    """
    digest = hashlib.sha256(f"{_HASH_TAG}:{image_size}:".encode())
    digest.update(data)
    return digest.hexdigest()


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of a uint8 [3, S, S] array itself (shape included), for callers that have no encoded
    bytes (e.g. tests and benchmarks building PreparedPrompts from arrays)."""
    digest = hashlib.sha256(repr(tuple(pixels.shape)).encode())
    digest.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))
    return digest.hexdigest()
