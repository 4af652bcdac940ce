"""The chat page in a real headless Chromium, against the running service (gunicorn, Celery worker, Redis, SQLite).

Debian's ``/usr/bin/chromium`` (``scripts/ensure_browser.sh``) is driven by Playwright through
``executable_path``; Playwright never downloads a browser. A missing browser fails the test rather
than skipping it, so a green run always means the page was really exercised.
Set ``VLGATE_UPDATE_SCREENSHOT=1`` to refresh ``docs/chat-page.png`` from the finished exchange.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect
from sqlalchemy.orm import Session

from common.ids import new_id, utcnow
from common.models import ChatSession, Message
from devtools import live
from devtools.databases import make_image
from devtools.live import Stack
from tests.pagefixtures import send, session_id, wait_until_answered

pytestmark = pytest.mark.slow

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "chat-page.png"
SCREENSHOT_MAX_BYTES = 200_000
XSS = "<img src=x onerror=alert(1)>"
TIMEOUT_MS = 20_000

# Runs in the page before Enter is pressed: on every animation frame, note whether «思考中…» is shown and
# how long the newest answer is, until that answer leaves the "streaming" state. Sampling per frame is
# what a user sees; sampling from Python would depend on round-trip timing instead.
RECORD_FRAMES = """() => new Promise((resolve) => {
  const frames = { sawThinking: false, lengths: [], status: null };
  const started = performance.now();
  const sample = () => {
    const answers = document.querySelectorAll('.message.assistant');
    const last = answers[answers.length - 1];
    if (last) {
      if (last.querySelector('.thinking')) frames.sawThinking = true;
      else frames.lengths.push(last.querySelector('.answer').textContent.length);
      if (last.dataset.status !== 'streaming') {
        frames.status = last.dataset.status;
        return resolve(frames);
      }
    }
    if (performance.now() - started > 60000) return resolve(frames);
    requestAnimationFrame(sample);
  };
  requestAnimationFrame(sample);
})"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """The whole service on SQLite with one demo worker."""
    with live.running_stack("sqlite", tmp_path_factory.mktemp("stack-browser"), data_dir, "w-browser") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium under Playwright (devtools/live.py)."""
    with live.chromium() as chromium:
        yield chromium


@pytest.fixture
def dialogs() -> list[str]:
    """The messages of every alert/confirm/prompt the page opened (model text must never open one)."""
    return []


@pytest.fixture
def page(browser: Browser, stack: Stack, dialogs: list[str]) -> Iterator[Page]:
    """A fresh profile (empty localStorage) on the chat page.

    An uncaught script error, or anything the page's own Content-Security-Policy blocks, fails the test.
    """
    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1200, "height": 800}, color_scheme="light")
    tab = context.new_page()
    problems: list[str] = []
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)
    tab.goto(f"{stack.base}/")
    yield tab
    context.close()
    assert problems == []





def test_chat_streams_restores_after_reload_switches_theme_and_clears(page: Page, stack: Stack,
                                                                     tmp_path: Path) -> None:
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    expect(page.locator("#demo-banner")).to_contain_text("Demo model: random weights")
    expect(page.locator("#status-device")).to_contain_text("cpu")

    page.set_input_files("#image-input", files=[
        {"name": "red.png", "mimeType": "image/png", "buffer": make_image((320, 240), (200, 60, 40))}])
    expect(page.locator("#preview-image")).to_be_visible()
    assert page.get_attribute("#preview-image", "src").startswith("data:image/png;base64,")

    # Sliders by keyboard, as a user would: temperature 0.5 -> 0.3, max length to its minimum (128).
    page.focus("#temperature")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.focus("#max-tokens")
    page.keyboard.press("Home")
    expect(page.locator("#temperature-value")).to_have_text("0.3")
    expect(page.locator("#max-tokens-value")).to_have_text("128")

    # First turn, short: the picture of the page in docs/.
    send(page, "What is in this picture?")
    wait_until_answered(page)
    expect(page.locator("#preview")).to_be_hidden()  # the image went with that message only
    expect(page.locator(".message.user .message-images img")).to_have_count(1)
    assert page.evaluate("() => document.querySelector('.message.user img').naturalWidth") == 320
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    shot = tmp_path / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size < SCREENSHOT_MAX_BYTES, f"screenshot is {shot.stat().st_size} bytes"
    if os.environ.get("VLGATE_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)

    # Second turn, in the same session, long enough (2048 tokens) to watch it being written.
    page.focus("#max-tokens")
    page.keyboard.press("End")
    expect(page.locator("#max-tokens-value")).to_have_text("2048")
    send(page, "Describe it in more detail.")
    frames = page.evaluate(RECORD_FRAMES)
    assert frames["sawThinking"], "«思考中…» was never shown before the first token"
    assert frames["status"] == "done", frames["status"]
    lengths = frames["lengths"]
    assert lengths == sorted(lengths), "the answer shrank while streaming"
    assert len(set(lengths)) >= 3, f"the answer did not grow over several frames: {sorted(set(lengths))}"
    wait_until_answered(page)

    answers = page.locator(".message.assistant .answer")
    answer_texts = answers.all_inner_texts()
    assert len(answer_texts) == 2 and all(text.strip() for text in answer_texts)
    sid = session_id(page)
    assert sid and sid.startswith("sess_")
    stored = requests.get(f"{stack.base}/api/sessions/{sid}", timeout=10).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert len(stored[0]["image_ids"]) == 1 and stored[2]["image_ids"] == []
    job = requests.get(f"{stack.base}/api/jobs/{stored[3]['job_id']}", timeout=10).json()
    assert job["status"] == "succeeded", job
    assert job["response"] == stored[3]["text"]

    # Reload: the same history comes back from the server, the image from /api/images/<id>.
    page.reload()
    expect(page.locator(".message")).to_have_count(4)
    expect(page.locator(".message.user .bubble")).to_have_text(["What is in this picture?",
                                                                "Describe it in more detail."])
    restored_image = page.locator(".message.user .message-images img")
    expect(restored_image).to_have_count(1)
    assert restored_image.get_attribute("src") == f"/api/images/{stored[0]['image_ids'][0]}"
    page.wait_for_function("() => document.querySelector('.message.user img').naturalWidth > 0")
    assert answers.all_inner_texts() == answer_texts

    # Dark mode: applied at once, remembered across a reload.
    page.click("#settings-button")
    page.check("#dark-mode")
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("() => getComputedStyle(document.body).backgroundColor") == "rgb(21, 24, 30)"
    page.reload()
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    assert page.evaluate("() => localStorage.getItem('vlgate.theme')") == "dark"
    page.click("#settings-button")
    expect(page.locator("#dark-mode")).to_be_checked()
    page.keyboard.press("Escape")

    # Delete the conversation (after a confirmation): the page forgets the session and the server deleted it.
    page.click(".chat-item[aria-current='true'] .chat-delete")
    page.click("#confirm-delete")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#empty-hint")).to_be_visible()
    assert session_id(page) is None
    assert requests.get(f"{stack.base}/api/sessions/{sid}", timeout=10).status_code == 404


def test_stop_keeps_the_partial_answer(page: Page, stack: Stack) -> None:
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    page.focus("#max-tokens")
    page.keyboard.press("End")
    send(page, "Tell me a very long story.")
    answer = page.locator(".message.assistant .answer")
    # Strings given to wait_for_function must be functions: the page's CSP forbids eval.
    page.wait_for_function("() => document.querySelector('.message.assistant .answer').textContent.length > 40"
                           " && !document.querySelector('.message.assistant .thinking')")
    expect(page.locator("#status-light")).to_have_attribute("data-state", "busy")
    page.click("#stop-button")
    message = page.locator(".message.assistant")
    expect(message).to_have_attribute("data-status", "cancelled")
    expect(page.locator("#stop-button")).to_be_hidden()
    expect(page.locator("#prompt")).to_be_enabled()
    expect(message.locator(".meta")).to_contain_text("Stopped")
    assert answer.inner_text().strip()
    job = stack.poll(message.get_attribute("data-job-id"))
    assert job["status"] == "cancelled" and job["response"]
    assert job["usage"]["completion_tokens"] < 2048


def test_answer_survives_a_web_server_crash(page: Page, stack: Stack) -> None:
    """The chat socket dies mid-answer: the page follows the job by id and ends with the stored answer."""
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    page.focus("#max-tokens")
    page.keyboard.press("End")
    send(page, "Tell me everything.")
    page.wait_for_function("() => document.querySelector('.message.assistant .answer').textContent.length > 40"
                           " && !document.querySelector('.message.assistant .thinking')")
    stack.web.kill()  # kill -9: every socket drops at once
    stack.web.start()
    live.wait_for_web(stack.base)
    message = page.locator(".message.assistant")
    expect(message).to_have_attribute("data-status", "done", timeout=30_000)
    job = stack.poll(message.get_attribute("data-job-id"))
    assert job["status"] == "succeeded"
    # What the page shows is exactly the stored answer, rendered the page's own way.
    expected = page.evaluate("""async (text) => {
      const { renderMarkdown } = await import('/static/markdown.js');
      const div = document.createElement('div');
      div.innerHTML = renderMarkdown(text);
      return div.textContent;
    }""", job["response"])
    assert page.locator(".message.assistant .answer").text_content() == expected


# Builds a DataTransfer holding one PNG, as a drag from the desktop or a screenshot on the clipboard does.
PNG_TRANSFER = """(bytes) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([new Uint8Array(bytes)], 'dropped.png', { type: 'image/png' }));
  return transfer;
}"""


def test_drop_and_paste_attach_an_image(page: Page) -> None:
    png = list(make_image((40, 30), (10, 160, 60)))
    for target in ("#dropzone", "#conversation"):  # onto the left panel, and onto the chat
        transfer = page.evaluate_handle(PNG_TRANSFER, png)
        page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
        page.dispatch_event(target, "drop", {"dataTransfer": transfer})
        expect(page.locator("#preview-name")).to_contain_text("dropped.png")
        page.click("#remove-image")
        expect(page.locator("#preview")).to_be_hidden()
    page.focus("#prompt")
    page.evaluate("""(transfer) => document.activeElement.dispatchEvent(
      new ClipboardEvent('paste', { clipboardData: transfer, bubbles: true, cancelable: true }))""",
                  page.evaluate_handle(PNG_TRANSFER, png))
    expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview-image').naturalWidth === 40")


def test_model_html_is_shown_as_text_never_run(page: Page, stack: Stack, dialogs: list[str]) -> None:
    sid = new_id("sess")
    now = utcnow()
    with Session(stack.db) as db:
        db.add(ChatSession(id=sid, created_at=now, updated_at=now))
        db.add(Message(session_id=sid, role="user", text="<script>alert(2)</script> show me HTML", created_at=now))
        db.add(Message(session_id=sid, role="assistant", text=f"Here: {XSS} and **bold**", created_at=now))
        db.commit()
    page.evaluate("sid => localStorage.setItem('vlgate.session_id', sid)", sid)
    page.reload()

    answer = page.locator(".message.assistant .answer")
    expect(answer).to_contain_text(f"Here: {XSS} and bold")
    expect(answer.locator("strong")).to_have_text("bold")
    expect(page.locator(".message.user .bubble")).to_have_text("<script>alert(2)</script> show me HTML")
    assert answer.locator("img").count() == 0
    assert page.locator('img[src="x"]').count() == 0
    assert page.locator(".conversation script").count() == 0
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert dialogs == []


def test_errors_are_shown_inline_in_plain_words(page: Page, stack: Stack) -> None:
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    image_error = page.locator("#image-error")
    page.set_input_files("#image-input", files=[
        {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (10 * 1024 * 1024 + 1)}])
    expect(image_error).to_contain_text('“huge.png” is not a readable')  # big is fine (shrunk); undecodable is not
    page.set_input_files("#image-input", files=[
        {"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image at all"}])
    expect(image_error).to_contain_text('“broken.png” is not a readable')
    expect(page.locator("#preview")).to_be_hidden()

    page.focus("#max-tokens")
    page.keyboard.press("Home")
    send(page, "Hello")
    wait_until_answered(page)
    sid = session_id(page)
    # The session disappears behind the page's back (cleared in another tab): the server's refusal is
    # shown inline, what the user typed comes back, and the next send starts a new conversation.
    assert requests.delete(f"{stack.base}/api/sessions/{sid}", timeout=10).status_code == 200
    send(page, "Still there?")
    expect(page.locator(".message.assistant .error")).to_have_text(f"Session {sid} does not exist.")
    expect(page.locator("#prompt")).to_have_value("Still there?")
    assert session_id(page) is None
    page.press("#prompt", "Enter")
    wait_until_answered(page)
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "done")
    assert session_id(page) not in (None, sid)


def worker_report(**fields: object) -> dict:
    """A heartbeat as /api/health lists it, loaded and idle unless told otherwise."""
    return {"worker_id": "gpu0", "hostname": "h", "pid": 1, "state": "idle", "device": "cuda:0", "gpu_name": None,
            "memory_used_mb": None, "memory_total_mb": None, "model": "Qwen/Qwen3-VL-4B-Instruct",
            "model_label": "Qwen/Qwen3-VL-4B-Instruct", "is_demo": False, "loaded": True, "error": None,
            "fallback_reason": None, "device_fallback_reason": None, "jobs_done": 0, "current_jobs": [],
            "started_at": 0.0, "last_heartbeat": 0.0, "age_s": 1.0, **fields}


@pytest.mark.parametrize(("workers", "light", "shown"), [
    ([], "none", ["No worker running"]),
    ([worker_report(state="error", loaded=False, error="CUDA out of memory")], "error",
     ["Worker error", "gpu0: CUDA out of memory"]),
    ([worker_report(state="busy", gpu_name="NVIDIA H100", memory_used_mb=9120.0, memory_total_mb=81559.0)], "busy",
     ["Busy", "NVIDIA H100", "8.9 / 79.6 GB"]),
    ([worker_report(model_label="demo (random weights)", is_demo=True, fallback_reason="no network")], "ready",
     ["Ready", "Demo model: random weights, answers are random text", "no network"]),
])
def test_status_light_follows_the_health_report(page: Page, stack: Stack, workers: list, light: str,
                                                shown: list[str]) -> None:
    report = {"status": "ok" if workers and workers[0]["loaded"] else "degraded", "model_ready": True,
              "model": None, "database": {"ok": True, "error": None}, "redis": {"ok": True, "error": None},
              "queues": {"chat": 0, "batch": 0}, "workers": workers}
    page.route("**/api/health", lambda route: route.fulfill(status=200, content_type="application/json",
                                                            body=json.dumps(report)))
    page.reload()
    expect(page.locator("#status-light")).to_have_attribute("data-state", light)
    panel = page.locator(".sidebar .status").inner_text() + page.locator("#demo-banner").inner_text()
    for text in shown:
        assert text in panel
    assert page.locator("#demo-banner").is_visible() == any(w["is_demo"] for w in workers)
