"""The playground in headless Chromium against the real ingress (`create_app`) with a scripted backend.

This pins the page to the ingress's actual wire format (its SSE chunks, usage chunk, `[DONE]`,
error bodies and mid-stream error events) without Ray or a model. The full stack runs in
`test_playground_serve.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cogvlm_ray.errors import ImageError, ServiceUnavailableError
from cogvlm_ray.serve.ingress import IngressSettings, create_app
from tests.browser.conftest import PLAYWRIGHT_MISSING, make_test_png, serve_in_thread
from tests.unit.serve.fakes import FakeBackend

expect = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING).expect
from tests.browser.playground_page import PlaygroundPage  # noqa: E402  (needs playwright)

pytestmark = pytest.mark.browser

MODEL_NAME = "cogvlm2-tiny"


@pytest.fixture
def png(tmp_path: Path) -> Path:
    return make_test_png(tmp_path / "house.png")


def test_real_ingress_streams_and_reports_errors(page, png) -> None:
    backend = FakeBackend(pieces=["A small", " red", " house."], num_prompt_tokens=12)
    app = create_app(backend, IngressSettings(served_model_names=(MODEL_NAME,), playground=True))
    with serve_in_thread(app) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        expect(ui.by_id("model-name")).to_have_text(MODEL_NAME)
        ui.pick_file(png)
        ui.set_sampling(temperature=0, max_tokens=16)
        ui.ask("What is this?")
        text, stats = ui.last_answer()
        assert text == "A small red house."
        assert stats.endswith(" · 3 tokens · finish: stop"), stats
        call = backend.calls[-1]
        assert call["sampling_params"].max_tokens == 16 and call["sampling_params"].temperature == 0
        conversation = call["conversation"]
        assert conversation.query == "What is this?" and conversation.history == []
        assert len(conversation.image_urls) == 1 and conversation.image_urls[0].startswith("data:image/png")

        # An error event after the first delta (a replica died mid-stream) is shown, not swallowed.
        backend.mid_stream_error = ServiceUnavailableError("the model replica died")
        backend.fail_after = 1
        ui.ask("Are you sure?")
        assert ui.last_error() == "the model replica died"
        assert len(backend.calls[-1]["conversation"].history) == 1  # (question, answer) of the first turn

        # An error before the first delta is a real HTTP status with the API's message.
        backend.mid_stream_error = None
        backend.error = ImageError("image could not be decoded")
        ui.ask("Are you sure?")
        assert ui.last_error() == "400: image could not be decoded"

        # After errors the conversation still goes on from the last good turn.
        backend.error = None
        ui.ask("Are you sure?")
        text, _ = ui.last_answer()
        assert text == "A small red house."
        last = backend.calls[-1]["conversation"]  # user, assistant, user
        assert last.history == [("What is this?", "A small red house.")] and last.query == "Are you sure?"


def test_real_ingress_api_key(page, png) -> None:
    backend = FakeBackend(pieces=["ok"])
    settings = IngressSettings(served_model_names=(MODEL_NAME,), api_key="sk-ingress", playground=True)
    with serve_in_thread(create_app(backend, settings)) as base_url:
        ui = PlaygroundPage(page).open(base_url)
        expect(ui.by_id("api-key-field")).to_be_visible()
        ui.set_api_key("sk-nope")
        ui.ask("Hi")
        assert ui.last_error().startswith("401: missing or invalid API key")
        ui.set_api_key("sk-ingress")
        expect(ui.by_id("model-name")).to_have_text(MODEL_NAME)
        ui.ask("Hi")
        assert ui.last_answer()[0] == "ok"
