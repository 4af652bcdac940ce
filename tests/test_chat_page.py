"""The chat page's conversations, phone layout, honest status, photos, reloads and language, in a real Chromium.

Against a live stack (gunicorn + a Celery demo worker + Redis + SQLite, devtools/live.py), driven by Playwright
through Debian's /usr/bin/chromium. Set ``VLGATE_UPDATE_SCREENSHOT=1`` to refresh docs/chat-page-phone.png.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, expect
from sqlalchemy.orm import Session

from common.ids import new_id, utcnow
from common.models import ChatSession, Message
from devtools import live
from devtools.databases import make_image
from devtools.live import Stack
from tests.pagefixtures import send, session_id, wait_until_answered

pytestmark = pytest.mark.slow

TIMEOUT_MS = 20_000
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
PHONE_SHOT = Path(__file__).resolve().parent.parent / "docs" / "chat-page-phone.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """The whole service on SQLite with one demo worker."""
    with live.running_stack("sqlite", tmp_path_factory.mktemp("stack-chat-page"), data_dir, "w-chat") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with live.chromium() as chromium:
        yield chromium


def open_page(browser: Browser, stack: Stack, problems: list[str], viewport: dict, **options: object) -> Page:
    """A fresh profile on the chat page; script errors and CSP violations are collected in `problems`."""
    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=viewport, color_scheme="light", **options)
    tab = context.new_page()
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    tab.goto(f"{stack.base}/")
    return tab


@pytest.fixture
def problems() -> Iterator[list[str]]:
    found: list[str] = []
    yield found
    assert found == []


@pytest.fixture
def page(browser: Browser, stack: Stack, problems: list[str]) -> Iterator[Page]:
    """A desktop-sized page in English."""
    tab = open_page(browser, stack, problems, DESKTOP, locale="en-US")
    yield tab
    tab.context.close()





def short(page: Page) -> None:
    """Shortest answers: max length at its minimum."""
    page.focus("#max-tokens")
    page.keyboard.press("Home")


def test_new_chat_keeps_the_old_one_and_the_list_renames_switches_and_deletes(page: Page, stack: Stack) -> None:
    items = page.locator("#chat-list .chat-item")
    expect(page.locator("#chat-list")).to_contain_text("No chats yet")
    short(page)
    send(page, "First question about cats")
    wait_until_answered(page)
    first = session_id(page)
    expect(items).to_have_count(1)
    expect(items.first).to_have_attribute("aria-current", "true")

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    assert session_id(page) is None
    send(page, "Second question about dogs")
    wait_until_answered(page)
    second = session_id(page)
    assert second and second != first
    expect(items.locator(".chat-open")).to_have_text(["Second question about dogs", "First question about cats"])

    # Switching loads the other conversation from the server.
    items.nth(1).locator(".chat-open").click()
    expect(page.locator(".message.user .bubble")).to_have_text(["First question about cats"])
    assert session_id(page) == first
    expect(items.nth(1)).to_have_attribute("aria-current", "true")

    # Rename in place; the name survives a reload, as does the open conversation.
    items.nth(1).locator(".chat-rename").click()
    page.fill(".chat-title-input", "Cats")
    page.press(".chat-title-input", "Enter")
    page.reload()
    expect(items.locator(".chat-open")).to_have_text(["Second question about dogs", "Cats"])
    expect(page.locator(".message.user .bubble")).to_have_text(["First question about cats"])

    # Delete asks first; Cancel keeps it, Delete removes it on the server too.
    items.first.locator(".chat-delete").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Second question about dogs")
    page.click("#confirm-cancel")
    expect(items).to_have_count(2)
    assert requests.get(f"{stack.base}/api/sessions/{second}", timeout=10).ok
    items.first.locator(".chat-delete").click()
    page.click("#confirm-delete")
    expect(items).to_have_count(1)
    assert requests.get(f"{stack.base}/api/sessions/{second}", timeout=10).status_code == 404
    assert requests.get(f"{stack.base}/api/sessions/{first}", timeout=10).ok
    expect(page.locator(".message.user .bubble")).to_have_text(["First question about cats"])  # not the open one


def no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"the page is {width} px wide"


def in_view(page: Page, selector: str) -> None:
    box = page.locator(selector).bounding_box()
    size = page.viewport_size
    assert box and box["x"] >= 0 and box["y"] >= 0, (selector, box)
    assert box["x"] + box["width"] <= size["width"] and box["y"] + box["height"] <= size["height"], (selector, box)


def test_phone_layout_has_a_drawer_and_a_tappable_send(browser: Browser, stack: Stack, problems: list[str],
                                                       tmp_path: Path) -> None:
    page = open_page(browser, stack, problems, PHONE, locale="en-US", is_mobile=True, has_touch=True,
                     device_scale_factor=2)
    try:
        expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
        banner = page.locator("#demo-banner")
        expect(banner).to_be_visible()
        assert banner.bounding_box()["height"] < 70
        no_horizontal_scroll(page)
        expect(page.locator("#sidebar")).not_to_be_visible()
        for selector in ("#send-button", "#attach-button", "#prompt", "#menu-button"):
            in_view(page, selector)
        # The attach button is in the input row.
        row = [page.locator(s).bounding_box() for s in ("#attach-button", "#prompt", "#send-button")]
        assert abs(row[0]["y"] + row[0]["height"] - row[2]["y"] - row[2]["height"]) < 2

        # The panel opens as a drawer and closes on the scrim.
        page.tap("#menu-button")
        expect(page.locator("#sidebar")).to_be_visible()
        page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left === 0")
        in_view(page, "#new-chat")
        no_horizontal_scroll(page)
        short(page)  # the sliders are in the drawer
        page.tap("#drawer-close")
        expect(page.locator("#sidebar")).not_to_be_visible()

        page.fill("#prompt", "Hello from a phone")
        page.tap("#send-button")
        wait_until_answered(page)
        no_horizontal_scroll(page)
        in_view(page, "#send-button")
        shot = tmp_path / "phone.png"
        page.screenshot(path=str(shot))
        if os.environ.get("VLGATE_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, PHONE_SHOT)

        page.click("#banner-close")
        expect(banner).to_be_hidden()
        page.reload()
        expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
        expect(banner).to_be_hidden()  # dismissed stays dismissed
    finally:
        page.context.close()


def test_desktop_layout_keeps_the_panel(page: Page) -> None:
    expect(page.locator("#sidebar")).to_be_visible()
    expect(page.locator("#menu-button")).to_be_hidden()
    no_horizontal_scroll(page)
    for selector in ("#send-button", "#attach-button", "#new-chat"):
        in_view(page, selector)
    # The hidden file input is not a Tab stop: Tab from the image button goes on to the sliders.
    page.focus("#choose-image")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "temperature"
    assert page.get_attribute("#temperature", "max") == "2"


def big_photo() -> bytes:
    """A 4000x3000 JPEG over 12 MB (noise compresses worst, like a detailed phone photo at full quality)."""
    pixels = Image.frombytes("RGB", (4000, 3000), os.urandom(4000 * 3000 * 3))
    out = io.BytesIO()
    pixels.save(out, "JPEG", quality=95)
    assert out.tell() > 12 * 1024 * 1024
    return out.getvalue()


def test_a_12_mb_photo_is_shrunk_in_the_browser_and_answered(page: Page, stack: Stack) -> None:
    short(page)
    page.set_input_files("#image-input", files=[{"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": big_photo()}])
    note = page.locator("#preview-note")
    expect(note).to_contain_text("Shrunk in the browser from 4000×3000, 1")
    expect(page.locator("#image-error")).to_be_hidden()
    size = float(page.locator("#preview-name").inner_text().split("·")[1].split("MB")[0])
    assert size <= 3.0
    send(page, "What is in this photo?")
    wait_until_answered(page)
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "done")
    stored = requests.get(f"{stack.base}/api/sessions/{session_id(page)}", timeout=10).json()["messages"]
    assert len(stored[0]["image_ids"]) == 1
    image = Image.open(io.BytesIO(requests.get(f"{stack.base}/api/images/{stored[0]['image_ids'][0]}",
                                               timeout=10).content))
    assert max(image.size) <= 2048


def test_an_image_alone_is_sent_with_a_stated_default_prompt_and_typing_goes_on_while_streaming(page: Page) -> None:
    short(page)
    page.set_input_files("#image-input", files=[
        {"name": "red.png", "mimeType": "image/png", "buffer": make_image((64, 48), (200, 60, 40))}])
    expect(page.locator("#preview")).to_be_visible()
    page.focus("#max-tokens")
    page.keyboard.press("End")
    page.click("#send-button")
    expect(page.locator(".message.user .bubble")).to_have_text("Describe this image.")
    expect(page.locator(".message.user .meta")).to_contain_text("No question given")
    expect(page.locator("#stop-button")).to_be_visible()
    page.fill("#prompt", "Next question, typed while it streams")  # the input is usable meanwhile
    page.press("#prompt", "Enter")  # does not send over a running answer
    expect(page.locator(".message.user")).to_have_count(1)
    page.click("#stop-button")
    wait_until_answered(page)
    expect(page.locator("#prompt")).to_have_value("Next question, typed while it streams")


AT_BOTTOM = "() => { const c = document.getElementById('conversation'); return c.scrollHeight > c.clientHeight" \
            " && c.scrollHeight - c.scrollTop - c.clientHeight < 5; }"


def test_reload_keeps_the_stop_note_the_scroll_and_the_sliders(page: Page) -> None:
    page.focus("#temperature")
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.focus("#max-tokens")
    page.keyboard.press("End")
    expect(page.locator("#temperature-value")).to_have_text("0.8")
    send(page, "Tell me a very long story.")
    page.wait_for_function("() => document.querySelector('.message.assistant .answer').textContent.length > 1500")
    page.click("#stop-button")
    wait_until_answered(page)
    meta = page.locator(".message.assistant .meta")
    expect(meta).to_contain_text("Stopped · ")
    stopped = meta.inner_text()
    page.wait_for_function(AT_BOTTOM)

    page.reload()
    expect(page.locator(".message.assistant .meta")).to_have_text(stopped)
    page.wait_for_function(AT_BOTTOM)
    expect(page.locator("#temperature-value")).to_have_text("0.8")
    expect(page.locator("#max-tokens-value")).to_have_text("2048")
    assert page.input_value("#temperature") == "0.8"


def test_language_follows_the_browser_switches_and_is_remembered(browser: Browser, stack: Stack,
                                                                 problems: list[str]) -> None:
    page = open_page(browser, stack, problems, DESKTOP, locale="zh-CN")
    try:
        assert page.evaluate("() => document.documentElement.lang") == "zh-CN"
        expect(page.locator("#send-button")).to_have_text("发送")
        expect(page.locator("#new-chat")).to_have_text("新对话")
        expect(page.locator("#status-text")).to_have_text("就绪")
        page.click("#settings-button")
        page.select_option("#language", "en")
        assert page.evaluate("() => document.documentElement.lang") == "en"
        expect(page.locator("#send-button")).to_have_text("Send")
        expect(page.locator("#status-text")).to_have_text("Ready")
        assert "Enter sends" in page.get_attribute("#prompt", "placeholder")
        page.reload()
        expect(page.locator("#send-button")).to_have_text("Send")
        expect(page.locator("#stop-button")).to_have_text("Stop")
        expect(page.locator("#page-title")).to_contain_text("demo")  # the model really loaded, not a brand name
        assert "demo" in page.title()
    finally:
        page.context.close()


CODE_ANSWER = "Here:\n\n```python\ndef greet(name):\n    return 'hi ' + name\n```\n"


def test_copy_highlighted_code_and_messages(browser: Browser, stack: Stack, problems: list[str]) -> None:
    sid = new_id("sess")
    now = utcnow()
    with Session(stack.db) as db:
        db.add(ChatSession(id=sid, created_at=now, updated_at=now))
        db.add(Message(session_id=sid, role="user", text="Show me Python", created_at=now))
        db.add(Message(session_id=sid, role="assistant", text=CODE_ANSWER, created_at=now))
        db.commit()
    page = open_page(browser, stack, problems, DESKTOP, locale="en-US",
                     permissions=["clipboard-read", "clipboard-write"])
    try:
        page.evaluate("sid => localStorage.setItem('vlgate.session_id', sid)", sid)
        page.reload()
        code = page.locator(".answer pre code")
        expect(code).to_have_class("language-python hljs")  # highlighted by the vendored highlight.js
        expect(code.locator(".hljs-keyword").first).to_have_text("def")
        page.click(".answer pre .action")
        assert page.evaluate("() => navigator.clipboard.readText()") == "def greet(name):\n    return 'hi ' + name\n"
        page.click(".message.assistant .actions [data-action=copy]")
        assert page.evaluate("() => navigator.clipboard.readText()") == CODE_ANSWER
        page.click(".message.user .actions [data-action=copy]")
        assert page.evaluate("() => navigator.clipboard.readText()") == "Show me Python"
    finally:
        page.context.close()


def stored(stack: Stack, sid: str | None) -> list[dict]:
    return requests.get(f"{stack.base}/api/sessions/{sid}", timeout=10).json()["messages"]


def test_regenerate_and_edit_and_resend_branch_the_conversation(page: Page, stack: Stack) -> None:
    short(page)
    page.set_input_files("#image-input", files=[
        {"name": "red.png", "mimeType": "image/png", "buffer": make_image((64, 48), (200, 60, 40))}])
    send(page, "Question one")
    wait_until_answered(page)
    send(page, "Question two")
    wait_until_answered(page)
    original = session_id(page)
    titles = page.locator("#chat-list .chat-open")

    # Enlarge the image, and close it with a click.
    page.click(".message-images img")
    expect(page.locator("#image-dialog")).to_be_visible()
    assert page.get_attribute("#image-large", "src") == page.get_attribute(".message-images img", "src")
    page.click("#image-large")
    expect(page.locator("#image-dialog")).to_be_hidden()

    # Regenerate the last answer: a branch with the first turn copied and the last question asked again.
    page.locator(".message.assistant").last.locator("[data-action=regenerate]").click()
    expect(titles).to_have_text(["Question one (branch)", "Question one"])
    expect(page.locator(".message.user .bubble")).to_have_text(["Question one", "Question two"])
    wait_until_answered(page)
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "done")
    branch = session_id(page)
    assert branch != original
    was, now = stored(stack, original), stored(stack, branch)
    assert len(was) == len(now) == 4
    assert was[:2] == now[:2] and now[2]["text"] == "Question two" and now[3]["job_id"] != was[3]["job_id"]

    # Edit the first question and resend it: a new conversation from there, with the question's image.
    page.locator(".message.user").first.locator("[data-action=edit]").click()
    page.fill(".editor textarea", "Question one, edited")
    page.click(".editor .primary")
    expect(page.locator(".message.user .bubble")).to_have_text(["Question one, edited"])
    wait_until_answered(page)
    edited = stored(stack, session_id(page))
    assert [m["text"] for m in edited][:1] == ["Question one, edited"] and len(edited) == 2
    assert edited[0]["image_ids"] == was[0]["image_ids"]  # the same picture (stored once per tenant)
    expect(titles).to_have_text(["Question one, edited", "Question one (branch)", "Question one"])
    assert len(stored(stack, original)) == 4  # the original is untouched


def test_a_frozen_worker_is_shown_as_lost_with_the_jobs_state(page: Page, stack: Stack) -> None:
    """kill -STOP the worker mid-answer: within a couple of heartbeats the page says so, never just spins."""
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    page.focus("#max-tokens")
    page.keyboard.press("End")
    send(page, "Tell me a very long story.")
    page.wait_for_function("() => document.querySelector('.message.assistant .answer').textContent.length > 20"
                           " && !document.querySelector('.message.assistant .thinking')")
    worker = stack.workers[0].proc.pid
    started = time.monotonic()
    os.killpg(worker, signal.SIGSTOP)
    try:
        # The liveness mark lapses after 5 s; the page polls /api/health every 3 s.
        expect(page.locator("#status-text")).to_have_text("Worker lost", timeout=15_000)
        expect(page.locator("#status-light")).to_have_attribute("data-state", "error")
        note = page.locator(".message.assistant .turn-note")
        expect(note).to_contain_text("Worker lost")
        expect(note).to_contain_text("job running")
        assert time.monotonic() - started < 15
        expect(page.locator("#stop-button")).to_be_enabled()
    finally:
        os.killpg(worker, signal.SIGCONT)
    # The worker is back: the answer goes on (the note goes away with the next token) and can be stopped.
    expect(note).to_have_count(0, timeout=30_000)
    page.click("#stop-button")
    wait_until_answered(page)
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready", timeout=30_000)


def test_a_silent_answer_gets_a_visible_timeout_with_the_jobs_state(browser: Browser, stack: Stack,
                                                                    problems: list[str]) -> None:
    """No event for 30 s (the page's clock is wound on) while the worker still looks alive: a note, not a spinner."""
    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport=DESKTOP, locale="en-US")
    page = context.new_page()
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.clock.install()
    page.goto(f"{stack.base}/")
    try:
        expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
        page.route("**/api/health", lambda route: route.abort())  # no "worker lost" from the light in this test
        worker = stack.workers[0].proc.pid
        os.killpg(worker, signal.SIGSTOP)  # accepted, then nothing more arrives
        try:
            send(page, "Anyone there?")
            expect(page.locator(".message.assistant")).to_have_attribute("data-job-id", re.compile("^job_"))
            page.clock.fast_forward("00:40")
            note = page.locator(".message.assistant .turn-note")
            expect(note).to_contain_text("No reply for")
            expect(note).to_contain_text("job queued")
            expect(page.locator("#stop-button")).to_be_enabled()
        finally:
            os.killpg(worker, signal.SIGCONT)
        page.click("#stop-button")
        expect(page.locator(".message.assistant")).to_have_attribute("data-status", "cancelled")
    finally:
        context.close()


def test_fork_endpoint_copies_a_prefix_and_refuses_bad_cuts(stack: Stack) -> None:
    first = requests.post(f"{stack.base}/api/chat", json={"prompt": "One", "max_tokens": 8}, timeout=60).json()
    sid = first["session_id"]
    requests.post(f"{stack.base}/api/chat", json={"prompt": "Two", "max_tokens": 8, "session_id": sid}, timeout=60)
    fork = f"{stack.base}/api/sessions/{sid}/fork"
    whole = requests.post(fork, timeout=10)
    assert whole.status_code == 201 and whole.json()["session_id"] != sid
    assert whole.json()["messages"] == stored(stack, sid)
    part = requests.post(fork, json={"before": 2}, timeout=10).json()
    assert [m["text"] for m in part["messages"]] == ["One", stored(stack, sid)[1]["text"]]
    for body, words in (({"before": 9}, "past the conversation"), ({"before": 1}, "question without its answer"),
                        ({"before": -1}, "before"), ({"before": "x"}, "before"), ({"after": 1}, "after")):
        refused = requests.post(fork, json=body, timeout=10)
        assert refused.status_code == 400, body
        assert refused.json()["error"]["code"] == "invalid_request" and words in refused.json()["error"]["message"]
    missing = requests.post(f"{stack.base}/api/sessions/sess_nope/fork", json={"before": 0}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
