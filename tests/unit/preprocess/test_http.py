"""http(s) images: off by default; allow-list, SSRF refusal after DNS, redirects, caps, timeouts.

A real `http.server` on 127.0.0.1 serves the bytes; loopback is reachable only because these
tests exempt 127.0.0.0/8 explicitly (`http_allowed_networks`). DNS is replaced by a resolver
callable, so a "public" host name can be pointed at any address.
"""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cogvlm_ray.errors import ImageError
from cogvlm_ray.preprocess import http_fetch
from cogvlm_ray.preprocess.http_fetch import address_is_allowed, fetch_http_image, host_is_allowed
from cogvlm_ray.preprocess.options import PreprocessOptions
from tests.unit.preprocess.conftest import encode_image, noise_image

PNG = encode_image(noise_image(9, 7), "PNG")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        # The client may give up first (timeouts, byte caps).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._respond()

    def _respond(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {"Content-Length": str(len(PNG))}, PNG),
            "/big": (200, {"Content-Length": "999999999"}, b""),
            "/missing": (404, {}, b"nope"),
            "/to-img": (302, {"Location": "/img.png"}, b""),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/to-evil": (302, {"Location": f"http://evil.test:{port}/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        if self.path == "/chunked":  # no Content-Length: the cap is enforced while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PNG * 50)
            return
        if self.path == "/slow":
            time.sleep(1.0)
        status, headers, body = routes.get(self.path, (200, {}, PNG))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


LOCAL = _resolver({"images.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"]})


def _opts(**kw) -> PreprocessOptions:
    base = dict(
        allow_http=True,
        http_allowed_hosts=("images.test",),
        http_allowed_networks=("127.0.0.0/8",),
        http_read_timeout_s=0.3,
        max_image_bytes=len(PNG) * 10,
    )
    base.update(kw)
    return PreprocessOptions(**base)


def test_disabled_by_default(server):
    with pytest.raises(ImageError, match="disabled"):
        fetch_http_image(f"http://images.test:{server}/img.png", PreprocessOptions(), resolver=LOCAL)


def test_fetch_from_allowed_host(server):
    assert fetch_http_image(f"http://images.test:{server}/img.png", _opts(), resolver=LOCAL) == PNG


def test_same_host_redirect_is_followed(server):
    assert fetch_http_image(f"http://images.test:{server}/to-img", _opts(), resolver=LOCAL) == PNG


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/to-evil", "'evil.test' is not in the allow-list"),
        ("/to-metadata", "'169.254.169.254' is not in the allow-list"),
        ("/loop", "redirected more than 3 times"),
        ("/missing", "HTTP 404"),
        ("/big", "999999999 bytes, more than the limit"),
        ("/chunked", "exceeds the limit"),
        ("/slow", "timed out"),
    ],
)
def test_refusals_from_a_real_server(server, path, message):
    with pytest.raises(ImageError, match=message):
        fetch_http_image(f"http://images.test:{server}{path}", _opts(), resolver=LOCAL)


def test_redirect_to_metadata_refused_even_with_wildcard_allow_list(server):
    resolver = _resolver({"images.test": ["127.0.0.1"], "169.254.169.254": ["169.254.169.254"]})
    with pytest.raises(ImageError, match="resolves to 169.254.169.254"):
        fetch_http_image(
            f"http://images.test:{server}/to-metadata", _opts(http_allowed_hosts=("*",)), resolver=resolver
        )


def test_loopback_refused_without_explicit_exemption(server):
    with pytest.raises(ImageError, match="resolves to 127.0.0.1"):
        fetch_http_image(
            f"http://images.test:{server}/img.png", _opts(http_allowed_networks=()), resolver=LOCAL
        )


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not address_is_allowed(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert address_is_allowed(address)


def test_dns_answer_with_any_private_address_is_refused():
    resolver = _resolver({"images.test": ["93.184.216.34", "10.0.0.7"]})
    with pytest.raises(ImageError, match="resolves to 10.0.0.7"):
        fetch_http_image("https://images.test/a.png", _opts(http_allowed_networks=()), resolver=resolver)


def test_system_resolver_is_used_by_default(monkeypatch):
    monkeypatch.setattr(http_fetch, "resolve_host", lambda host, port: ["169.254.169.254"])
    with pytest.raises(ImageError, match="resolves to 169.254.169.254"):
        fetch_http_image("http://images.test/latest/meta-data", _opts(http_allowed_networks=()))


def test_host_allow_list_matching():
    assert host_is_allowed("cdn.example.com", ("*.example.com",))
    assert not host_is_allowed("example.com", ("*.example.com",))
    assert not host_is_allowed("evilexample.com", ("*.example.com",))
    assert host_is_allowed("Example.COM.", ("example.com",))
    assert not host_is_allowed("example.com", ())
    assert host_is_allowed("anything.test", ("*",))


def test_https_with_untrusted_certificate_is_refused(tmp_path):
    """A real TLS handshake (SNI = URL host) against a self-signed server: verification fails."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a throwaway certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=images.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://images.test:{httpd.server_address[1]}/img.png"
        with pytest.raises(
            ImageError, match="TLS error.*CERTIFICATE_VERIFY_FAILED|TLS error.*certificate verify failed"
        ):
            fetch_http_image(url, _opts(), resolver=LOCAL)
    finally:
        httpd.shutdown()
        httpd.server_close()
