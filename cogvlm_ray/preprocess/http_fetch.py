"""SSRF-safe download of http(s) image URLs (opt-in).

Owns: URL checks (scheme, host allow-list), DNS resolution with refusal of every address that
is not globally routable (loopback, private, link-local incl. 169.254.169.254, CGNAT, ULA,
multicast, reserved, IPv4-mapped forms of those), connecting to the *checked* address (so a
second DNS answer cannot rebind to an internal host), TLS with SNI and certificate checks for
the original host name, timeouts, a byte cap and manual redirects re-checked hop by hop.
Built on `http.client` so that no layer follows redirects or re-resolves behind our back.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess.options import PreprocessOptions

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CHUNK = 64 * 1024
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses the system resolver returns for host (tests monkeypatch this)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageError(f"image URL host {host!r} could not be resolved ({exc})") from None
    return sorted({info[4][0] for info in infos})


def host_is_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """`example.com` matches exactly, `*.example.com` matches subdomains, `*` matches all."""
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().rstrip(".")
        if entry == "*" or entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
    return False


def address_is_allowed(address: str, exempt_networks: tuple[str, ...] = ()) -> bool:
    """True for globally routable addresses, or addresses inside an explicitly exempt network."""
    ip: _IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for cidr in exempt_networks:
        if ip in ipaddress.ip_network(cidr, strict=False):
            return True
    return ip.is_global and not ip.is_multicast


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP connection to a pre-checked IP, sending the original Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connect_timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), timeout=self._connect_timeout)
        self.sock.settimeout(self.timeout)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """HTTPS to a pre-checked IP; SNI and certificate verification use the URL's host name."""

    default_port = 443  # so the Host header omits ":443"

    def __init__(self, host: str, port: int, address: str, timeout: float, connect_timeout: float):
        super().__init__(host, port, address, timeout, connect_timeout)
        self._context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def fetch_http_image(url: str, options: PreprocessOptions, *, resolver: Resolver | None = None) -> bytes:
    """Download an image URL under every limit in `options`; each refusal is an ImageError."""
    if not options.allow_http:
        raise ImageError("http(s) image URLs are disabled on this server; send the image as a data: URL")
    resolve = resolver or resolve_host
    deadline = time.monotonic() + options.http_total_timeout_s
    current = url
    for hop in range(options.http_max_redirects + 1):
        status, location, body = _fetch_once(current, options, resolve, deadline)
        if status in _REDIRECT_CODES:
            if not location:
                raise ImageError(f"image URL redirect (HTTP {status}) without a Location header")
            current = urljoin(current, location)
            logger.debug("image URL redirect %d -> %s", hop + 1, current)
            continue
        if status != 200:
            raise ImageError(f"image URL returned HTTP {status}")
        return body
    raise ImageError(f"image URL redirected more than {options.http_max_redirects} times")


def _check_url(url: str, options: PreprocessOptions, resolve: Resolver) -> tuple[str, int, str, str, str]:
    """Validate one URL; returns (scheme, port, host, path, pinned address)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageError(f"malformed image URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme {scheme!r} is not allowed (only http and https)")
    host = parts.hostname
    if not host:
        raise ImageError("image URL has no host")
    if not host_is_allowed(host, options.http_allowed_hosts):
        raise ImageError(f"image URL host {host!r} is not in the allow-list")
    port = port or (443 if scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise ImageError(f"image URL host {host!r} did not resolve to any address")
    for address in addresses:
        if not address_is_allowed(address, options.http_allowed_networks):
            # One bad answer taints the name: attackers mix public and internal records.
            raise ImageError(
                f"image URL host {host!r} resolves to {address}, a private, loopback, link-local or "
                "otherwise non-public address; refused"
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, port, host, path, addresses[0]


def _fetch_once(
    url: str, options: PreprocessOptions, resolve: Resolver, deadline: float
) -> tuple[int, str | None, bytes]:
    scheme, port, host, path, address = _check_url(url, options, resolve)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageError(f"image download took longer than {options.http_total_timeout_s} s")
    conn_cls = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn = conn_cls(
        host,
        port,
        address,
        timeout=min(options.http_read_timeout_s, remaining),
        connect_timeout=min(options.http_connect_timeout_s, remaining),
    )
    try:
        conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "cogvlm-ray"})
        response = conn.getresponse()
        if response.status in _REDIRECT_CODES:
            return response.status, response.getheader("Location"), b""
        if response.status != 200:
            return response.status, None, b""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > options.max_image_bytes:
            raise ImageError(
                f"image URL body is {int(length)} bytes, more than the limit of {options.max_image_bytes} bytes"
            )
        return 200, None, _read_capped(response, options, deadline)
    except TimeoutError:
        raise ImageError(f"image URL timed out (host {host!r})") from None
    except ssl.SSLError as exc:
        raise ImageError(f"image URL TLS error ({exc.reason or exc})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ImageError(f"image URL could not be fetched ({type(exc).__name__}: {exc})") from None
    finally:
        conn.close()


def _read_capped(response: http.client.HTTPResponse, options: PreprocessOptions, deadline: float) -> bytes:
    chunks: list[bytes] = []
    num_bytes = 0
    while True:
        if time.monotonic() > deadline:
            raise ImageError(f"image download took longer than {options.http_total_timeout_s} s")
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        num_bytes += len(chunk)
        if num_bytes > options.max_image_bytes:
            raise ImageError(f"image URL body exceeds the limit of {options.max_image_bytes} bytes")
        chunks.append(chunk)
