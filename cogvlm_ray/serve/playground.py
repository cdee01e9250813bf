"""The built-in playground: one static page at `/` that talks to our own `/v1/chat/completions`.

Owns: serving `static/index.html`, its stylesheet and script, and `GET /playground/config.json`
(which tells the page whether to ask for an API key). It does not own the API: the page is a
plain OpenAI client of the same app, so it needs no routes of its own beyond its files, and the
API key middleware (which guards only `/v1/*`) leaves these routes open.

The files are read once, when `mount_playground` runs (never at import), and served from memory
with a strict Content-Security-Policy: no inline script, no third-party origin, images only from
the page itself or `data:`/`blob:` URLs (the picked image is previewed as a blob and sent as a
data URL).
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

PAGE_PATH = "/"
CONFIG_PATH = "/playground/config.json"
ASSET_PREFIX = "/playground/"

# name in static/ -> media type. The page references the assets as /playground/<name>.
ASSETS: dict[str, str] = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Applied to every playground response; the page is small, so no-cache costs nothing and means a
# redeploy never serves a stale script next to a new page.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_static(name: str) -> bytes:
    """Bytes of one file shipped in `cogvlm_ray/serve/static/`."""
    return resources.files("cogvlm_ray.serve").joinpath("static", name).read_bytes()


def mount_playground(app: FastAPI, *, require_api_key: bool) -> None:
    """Serve the playground page at `GET /` on `app`.

    `require_api_key` is published at `GET /playground/config.json` as `{"require_api_key": bool}`;
    when true the page shows an API key field and sends `Authorization: Bearer <key>` on its
    `/v1/*` calls. The key itself never reaches this module.
    """
    page = read_static("index.html")
    assets = {name: (read_static(name), media_type) for name, media_type in ASSETS.items()}
    config = {"require_api_key": require_api_key}

    async def get_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def get_config() -> JSONResponse:
        return JSONResponse(config, headers=SECURITY_HEADERS)

    app.add_api_route(PAGE_PATH, get_page, methods=["GET"], include_in_schema=False)
    app.add_api_route(CONFIG_PATH, get_config, methods=["GET"], include_in_schema=False)
    for name, (body, media_type) in assets.items():
        app.add_api_route(
            ASSET_PREFIX + name, _asset_endpoint(body, media_type), methods=["GET"], include_in_schema=False
        )
    logger.info("playground mounted at %s (require_api_key=%s)", PAGE_PATH, require_api_key)


def _asset_endpoint(body: bytes, media_type: str):
    """One GET handler per asset, closing over its bytes (a loop variable would bind late)."""

    async def get_asset() -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return get_asset
