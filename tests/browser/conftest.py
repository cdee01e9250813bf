"""Fixtures for driving the playground in headless Chromium (Debian's `chromium` + Playwright for Python).

Playwright's own browser download is never used: we launch the system Chromium at
`/usr/bin/chromium`, and every test here skips with a clear reason when it or the `playwright`
package is missing. Screenshots go to `artifacts/` (gitignored) so CI can keep them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw

from cogvlm_ray.serve.ports import free_port

CHROMIUM_PATH = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACT_DIR = Path(__file__).resolve().parents[2] / "artifacts"
SERVER_START_TIMEOUT_S = 20.0
EXPECT_TIMEOUT_MS = 30_000
PLAYWRIGHT_MISSING = "playwright is not installed: pip install playwright (never `playwright install`)"


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per module; tests open their own pages. Module scope on purpose:
    Playwright's sync API keeps an asyncio loop marked running on the main thread while it is
    open, and Ray Serve's sync handle calls in later suites refuse to run under it."""
    if not CHROMIUM_PATH.exists():
        pytest.skip(f"{CHROMIUM_PATH} not found: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
    # Generous waits: CI has 2 cores shared with Ray workers; a wait only lasts until its condition holds.
    sync_api.expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM_PATH), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page at a desktop size; JS console errors fail the test (an uncaught error is a bug)."""
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    page = context.new_page()
    page.set_default_timeout(EXPECT_TIMEOUT_MS)
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    yield page
    context.close()
    assert not page_errors, f"uncaught errors in the page: {page_errors}"


@pytest.fixture(scope="session")
def artifact_dir() -> Path:
    ARTIFACT_DIR.mkdir(exist_ok=True)
    return ARTIFACT_DIR


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1:<free port> in a daemon thread; yields the base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-playground", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_test_png(path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    """A small recognisable PNG: sky, ground, a sun and a house (drawn on a 96x64 grid, scaled)."""
    width, height = size
    sx, sy = width / 96, height / 64

    def box(*xy: float) -> list[tuple[float, float]]:
        return [(x * sx, y * sy) for x, y in zip(xy[::2], xy[1::2], strict=True)]

    image = Image.new("RGB", size, (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle(box(0, 43, 96, 64), fill=(90, 160, 80))
    draw.ellipse(box(66, 6, 86, 26), fill=(250, 210, 60))
    draw.rectangle(box(16, 28, 40, 48), fill=(190, 80, 60))
    draw.polygon(box(12, 28, 28, 14, 44, 28), fill=(120, 50, 40))
    image.save(path, format="PNG")
    return path
