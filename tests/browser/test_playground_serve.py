"""The playground in headless Chromium against the real local Ray Serve app on the tiny random model.

The full stack: page -> Serve HTTP proxy -> Ingress -> Preprocessor -> ModelServer (engine on CPU)
and back over SSE. The app is `build_app` with the integration suite's small args plus
`playground: true`, so the page is mounted by the app itself (the production wiring) and the API
key is on. The model has random weights: its answers are gibberish, so this checks that text
streams in and the conversation works, not what it says.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import PLAYWRIGHT_MISSING, make_test_png
from tests.serve_app import API_KEY

expect = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING).expect
from tests.browser.playground_page import PlaygroundPage  # noqa: E402  (needs playwright)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

MODEL_NAME = "cogvlm2-tiny"
STATS = re.compile(r"TTFT \d+ ms · \d+\.\d tok/s · \d+ tokens · finish: (stop|length)")


@pytest.fixture(scope="module")
def serve_url(serve_app) -> str:
    """The session's real app (tests/serve_app.py): playground on, API key on."""
    return serve_app.base_url


def test_user_session_on_the_real_app(page, serve_url, tmp_path, artifact_dir) -> None:
    png = make_test_png(tmp_path / "house.png", size=(384, 256))
    ui = PlaygroundPage(page).open(serve_url)

    # The app has an API key: the page asks for it, and a wrong one gets the app's 401 message.
    expect(ui.by_id("api-key-field")).to_be_visible()
    ui.pick_file(png)
    ui.set_sampling(temperature=0, max_tokens=24)
    ui.set_api_key("wrong-key")
    ui.ask("What is in this picture?")
    assert ui.last_error().startswith("401: ")
    expect(ui.page.locator("#transcript > li.user.failed")).to_have_count(1)
    ui.set_api_key(API_KEY)
    expect(ui.by_id("model-name")).to_have_text(MODEL_NAME)
    ui.new_chat()  # keeps the image

    # First turn: text appears piece by piece while the answer is streaming.
    ui.record_streaming()
    ui.ask("What is in this picture?")
    first, stats = ui.last_answer()
    assert first.strip() and STATS.fullmatch(stats), (first, stats)
    streamed = ui.streamed_texts()
    assert len(streamed) >= 2, streamed
    assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:], strict=False))

    # Follow-up about the same image: a second answer under the first.
    ui.ask("What colour is the roof?")
    second, stats = ui.last_answer()
    assert second.strip() and STATS.fullmatch(stats), (second, stats)
    assert ui.assistant_items().count() == 2
    ui.by_id("question").fill("Is there anything next to the house?")  # mid-conversation, for the picture
    ui.screenshot(artifact_dir / "playground-serve-conversation.png")
    ui.by_id("question").fill("")

    # A non-image file: the page shows exactly the message the API gives for the same request.
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image")
    ui.pick_file(not_an_image)
    ui.ask("What is this?")
    shown = ui.last_error()
    expected = api_error(serve_url, not_an_image, "What is this?")
    assert shown == f"400: {expected}", (shown, expected)
    ui.screenshot(artifact_dir / "playground-serve-error.png")

    # The app still answers after the error.
    ui.new_chat()
    ui.pick_file(png)
    ui.ask("Describe the picture.")
    text, _ = ui.last_answer()
    assert text.strip()


def api_error(base_url: str, path: Path, question: str) -> str:
    """`error.message` of the API for this file sent as the page sends it (a data URL)."""
    data_url = "data:text/plain;base64," + base64.b64encode(path.read_bytes()).decode()
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url}}]
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "stream": True},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]
