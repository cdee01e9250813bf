"""PreprocessOptions: the knobs of the preprocessing replica, with safe defaults.

Everything that widens the attack surface (fetching http(s) URLs, reading local files) is
off by default and must be switched on explicitly, together with its limits.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Formats Pillow may use to open a request image. Restricting the set keeps rarely used,
#: less hardened decoders (e.g. EPS, which would call Ghostscript) out of reach.
DEFAULT_IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class PreprocessOptions:
    """Limits and opt-in features of image loading and prompt building."""

    max_image_bytes: int = 20 * 1024 * 1024
    """Cap on the encoded image (after base64 decoding / download / file read)."""
    max_image_pixels: int = 40_000_000
    """Cap on width * height read from the image header, checked before decoding (bombs).
    Pillow itself refuses anything above 2 * Image.MAX_IMAGE_PIXELS (179 M) regardless."""
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    """Pillow format names accepted; the bytes decide the format, never the media type."""
    image_cache_size: int = 8
    """Decoded images kept by content hash of the encoded bytes (clients resend the same
    image every turn). 0 disables the cache."""

    allow_http: bool = False
    """Fetch http(s) image URLs. Off by default: clients should send data: URLs."""
    http_allowed_hosts: tuple[str, ...] = ()
    """Host allow-list for http(s): `example.com` (exact), `*.example.com` (subdomains only),
    or `*` (any host). Empty means no host is allowed even when `allow_http` is on."""
    http_allowed_networks: tuple[str, ...] = ()
    """CIDRs exempt from the private/loopback/link-local refusal (e.g. an internal image store).
    Empty by default: only globally routable addresses may be fetched."""
    http_connect_timeout_s: float = 3.0
    http_read_timeout_s: float = 10.0
    """Per socket operation."""
    http_total_timeout_s: float = 20.0
    """Wall-clock budget for one image download including redirects (slow-drip defence)."""
    http_max_redirects: int = 3
    """Each redirect target is checked like the original URL (scheme, allow-list, addresses)."""

    allow_local_files: bool = False
    """Accept `file://` URLs and plain paths. Off by default."""
    local_files_dir: str | None = None
    """The one directory local files must resolve into (after following symlinks)."""

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("max_image_bytes and max_image_pixels must be positive")
        if self.image_cache_size < 0:
            raise ValueError("image_cache_size must be >= 0")
        if self.http_max_redirects < 0:
            raise ValueError("http_max_redirects must be >= 0")
        if min(self.http_connect_timeout_s, self.http_read_timeout_s, self.http_total_timeout_s) <= 0:
            raise ValueError("http timeouts must be positive")
        if self.allow_local_files and not self.local_files_dir:
            raise ValueError("allow_local_files needs local_files_dir")
