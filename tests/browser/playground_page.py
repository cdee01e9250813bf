"""Page object for the playground: what a user does, as methods, so tests read as a session.

Selectors are the page's `data-testid` attributes. Waits go through Playwright's auto-waiting and
the page's own `body[data-busy]` flag, never fixed sleeps.
"""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Locator, Page, expect


class PlaygroundPage:
    def __init__(self, page: Page) -> None:
        self.page = page

    def open(self, base_url: str) -> PlaygroundPage:
        self.page.goto(base_url + "/")
        expect(self.page.locator("body")).to_have_attribute("data-ready", "true")
        return self

    def by_id(self, test_id: str) -> Locator:
        return self.page.get_by_test_id(test_id)

    # ------------------------------------------------------------ inputs

    def pick_file(self, path: Path) -> None:
        self.by_id("file-input").set_input_files(str(path))
        expect(self.by_id("image-name")).to_contain_text(path.name)

    def set_sampling(self, *, temperature: float, max_tokens: int) -> None:
        self.by_id("temperature").fill(str(temperature))
        self.by_id("max-tokens").fill(str(max_tokens))

    def set_api_key(self, key: str) -> None:
        self.by_id("api-key").fill(key)
        self.by_id("api-key").press("Tab")  # "change" fires on blur

    def ask(self, question: str) -> None:
        """Types the question and presses Enter; returns once the turn has started."""
        num_before = self.assistant_items().count() + self.errors().count()
        self.by_id("question").fill(question)
        self.by_id("question").press("Enter")
        expect(self.page.locator("#transcript > li.assistant")).to_have_count(num_before + 1)

    def new_chat(self) -> None:
        self.by_id("new-chat").click()
        expect(self.by_id("transcript").locator("li")).to_have_count(0)

    def stop(self) -> None:
        self.by_id("stop").click()

    # ------------------------------------------------------------ outputs

    def assistant_items(self) -> Locator:
        """Finished or streaming answers (error turns excluded)."""
        return self.page.locator("#transcript > li.assistant:not(.error)")

    def errors(self) -> Locator:
        return self.page.locator("#transcript > li.error")

    def wait_idle(self) -> None:
        expect(self.page.locator("body")).to_have_attribute("data-busy", "false")

    def last_answer(self) -> tuple[str, str]:
        """(text, stats line) of the last answer, once it has finished streaming."""
        self.wait_idle()
        item = self.assistant_items().last
        expect(item).not_to_have_class("streaming")
        return item.locator(".bubble").inner_text(), item.locator(".meta").inner_text()

    def last_error(self) -> str:
        self.wait_idle()
        return self.errors().last.locator(".bubble").inner_text()

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path), full_page=True)
        return path

    # ------------------------------------------------------------ streaming evidence

    def record_streaming(self) -> None:
        """Start recording every text the streaming answer shows (no timing involved)."""
        self.page.evaluate(
            """() => {
                window.__streamed = [];
                const transcript = document.getElementById("transcript");
                new MutationObserver(() => {
                    const bubble = transcript.querySelector("li.assistant.streaming .bubble");
                    if (bubble && bubble.textContent) window.__streamed.push(bubble.textContent);
                }).observe(transcript, { subtree: true, childList: true, characterData: true });
            }"""
        )

    def streamed_texts(self) -> list[str]:
        """Distinct texts shown while an answer was still streaming, in order."""
        texts = self.page.evaluate("() => window.__streamed")
        return list(dict.fromkeys(texts))
