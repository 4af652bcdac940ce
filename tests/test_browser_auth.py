"""Keys required, in a real headless Chromium and over raw WebSockets, against the running service (gunicorn,
Celery worker, Redis, SQLite): the pages ask for the key once (an HttpOnly cookie remembers it), say in plain
words when it is wrong or revoked, and WebSockets open with the cookie, a one-use ticket or a Bearer header.

The stack starts open (no key); the first key made in its database switches it to keys required.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect
from simple_websocket import Client, ConnectionClosed, ConnectionError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.keys import create_key, revoke_key
from common.models import Job
from devtools import live
from devtools.databases import make_image
from devtools.live import Stack
from tests.socketfixtures import close, read_stream, receive

pytestmark = pytest.mark.slow

TIMEOUT_MS = 20_000
WRONG_KEY = "vlg_0badc0de_" + "x" * 43


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    """The whole service on SQLite; key lookups are never reused, so a revocation bites at once."""
    with live.running_stack("sqlite", tmp_path_factory.mktemp("stack-auth"), data_dir, "w-auth",
                            VLGATE_KEY_CACHE_S="0") as deployment:
        yield deployment


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with live.chromium() as chromium:
        yield chromium


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile whose pages must raise no script error and break no Content-Security-Policy rule."""
    expect.set_options(timeout=TIMEOUT_MS)
    ctx = browser.new_context(viewport={"width": 1200, "height": 800}, color_scheme="light")
    problems: list[str] = []
    ctx.on("page", lambda tab: (
        tab.on("pageerror", lambda error: problems.append(str(error))),
        tab.on("console", lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None)))
    yield ctx
    ctx.close()
    assert problems == []


@dataclass(frozen=True)
class Key:
    """A key made for a test: its id, public prefix and secret."""

    id: str
    prefix: str
    secret: str


def make_key(stack: Stack, name: str) -> Key:
    """Make a key (its own tenant) in the stack's database."""
    with Session(stack.db) as db:
        made = create_key(db, name)
        return Key(made.key.id, made.key.prefix, made.secret)


def revoke(stack: Stack, key: Key) -> None:
    with Session(stack.db) as db:
        assert revoke_key(db, key.id) is not None


def bearer(key: Key) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.secret}"}


def ws_url(stack: Stack, path: str) -> str:
    return stack.base.replace("http://", "ws://") + path


def ticket(stack: Stack, key: Key) -> str:
    answer = requests.post(f"{stack.base}/api/auth/ticket", headers=bearer(key), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["ticket"]


def refused(url: str, **kwargs: object) -> int:
    """Open a WebSocket that must be refused; return the HTTP status of the refusal."""
    with pytest.raises(ConnectionError) as error:
        Client.connect(url, **kwargs)
    return error.value.status_code


def first_frame(url: str, **kwargs: object) -> dict:
    """Open a WebSocket whose server sends one frame and closes; return that frame.

    simple_websocket loses frames that arrive in the same read as its handshake answer when the server
    closes at once, so this tries a few times.
    """
    for _ in range(5):
        ws = Client.connect(url, **kwargs)
        try:
            return receive(ws, timeout=10)
        except ConnectionClosed:
            continue
        finally:
            close(ws)
    raise AssertionError(f"{url} closed five times without a frame")


def chat_turn(ws: Client, prompt: str = "Hello?") -> tuple[dict, dict]:
    """Send one chat turn; return (accepted, final event)."""
    ws.send(json.dumps({"type": "chat", "prompt": prompt, "temperature": 0, "max_tokens": 8}))
    accepted = receive(ws)
    assert accepted["type"] == "accepted", accepted
    _, final = read_stream(ws)
    return accepted, final


def sign_in(page: Page, secret: str) -> None:
    """Type a key into the dialog and press Enter."""
    page.fill("#auth-key", secret)
    page.press("#auth-key", "Enter")


def test_websockets_open_with_a_one_use_ticket_or_a_bearer_header_and_nothing_else(stack: Stack) -> None:
    team, other = make_key(stack, "ws-team"), make_key(stack, "ws-other")
    assert refused(ws_url(stack, "/ws/chat")) == 401  # no ticket and no key
    assert refused(ws_url(stack, "/ws/chat"), headers={"Authorization": f"Bearer {WRONG_KEY}"}) == 401
    assert refused(ws_url(stack, "/ws/chat?ticket=made-up")) == 401

    one_use = ticket(stack, team)
    ws = Client.connect(ws_url(stack, f"/ws/chat?ticket={one_use}"))
    try:
        accepted, final = chat_turn(ws)
    finally:
        close(ws)
    assert final["type"] == "done" and final["status"] == "succeeded", final
    with Session(stack.db) as db:
        assert db.get(Job, accepted["job_id"]).key_id == team.id  # the ticket acted as its key
    assert refused(ws_url(stack, f"/ws/chat?ticket={one_use}")) == 401  # a ticket works once

    # Following a job: its own tenant sees the stream (a long job, still running when the socket opens);
    # another tenant's id does not exist.
    answer = requests.post(f"{stack.base}/api/jobs", headers=bearer(team), timeout=30, json={
        "prompt": "Describe every detail.", "temperature": 0, "max_tokens": 400, "min_tokens": 400})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]
    ws = Client.connect(ws_url(stack, f"/ws/jobs/{job_id}?ticket={ticket(stack, team)}"))
    try:
        tokens, done = read_stream(ws)
    finally:
        close(ws)
    stored = requests.get(f"{stack.base}/api/jobs/{job_id}", headers=bearer(team), timeout=10).json()
    assert done["type"] == "done" and done["response"] == stored["response"] and tokens
    assert first_frame(ws_url(stack, f"/ws/jobs/{job_id}"), headers=bearer(other))["code"] == "job_not_found"

    ws = Client.connect(ws_url(stack, "/ws/chat"), headers=bearer(team))  # a header on the handshake
    try:
        _, final = chat_turn(ws)
        assert final["type"] == "done", final
    finally:
        close(ws)
    revoke(stack, team)
    assert refused(ws_url(stack, "/ws/chat"), headers=bearer(team)) == 401
    assert requests.post(f"{stack.base}/api/auth/ticket", headers=bearer(team), timeout=10).json()["error"][
        "code"] == "key_revoked"


def test_chat_page_asks_once_streams_with_the_cookie_and_says_when_the_key_is_revoked(
        context: BrowserContext, stack: Stack) -> None:
    first = make_key(stack, "chat-team")
    page = context.new_page()
    page.goto(f"{stack.base}/")
    dialog, error = page.locator("#auth-dialog"), page.locator("#auth-error")
    expect(dialog).to_be_visible()
    expect(page.get_by_label("API 密钥 API key")).to_be_focused()  # labelled, and focused for typing
    expect(error).to_be_hidden()

    sign_in(page, WRONG_KEY)
    expect(error).to_contain_text("That key is not valid")
    expect(dialog).to_be_visible()
    sign_in(page, first.secret)
    expect(dialog).to_be_hidden()
    expect(page.locator("#account-name")).to_contain_text(f"chat-team ({first.prefix}…)")
    expect(page.locator("#sign-out-button")).to_be_visible()

    # The key is in no page storage; an HttpOnly, SameSite=Strict cookie stands for it.
    kept = page.evaluate("() => JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie])")
    assert first.secret not in kept and "vlgate_session" not in kept
    cookie = next(c for c in context.cookies() if c["name"] == "vlgate_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Not an admin: the health report is the status only; the model's name comes from /v1/models.
    expect(page.locator("#status-light")).to_have_attribute("data-state", "ready")
    expect(page.locator("#status-model")).to_contain_text("Model: ")
    expect(page.locator("#demo-banner")).to_contain_text("Demo model")

    # A chat turn over the WebSocket, which the cookie opened as this key.
    page.set_input_files("#image-input", files=[
        {"name": "blue.png", "mimeType": "image/png", "buffer": make_image((64, 48), (20, 60, 200))}])
    page.fill("#prompt", "What is in this picture?")
    page.press("#prompt", "Enter")
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-status", "done")
    assert answer.locator(".answer").inner_text().strip()
    with Session(stack.db) as db:
        assert db.scalar(select(func.count()).select_from(Job).where(Job.key_id == first.id)) == 1

    # A reload keeps the sign-in: no dialog, the conversation (and its image, through the cookie) comes back.
    page.reload()
    expect(page.locator(".message")).to_have_count(2)
    page.wait_for_function("() => document.querySelector('.message.user img')?.naturalWidth > 0")
    expect(dialog).to_be_hidden()
    expect(page.locator("#account-name")).to_contain_text("chat-team")

    # Revoked meanwhile: the next message on the open socket is refused; the page says so in plain words,
    # asks again, and gives the unsent text back.
    revoke(stack, first)
    page.fill("#prompt", "Anyone there?")
    page.press("#prompt", "Enter")
    expect(dialog).to_be_visible()
    expect(error).to_contain_text(f"The API key {first.prefix}… was revoked")
    expect(page.locator("#prompt")).to_have_value("Anyone there?")
    page.reload()
    expect(dialog).to_be_visible()
    expect(error).to_contain_text(f"The API key {first.prefix}… was revoked")
    sign_in(page, first.secret)  # a revoked key cannot sign in again either
    expect(error).to_contain_text("was revoked")

    # Another tenant's key: the old conversation is not shown (its session is not found for this key).
    second = make_key(stack, "chat-team-2")
    sign_in(page, second.secret)
    expect(dialog).to_be_hidden()
    expect(page.locator("#account-name")).to_contain_text("chat-team-2")
    expect(page.locator("#empty-hint")).to_be_visible()
    expect(page.locator(".message")).to_have_count(0)

    # The socket is refused on its next handshake (the server restarts while the key is revoked): a browser
    # sees only a close, so the page asks the server why, and shows the dialog with the server's words.
    expect(page.locator("#send-button")).to_be_enabled()
    stack.web.stop()
    revoke(stack, second)
    stack.web = live.web(stack.web_port, stack.env, stack.log_dir).start()
    live.wait_for_web(stack.base)
    expect(dialog).to_be_visible()
    expect(error).to_contain_text(f"The API key {second.prefix}… was revoked")

    # A request refused for its key (here deleting the conversation) asks again too.
    third = make_key(stack, "chat-team-3")
    with page.expect_navigation():  # another key: the page reloads; typing before that would be lost with it
        sign_in(page, third.secret)
    expect(page.locator("#account-name")).to_contain_text("chat-team-3")
    page.fill("#prompt", "Still there?")
    page.press("#prompt", "Enter")
    expect(page.locator(".message.assistant").last).to_have_attribute("data-status", "done")
    revoke(stack, third)
    page.click(".chat-item[aria-current='true'] .chat-delete")
    page.click("#confirm-delete")
    expect(dialog).to_be_visible()
    expect(error).to_contain_text(f"The API key {third.prefix}… was revoked")

    # Sign in again, then sign out: the dialog asks for a key, and the cookie is gone.
    sign_in(page, make_key(stack, "chat-team-4").secret)
    expect(page.locator("#account-name")).to_contain_text("chat-team-4")
    expect(dialog).to_be_hidden()
    page.click("#sign-out-button")
    expect(dialog).to_be_visible()
    expect(error).to_be_hidden()
    assert not [c for c in context.cookies() if c["name"] == "vlgate_session"]


def test_batch_page_asks_for_the_key_and_runs_a_batch_with_it(context: BrowserContext, stack: Stack) -> None:
    key = make_key(stack, "batch-team")
    page = context.new_page()
    page.goto(f"{stack.base}/batch")
    dialog, error = page.locator("#auth-dialog"), page.locator("#auth-error")
    expect(dialog).to_be_visible()
    sign_in(page, "not a key")
    expect(error).to_contain_text("That key is not valid")
    sign_in(page, key.secret)
    expect(dialog).to_be_hidden()
    expect(page.locator("#account-name")).to_contain_text("batch-team")
    expect(page.locator("#model-banner")).to_contain_text("Demo model")

    files = [{"name": f"p{i}.png", "mimeType": "image/png", "buffer": make_image((40 + i, 40), (90, 30 * i, 60))}
             for i in range(3)]
    page.set_input_files("#file-input", files=files)
    page.fill("#prompt", "Tag this.")
    page.click("#start-button")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#results-body tr[data-status='succeeded']")).to_have_count(3)
    batch_id = page.locator("#downloads code").first.inner_text()
    assert requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10).status_code == 401
    assert requests.get(f"{stack.base}/api/batches/{batch_id}", headers=bearer(key), timeout=10).ok

    # Revoked: starting again says why, and nothing is uploaded until a working key is given.
    revoke(stack, key)
    page.set_input_files("#file-input", files=files)
    page.click("#start-button")
    expect(dialog).to_be_visible()
    expect(error).to_contain_text(f"The API key {key.prefix}… was revoked")
    with Session(stack.db) as db:
        assert db.scalar(select(func.count()).select_from(Job).where(Job.key_id == key.id)) == 3
