"""The playground in headless Chromium against a fake of our API (fast, deterministic, no Ray).

What the page must do is checked here both on screen and on the wire (the fake records each request
body). `test_playground_serve.py` runs the same user session against the real Ray Serve app.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from tests.browser.conftest import PLAYWRIGHT_MISSING, make_test_png, serve_in_thread
from tests.browser.fake_api import MODEL_ID, FakeApi, create_fake_app

expect = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING).expect
from tests.browser.playground_page import PlaygroundPage  # noqa: E402  (needs playwright)

pytestmark = pytest.mark.browser

STATS = re.compile(r"TTFT \d+ ms · \d+\.\d tok/s · \d+ tokens · finish: stop")


@pytest.fixture
def png(tmp_path: Path) -> Path:
    return make_test_png(tmp_path / "house.png")


def test_image_chat_streams_follows_up_and_shows_api_errors(page, png, tmp_path, artifact_dir) -> None:
    fake = FakeApi()
    with serve_in_thread(create_fake_app(fake)) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        expect(ui.by_id("model-name")).to_have_text(MODEL_ID)
        expect(ui.by_id("api-key-field")).to_have_count(1)
        expect(ui.by_id("api-key-field")).to_be_hidden()

        ui.pick_file(png)
        expect(ui.by_id("preview")).to_be_visible()
        ui.set_sampling(temperature=0.3, max_tokens=64)

        # First turn: hold the stream after two chunks to see a partial answer on screen.
        fake.gate.clear()
        ui.record_streaming()
        ui.ask("What is in this picture?")
        streaming = ui.page.locator("#transcript > li.assistant.streaming .bubble")
        expect(streaming).to_have_text("Answer 1")
        expect(ui.by_id("stop")).to_be_visible()
        fake.gate.set()
        text, stats = ui.last_answer()
        assert text == "Answer 1 about a 96x64 image: you asked 'What is in this picture?' with 1 messages."
        assert STATS.fullmatch(stats), stats
        streamed = ui.streamed_texts()
        assert len(streamed) >= 3 and streamed[-1] == text
        assert all(later.startswith(earlier) for earlier, later in zip(streamed, streamed[1:], strict=False))
        # The count is usage.completion_tokens from the last chunk (chunks + the stop token), not a guess.
        assert f" · {len(text.split(' ')) + 1} tokens · " in stats

        first = fake.requests[-1]
        assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
        assert (first["model"], first["temperature"], first["max_tokens"]) == (MODEL_ID, 0.3, 64)
        [user] = first["messages"]
        text_part, image_part = user["content"]
        assert text_part == {"type": "text", "text": "What is in this picture?"}
        prefix = "data:image/png;base64,"
        assert image_part["image_url"]["url"].startswith(prefix)
        assert base64.b64decode(image_part["image_url"]["url"][len(prefix) :]) == png.read_bytes()

        # Follow-up: the whole history goes back, with the image only in the first user message.
        ui.ask("And the roof colour?")
        text, _ = ui.last_answer()
        assert text == "Answer 2 about a 96x64 image: you asked 'And the roof colour?' with 3 messages."
        assert fake.requests[-1]["messages"] == [
            user,
            {
                "role": "assistant",
                "content": "Answer 1 about a 96x64 image: you asked 'What is in this picture?' with 1 messages.",
            },
            {"role": "user", "content": "And the roof colour?"},
        ]
        ui.screenshot(artifact_dir / "playground-fake-conversation.png")

        # A non-image file: a new image starts a new chat, and the API's 400 message is shown.
        not_an_image = tmp_path / "notes.txt"
        not_an_image.write_text("this is not an image")
        ui.pick_file(not_an_image)
        expect(ui.page.locator("#transcript > li.notice")).to_have_text("New image: started a new chat.")
        ui.ask("What is this?")
        error = ui.last_error()
        assert error == "400: Could not decode the image: not a supported image file."
        assert fake.requests[-1]["messages"][0]["content"][1]["image_url"]["url"].startswith(
            "data:text/plain"
        )
        expect(ui.by_id("question")).to_have_value("What is this?")  # kept for an easy retry
        expect(ui.page.locator("#transcript > li.user")).to_have_class("user failed")
        ui.screenshot(artifact_dir / "playground-fake-error.png")

        # The failed turn left no trace in the history: a new chat with the PNG starts at turn 1.
        ui.new_chat()
        ui.pick_file(png)
        ui.ask("Describe it again.")
        text, _ = ui.last_answer()
        assert text.startswith("Answer 1 about a 96x64 image") and text.endswith("with 1 messages.")


def test_asks_for_the_api_key_and_shows_401(page, png) -> None:
    fake = FakeApi(api_key="sk-playground")
    with serve_in_thread(create_fake_app(fake)) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        expect(ui.by_id("api-key-field")).to_be_visible()
        expect(ui.by_id("model-name")).to_have_text("enter the API key to start")

        ui.pick_file(png)
        ui.set_api_key("sk-wrong")
        ui.ask("Hello?")
        assert ui.last_error() == "401: Incorrect API key provided."
        expect(ui.by_id("api-key")).to_be_focused()

        ui.set_api_key("sk-playground")
        expect(ui.by_id("model-name")).to_have_text(MODEL_ID)
        ui.ask("Hello?")
        text, _ = ui.last_answer()
        assert text.startswith("Answer 1 about a 96x64 image")

        # The key survives a reload in this tab, so the page does not ask again.
        ui.page.reload()
        expect(ui.by_id("api-key")).to_have_value("sk-playground")


def test_stop_keeps_the_partial_answer_in_the_conversation(page, png) -> None:
    fake = FakeApi()
    with serve_in_thread(create_fake_app(fake)) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        ui.pick_file(png)
        fake.gate.clear()
        ui.ask("Tell me everything.")
        expect(ui.page.locator("#transcript > li.assistant.streaming .bubble")).to_have_text("Answer 1")
        ui.stop()
        text, stats = ui.last_answer()
        assert text == "Answer 1"
        assert stats.endswith("finish: stopped")
        fake.gate.set()

        ui.ask("Go on.")
        ui.last_answer()
        assert fake.requests[-1]["messages"][1] == {"role": "assistant", "content": "Answer 1"}


@pytest.mark.parametrize("gesture", ["drop", "paste"])
def test_image_can_be_dropped_or_pasted(page, png, gesture: str) -> None:
    fake = FakeApi()
    with serve_in_thread(create_fake_app(fake)) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        # Build a real File in the page and deliver it the way the browser would for the gesture.
        data = ui.page.evaluate_handle(
            """([b64, name]) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const data = new DataTransfer();
                data.items.add(new File([bytes], name, { type: "image/png" }));
                return data;
            }""",
            [base64.b64encode(png.read_bytes()).decode(), png.name],
        )
        if gesture == "drop":
            ui.by_id("drop-zone").dispatch_event("dragover", {"dataTransfer": data})
            expect(ui.by_id("drop-zone")).to_have_class("dragging")
            ui.by_id("drop-zone").dispatch_event("drop", {"dataTransfer": data})
        else:
            ui.page.evaluate(
                "(data) => document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data }))", data
            )
        expect(ui.by_id("image-name")).to_contain_text(png.name)
        expect(ui.by_id("preview")).to_be_visible()
        ui.ask("What is it?")
        text, _ = ui.last_answer()
        assert text.startswith("Answer 1 about a 96x64 image")
        url = fake.requests[-1]["messages"][0]["content"][1]["image_url"]["url"]
        assert base64.b64decode(url.split(",", 1)[1]) == png.read_bytes()
