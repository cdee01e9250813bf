"""Where image bytes come from: `data:` URLs, opt-in http(s), opt-in local files.

Owns: turning the `url` of an OpenAI `image_url` part into encoded bytes under the byte cap.
The media type written in a data URL is ignored (clients often get it wrong); the bytes
decide, in `images.py`. Does not decode pixels.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess.http_fetch import Resolver, fetch_http_image
from cogvlm_ray.preprocess.options import PreprocessOptions

_WHITESPACE = b" \t\r\n\x0b\x0c"


def load_image_bytes(url: str, options: PreprocessOptions, *, resolver: Resolver | None = None) -> bytes:
    """Encoded image bytes for an `image_url.url` value, or an ImageError naming the problem."""
    if not isinstance(url, str) or not url.strip():
        raise ImageError("image_url.url must be a non-empty string")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_bytes=options.max_image_bytes)
    if scheme in ("http", "https"):
        return fetch_http_image(url, options, resolver=resolver)
    if scheme == "file" or (not scheme and options.allow_local_files):
        return read_local_file(url, options)
    if not scheme and not options.allow_local_files:
        raise ImageError("image_url.url must be a data: URL (local file paths are disabled on this server)")
    raise ImageError(f"image URL scheme {scheme!r} is not supported (use a data: URL)")


def decode_data_url(url: str, *, max_bytes: int) -> bytes:
    """RFC 2397 `data:[<media type>][;base64],<data>`; base64 or percent-encoded payloads."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("malformed data URL: no ',' separating the header from the data")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if "base64" not in params[1:]:
        data = unquote_to_bytes(payload)
        if len(data) > max_bytes:
            raise ImageError(f"image is {len(data)} bytes, more than the limit of {max_bytes} bytes")
        return data
    # Line-wrapped (MIME) base64 is common; bytes.translate strips it ~10x faster than a regex.
    raw = payload.encode("ascii", errors="replace").translate(None, _WHITESPACE)
    # Refuse before decoding: 4 base64 characters carry 3 bytes.
    if len(raw) // 4 * 3 > max_bytes + 3:
        raise ImageError(
            f"image is about {len(raw) // 4 * 3} bytes, more than the limit of {max_bytes} bytes"
        )
    if not raw:
        raise ImageError("data URL has no data (empty image)")
    raw += b"=" * (-len(raw) % 4)  # tolerate missing padding
    try:
        altchars = b"-_" if (b"-" in raw or b"_" in raw) else None
        data = base64.b64decode(raw, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL is not valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {max_bytes} bytes")
    return data


def read_local_file(url: str, options: PreprocessOptions) -> bytes:
    """Read a `file://` URL or a path that resolves (symlinks followed) inside `local_files_dir`."""
    if not options.allow_local_files or not options.local_files_dir:
        raise ImageError("local file images are disabled on this server; send the image as a data: URL")
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"file URL host {parts.netloc!r} is not allowed (only local files)")
        raw_path = unquote(parts.path)
    else:
        raw_path = url
    if "\x00" in raw_path:
        raise ImageError("local image path contains a NUL byte")
    if ".." in Path(raw_path).parts:
        raise ImageError("local image path must not contain '..'")
    root = Path(os.path.realpath(options.local_files_dir))
    candidate = Path(raw_path) if os.path.isabs(raw_path) else root / raw_path
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root):
        raise ImageError(f"local image path is outside the allowed directory {str(root)!r}")
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ImageError("local image file not found") from None
    except OSError as exc:
        raise ImageError(f"local image file could not be opened ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # directories, FIFOs, devices (/dev/zero)
        os.close(fd)
        raise ImageError("local image path is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > options.max_image_bytes:
            raise ImageError(
                f"image is {info.st_size} bytes, more than the limit of {options.max_image_bytes} bytes"
            )
        data = f.read(options.max_image_bytes + 1)
    if len(data) > options.max_image_bytes:
        raise ImageError(f"image is larger than the limit of {options.max_image_bytes} bytes")
    return data
