"""The batch page (/batch) in a real headless Chromium, against the running service (gunicorn, Celery worker,
Redis, SQLite): upload, live progress, the results table, downloads, cancel, untrusted text shown as text.

Debian's ``/usr/bin/chromium`` is driven by Playwright through ``executable_path``; Playwright never
downloads a browser, and a missing one fails the test rather than skipping it.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from common.models import Job
from devtools import live
from devtools.databases import make_image, migrate
from devtools.live import Stack
from tests.webfixtures import DEAD_REDIS_URL, make_settings
from web import create_app

pytestmark = pytest.mark.slow

TIMEOUT_MS = 30_000
XSS = '<img src=x onerror="window.__xss = 1"><b>bold</b> & <script>window.__xss = 2</script>'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Stack]:
    with live.running_stack("sqlite", tmp_path_factory.mktemp("stack-batch-page"), data_dir, "page-w1") as deployment:
        answer = requests.get(f"{deployment.base}/batch", timeout=10)
        assert answer.status_code == 200, "GET /batch: register web.batch_page (batch_page.init_app) in create_app"
        yield deployment


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    """Debian's Chromium under Playwright (devtools/live.py)."""
    with live.chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser, stack: Stack):  # type: ignore[no-untyped-def]
    """A fresh profile on /batch that records script errors (there must be none)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(f"{stack.base}/batch")
    yield tab
    context.close()
    assert errors == []


def test_the_page_needs_nothing_from_outside_and_follows_the_server_token_limit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'offline.db'}"
    migrate(url)  # the app reads it only to find whether keys exist
    settings = make_settings(url, tmp_path, redis_url=DEAD_REDIS_URL,
                             max_tokens_limit=1024)
    app = create_app(settings)
    assert "batch_page" in app.blueprints, "register web.batch_page (batch_page.init_app) in create_app"
    client = app.test_client()
    answer = client.get("/batch")
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    html = answer.get_data(as_text=True)
    assert "webkitdirectory" in html and 'href="/"' in html
    assert re.search(r'id="max-tokens" min="128" max="1024"', html)
    references = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert not [url for url in references if "//" in url]  # no CDN: it works on an offline network
    for url in references:
        if url.startswith("/static/"):
            assert client.get(url).status_code == 200, url


def png_files(names: list[str]) -> list[dict]:
    return [{"name": name, "mimeType": "image/png", "buffer": make_image((40 + 3 * i, 40), (30 * i, 120, 200))}
            for i, name in enumerate(names)]


def batch_jobs(stack: Stack, batch_id: str) -> list:
    with stack.db.connect() as conn:
        return conn.execute(select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_index)).all()


def test_upload_progress_table_downloads_and_answers_shown_as_text(page, stack: Stack) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#model-banner")).to_contain_text("Demo model")
    names = [f"photo_{i}.png" for i in range(5)]
    files = [*png_files(names), {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n??"}]
    page.set_input_files("#file-input", files=files)
    expect(page.locator("#file-summary")).to_contain_text("6 张图片 images")
    page.fill("#prompt", "What is in this picture?")
    page.focus("#max-tokens")
    page.keyboard.press("Home")  # the shortest answers: 128 tokens
    expect(page.locator("#max-tokens-value")).to_have_text("128")
    page.click("#start-button")

    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    rows = page.locator("#results-body tr")
    expect(rows).to_have_count(6)
    expect(page.locator("#start-button")).to_be_enabled()
    expect(page.locator("#cancel-button")).to_be_hidden()
    ordered = sorted([*names, "broken.png"])
    assert page.locator("#results-body .col-name").all_text_contents() == ordered
    statuses = [rows.nth(i).get_attribute("data-status") for i in range(6)]
    assert statuses == ["failed" if name == "broken.png" else "succeeded" for name in ordered]
    assert page.locator("#results-body tr[data-status=failed] .col-error").text_content().startswith("invalid_image:")
    assert all(text for text in page.locator("#results-body tr[data-status=succeeded] .col-response")
               .all_text_contents())
    expect(page.locator("#progress-text")).to_contain_text("6 / 6")

    # What the server stored: one prompt and the sliders' values for every item.
    batch_id = page.locator("#downloads code").text_content()
    assert f"batch={batch_id}" in page.url
    jobs = batch_jobs(stack, batch_id)
    assert [job.item_name for job in jobs] == ordered
    assert {job.prompt for job in jobs} == {"What is in this picture?"}
    assert {(job.spec["sampling"]["temperature"], job.spec["stop"]["max_tokens"]) for job in jobs} == {(0.5, 128)}

    # The download links are the results URLs.
    table = page.request.get(stack.base + page.get_attribute(".download-csv", "href"))
    assert table.ok
    rows_csv = list(csv.DictReader(io.StringIO(table.text())))
    assert [r["name"] for r in rows_csv] == ordered and rows_csv[0]["error_code"] == "invalid_image"
    lines = page.request.get(stack.base + page.get_attribute(".download-jsonl", "href")).text().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == [job.id for job in jobs]

    # A model answer made of HTML is shown as text after a reload (the address keeps the batch).
    with stack.db.begin() as conn:
        conn.execute(update(Job).where(Job.id == jobs[1].id).values(response=XSS))
    page.reload()
    expect(page.locator("#results-body tr")).to_have_count(6)
    expect(page.locator("#results-body tr").nth(1).locator(".col-response")).to_have_text(XSS)
    assert page.locator("#results-body img, #results-body b, #results-body script").count() == 0
    assert page.evaluate("() => window.__xss") is None


def test_cancel_stops_what_has_not_run_and_the_theme_follows_the_chat_page(page, stack: Stack,
                                                                           tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # The chat page's remembered choice applies here too, and the switch writes the same key.
    page.evaluate("() => localStorage.setItem('vlgate.theme', 'dark')")
    page.reload()
    assert page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    expect(page.locator("#dark-mode")).to_be_checked()
    page.click("#dark-mode")
    assert page.evaluate("() => localStorage.getItem('vlgate.theme')") == "light"
    assert page.get_attribute("a#chat-link", "href") == "/"

    # A folder pick keeps the images (named by path inside the folder), not hidden files or other files.
    folder = tmp_path / "pics"
    (folder / "inner").mkdir(parents=True)
    for name in ("b.png", "inner/a.JPG", ".hidden.png"):
        (folder / name).write_bytes(make_image(fmt="PNG" if name.endswith(".png") else "JPEG"))
    (folder / "notes.txt").write_text("not an image")
    page.set_input_files("#folder-input", folder)
    expect(page.locator("#file-summary")).to_contain_text("2 张图片 images")
    assert page.locator("#file-sample li").all_text_contents() == ["pics/b.png", "pics/inner/a.JPG"]
    page.click("#clear-files")
    expect(page.locator("#file-summary")).to_contain_text("No images selected")

    # Files dropped on the page (a synthetic drop: Chromium gives no entries for it, so the plain files are read).
    page.evaluate("""(png) => {
      const transfer = new DataTransfer();
      for (let i = 0; i < 12; i += 1) {
        const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], `drop_${String(i).padStart(2, '0')}.png`, { type: 'image/png' }));
      }
      transfer.items.add(new File(['text'], 'notes.txt', { type: 'text/plain' }));
      const drop = new DragEvent('drop', { dataTransfer: transfer, bubbles: true });
      document.getElementById('dropzone').dispatchEvent(drop);
    }""", base64.b64encode(make_image()).decode())
    expect(page.locator("#file-summary")).to_contain_text("12 张图片 images")
    page.fill("#prompt", "Describe every detail.")
    page.focus("#max-tokens")
    page.keyboard.press("End")  # long answers, so most items are still queued when we cancel
    page.click("#start-button")
    expect(page.locator("#downloads code")).to_have_count(1)
    page.click("#cancel-button")

    expect(page.locator("#cancel-button")).to_be_hidden()
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#results-body tr")).to_have_count(12)
    batch_id = page.locator("#downloads code").text_content()
    batch = requests.get(f"{stack.base}/api/batches/{batch_id}", timeout=10).json()
    assert batch["status"] == "cancelled" and batch["counts"]["cancelled"] >= 6
    assert page.locator("#results-body tr[data-status=cancelled]").count() == batch["counts"]["cancelled"]


def test_a_json_schema_makes_every_answer_json(page, stack: Stack) -> None:
    from playwright.sync_api import expect

    schema = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["photo", "scan"]}},
              "required": ["kind"], "additionalProperties": False}
    page.set_input_files("#file-input", files=png_files(["a.png", "b.png"]))
    page.fill("#prompt", "Which kind?")
    page.click("#schema-option summary")
    page.fill("#json-schema", "{not json")
    page.click("#start-button")
    expect(page.locator("#form-error")).to_contain_text("JSON Schema")
    page.fill("#json-schema", json.dumps(schema))
    page.click("#start-button")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    batch_id = page.locator("#downloads code").first.text_content()
    jobs = batch_jobs(stack, batch_id)
    assert [job.status for job in jobs] == ["succeeded", "succeeded"]
    assert {json.dumps(job.spec["sampling"]["response_format"]["json_schema"]["schema"]) for job in jobs} == {
        json.dumps(schema)}
    assert sorted(json.loads(job.response)["kind"] in ("photo", "scan") for job in jobs) == [True, True]


def test_checks_before_upload_thumbnails_failed_filter_retry_and_past_batches(page, stack: Stack) -> None:
    from playwright.sync_api import expect

    limit = int(page.get_attribute("#batch-main", "data-max-image-bytes"))
    assert limit == 10 * 1024 * 1024  # the server's max_image_bytes, written into the page
    broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n??"}
    refused = [{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"},
               {"name": "empty.png", "mimeType": "image/png", "buffer": b""},
               {"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (limit + 1)}]
    page.set_input_files("#file-input", files=[*png_files(["a.png", "b.png", "c.png"]), broken, *refused])
    expect(page.locator("#file-summary")).to_contain_text("4 张图片 images")
    notes = page.locator("#file-refused li")
    expect(notes).to_have_count(3)  # said before anything is sent, one line per reason
    assert [re.search(r": (\S+)$", text).group(1) for text in notes.all_text_contents()] == [
        "notes.txt", "empty.png", "huge.png"]
    assert "10.0 MB" in notes.nth(2).text_content()
    page.fill("#prompt", "Name one colour.")
    page.click("#start-button")
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    first_id = page.locator("#downloads code").text_content()
    assert [job.item_name for job in batch_jobs(stack, first_id)] == ["a.png", "b.png", "broken.png", "c.png"]
    assert page.locator("#downloads .rows-note").text_content() == "(# 1–4 = index 0–3)"
    assert page.locator("#results-body .col-index").all_text_contents() == ["1", "2", "3", "4"]

    # Thumbnails from the browser's own files: the 40×40 picture of a.png, decoded.
    expect(page.locator("#results-body img.thumb")).to_have_count(4)
    page.wait_for_function("() => { const img = document.querySelector('#results-body img.thumb');"
                           " return img.complete && img.naturalWidth === 40; }", timeout=TIMEOUT_MS)

    # Failed only: one row shows; retry sends a new batch of just that file.
    expect(page.locator("#failed-count")).to_have_text("1")
    page.check("#failed-only")
    expect(page.locator("#results-body tr:visible")).to_have_count(1)
    assert page.locator("#results-body tr:visible .col-name").text_content() == "broken.png"
    page.uncheck("#failed-only")
    expect(page.locator("#results-body tr:visible")).to_have_count(4)
    expect(page.locator("#retry-failed")).to_contain_text("Retry 1 failed")
    page.click("#retry-failed")
    expect(page.locator("#downloads code")).not_to_have_text(first_id)
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    retry_id = page.locator("#downloads code").text_content()
    assert [job.item_name for job in batch_jobs(stack, retry_id)] == ["broken.png"]
    assert {job.prompt for job in batch_jobs(stack, retry_id)} == {"Name one colour."}
    expect(page.locator("#results-body tr")).to_have_count(1)
    assert f"batch={retry_id}" in page.url and first_id not in page.url

    # Past batches: this browser's, newest first, with the server's status; they survive a reload and reopen.
    items = page.locator("#history li.history-item")
    expect(items).to_have_count(2)
    expect(items.nth(1).locator(".history-status")).to_contain_text("completed")
    assert [items.nth(i).get_attribute("data-batch") for i in range(2)] == [retry_id, first_id]
    assert items.nth(1).locator("a.history-open").get_attribute("href") == f"/batch?batch={first_id}"
    page.goto(f"{stack.base}/batch")
    expect(page.locator("#history li.history-item")).to_have_count(2)
    expect(page.locator("#history li.history-item").nth(1).locator(".history-status")).to_contain_text("✗1")
    page.locator("#history li.history-item").nth(1).locator("a.history-open").click()
    expect(page.locator("#results-body tr")).to_have_count(4)
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    assert page.locator("#results-body .thumb-none").count() == 4  # no local files after a reload: no thumbnails
    expect(page.locator("#retry-failed")).to_be_hidden()
