"""Image decoding, safety checks, resizing and CLIP normalisation.

Owns: encoded bytes -> RGB -> bicubic S x S -> uint8 [3, S, S] + content hash, with every
decoding failure turned into an `ImageError`; and `normalize_image`, the float step that the
model replica applies (bit-identical to the official float32 CPU transform).
Does not own: where the bytes come from (`sources.py`) or prompt building.

Pixel contract (official pipeline, spec section 3): `convert("RGB")` (alpha dropped, not
composited; grey copied to the three channels), PIL bicubic resize to S x S ignoring the
aspect ratio, then `x / 255`, then `(x - mean) / std` per channel in float32.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess.options import DEFAULT_IMAGE_FORMATS

logger = logging.getLogger(__name__)

#: OpenAI CLIP statistics used by the official transform.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

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


def normalize_image(
    pixels: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [3, S, S] (or [B, 3, S, S]) -> CLIP-normalised tensor, computed in float32.

    Same operations in the same order as torchvision's ToTensor + Normalize (divide by 255,
    subtract the mean, divide by the std, all float32), so the result is bit-identical to the
    official CPU transform; IEEE float32 division is exact-rounded on CUDA too. The cast to
    `dtype` (e.g. bf16 for the model) happens last, as the official demos cast after the
    transform. The uint8 upload is 4x smaller than shipping float32.
    """
    if isinstance(pixels, np.ndarray):
        if pixels.dtype != np.uint8:
            raise ValueError(f"normalize_image expects uint8 pixels, got {pixels.dtype}")
        # Arrays from Ray's object store are read-only; torch needs a writable buffer.
        tensor = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
    else:
        if pixels.dtype != torch.uint8:
            raise ValueError(f"normalize_image expects uint8 pixels, got {pixels.dtype}")
        tensor = pixels
    if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"normalize_image expects [3, S, S] or [B, 3, S, S], got {tuple(tensor.shape)}")
    tensor = tensor.to(device=device, non_blocking=True)
    x = tensor.to(torch.float32).div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x if dtype == torch.float32 else x.to(dtype)


def official_pixel_values(rgb: Image.Image, image_size: int) -> torch.Tensor:
    """Reference: the official float32 transform on CPU (Resize bicubic, ToTensor, Normalize).

    Used by tests and the benchmark as the baseline we must match bit for bit.
    """
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)  # Resize (PIL input)
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()  # ToTensor: [3, S, S]
    x = x.to(torch.float32).div(255)
    x = x.clone()  # Normalize(inplace=False) works on a copy
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)
