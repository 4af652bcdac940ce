"""Chat page helpers shared by the browser tests: the page's session, sending a prompt, waiting for the answer."""

from __future__ import annotations

from playwright.sync_api import Page, expect


def session_id(page: Page) -> str | None:
    """Return the session id the page keeps in localStorage."""
    return page.evaluate("() => localStorage.getItem('vlgate.session_id')")


def send(page: Page, prompt: str) -> None:
    """Type a prompt and press Enter, as a user does."""
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_until_answered(page: Page) -> None:
    """Wait until the newest answer is finished and the page is ready for the next message."""
    expect(page.locator(".message.assistant").last).not_to_have_attribute("data-status", "streaming")
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator("#prompt")).to_be_enabled()
