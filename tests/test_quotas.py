"""Quotas and backpressure on SQLite and Postgres with a real Redis: per-key requests and tokens per minute,
per-key and per-queue caps on waiting jobs, on every way in (``/api``, ``/v1``, batches, uploads, WebSocket).

Every refusal is checked for its status, code and ``Retry-After``, and for what it left in the database:
nothing. The 500-request burst against real gunicorn is in ``test_quotas_live.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from simple_websocket import Client
from sqlalchemy import func, select
from urllib3 import encode_multipart_formdata
from werkzeug.serving import make_server

from common import jobs
from common.models import Batch
from tests import webfixtures
from tests.webfixtures import (
    WORKER_ID,
    SimulatedWorker,
    b64,
    build_app,
    heartbeat,
    make_key,
    png_bytes,
    row_counts,
    services_of,
)
from web.services import batches as batch_service

db_url, app = webfixtures.db_url, webfixtures.app

IMAGE = b64(png_bytes(color=(90, 40, 200)))


@pytest.fixture
def make_app(app: Flask, db_url: str, tmp_path: Any) -> Iterator[Callable[..., Flask]]:
    """Build apps with quota settings on the fixture's emptied database and Redis DB."""
    built: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        quota_app = build_app(db_url, tmp_path, key_cache_s=0, **overrides)
        heartbeat(quota_app)
        built.append(quota_app)
        return quota_app

    yield make
    for each in built:
        services_of(each).close()



def auth(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def post_job(client: FlaskClient, secret: str | None = None, **body: Any) -> Any:
    return client.post("/api/jobs", json={"prompt": "hi", "max_tokens": 4, **body}, headers=auth(secret))


def completion(client: FlaskClient, secret: str | None = None, **body: Any) -> Any:
    request = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    return client.post("/v1/chat/completions", json=request, headers=auth(secret))


def assert_refused(response: Any, status: int, code: str) -> int:
    """Check a refusal's status, code and Retry-After (1 to 60 s); return the Retry-After."""
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    return retry_after


def stored(app: Flask) -> dict[str, int]:
    """Count the rows a submission writes, batches included."""
    with services_of(app).session_factory() as db:
        return {**row_counts(app), "batches": db.scalar(select(func.count()).select_from(Batch)) or 0}


def test_the_fourth_request_of_a_3_rpm_key_is_refused_and_stores_nothing(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    limited, other = make_key(app, "team-a", rpm=3), make_key(app, "team-b", rpm=3)
    client = app.test_client()
    for left in (2, 1, 0):
        response = post_job(client, limited)
        assert response.status_code == 202
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == str(left)
        assert "x-ratelimit-limit-tokens" not in response.headers  # no token limit on this key
    before = stored(app)
    assert_refused(post_job(client, limited), 429, "rate_limit_exceeded")
    refused = completion(client, limited)  # /v1 counts against the same minute, in OpenAI's error shape
    assert_refused(refused, 429, "rate_limit_exceeded")
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    assert stored(app) == before
    assert post_job(client, other).status_code == 202  # another key has its own minute
    assert post_job(client).status_code == 401


def test_tokens_per_minute_are_charged_at_admission(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    small, budget = make_key(app, "small", tpm=100), make_key(app, "budget", tpm=1000)
    client = app.test_client()
    too_big = post_job(client, small, max_tokens=200)  # more than the whole minute's budget: never fits
    assert_refused(too_big, 429, "tokens_per_minute_exceeded")
    assert "201 tokens" in too_big.get_json()["error"]["message"]  # "hi" is 1 token, plus max_tokens
    # "hi" is 1 token, an image 256, max_tokens 300: 557; the second such request no longer fits in 1,000.
    first = post_job(client, budget, max_tokens=300, image=IMAGE)
    assert first.status_code == 202
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 557)
    before = stored(app)
    assert_refused(post_job(client, budget, max_tokens=300, image=IMAGE), 429, "tokens_per_minute_exceeded")
    # n choices are charged n times over: 2 × 250 + 1 > 443 left.
    assert_refused(completion(client, budget, max_tokens=250, n=2), 429, "tokens_per_minute_exceeded")
    assert stored(app) == before == {**before, "jobs": 1}
    assert post_job(client, budget, max_tokens=400).status_code == 202  # 401 still fits in what is left


def test_a_key_may_hold_max_queued_unfinished_jobs(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    limited, free = make_key(app, "team-a", max_queued=2), make_key(app, "team-b")
    client = app.test_client()
    first, second = post_job(client, limited).get_json()["job_id"], post_job(client, limited).get_json()["job_id"]
    with services_of(app).session_factory() as db:  # a running job still counts
        assert jobs.claim(db, first, WORKER_ID, lease_s=30, max_attempts=3) is not None
    before = stored(app)
    assert assert_refused(post_job(client, limited), 429, "too_many_queued") == 1
    assert_refused(completion(client, limited), 429, "too_many_queued")
    assert_refused(client.post("/api/batches", json=[{"prompt": "x", "image": IMAGE}], headers=auth(limited)),
                   429, "too_many_queued")
    assert stored(app) == before
    assert post_job(client, free).status_code == 202  # other keys are not held back
    assert client.delete(f"/api/jobs/{second}", headers=auth(limited)).get_json()["status"] == "cancelled"
    assert post_job(client, limited).status_code == 202  # a finished job frees its place


def test_a_full_chat_queue_answers_503_on_every_way_in(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_queued_chat=2)  # the open gateway: no per-key limits, the queue cap still holds
    client = app.test_client()
    assert [post_job(client).status_code for _ in range(2)] == [202, 202]
    before = stored(app)
    assert_refused(post_job(client), 503, "queue_full")
    assert_refused(client.post("/api/chat", json={"prompt": "hi"}), 503, "queue_full")
    refused = completion(client)
    assert_refused(refused, 503, "queue_full")
    assert refused.get_json()["error"]["type"] == "service_unavailable_error"
    assert stored(app) == before
    # Batch items wait on their own queue, under their own cap.
    assert client.post("/api/batches", json=[{"prompt": "x", "image": IMAGE}]).status_code == 202


def test_a_websocket_turn_is_refused_with_an_error_frame(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_queued_chat=1)
    assert post_job(app.test_client()).status_code == 202
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        ws = Client.connect(f"ws://127.0.0.1:{httpd.server_port}/ws/chat")
        ws.send(json.dumps({"type": "chat", "prompt": "hi", "max_tokens": 4}))
        frame = json.loads(ws.receive(timeout=10))
        ws.close()
    finally:
        httpd.shutdown()
    assert frame["type"] == "error" and frame["error"]["code"] == "queue_full"
    assert stored(app)["jobs"] == 1


def test_a_batch_that_would_pass_a_cap_is_refused_whole(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_queued_batch_items=5)
    limited = make_key(app, "team-a", max_queued=4)
    free = make_key(app, "team-b")
    client = app.test_client()
    items = [{"prompt": f"item {i}", "image": IMAGE} for i in range(6)]
    assert_refused(client.post("/api/batches", json=items, headers=auth(free)), 503, "queue_full")
    assert_refused(client.post("/api/batches", json=items[:5], headers=auth(limited)), 429, "too_many_queued")
    assert stored(app)["batches"] == stored(app)["jobs"] == 0
    assert client.post("/api/batches", json=items[:3], headers=auth(free)).status_code == 202
    refused = client.post("/api/batches", json=items[:3], headers=auth(limited))  # 3 + 3 > 5
    assert "3 batch items are waiting" in refused.get_json()["error"]["message"]
    assert_refused(refused, 503, "queue_full")
    assert stored(app)["batches"] == 1 and stored(app)["jobs"] == 3


def test_an_upload_over_the_cap_is_deleted_before_its_commit(make_app: Callable[..., Flask],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(max_queued_batch_items=2)
    monkeypatch.setattr(batch_service, "FLUSH_ITEMS", 1)  # every item written as it arrives, as in a long upload
    written_at_abort: list[int] = []
    real_abort = batch_service.BatchWriter.abort

    def counting_abort(writer: batch_service.BatchWriter) -> None:
        written_at_abort.append(stored(app)["jobs"])
        real_abort(writer)

    monkeypatch.setattr(batch_service.BatchWriter, "abort", counting_abort)
    files = [("prompt", "Describe.")] + [("files", (f"{i}.png", png_bytes(color=(i, 9, 9)), "image/png"))
                                         for i in range(3)]
    body, content_type = encode_multipart_formdata(files)
    client = app.test_client()
    assert_refused(client.post("/api/batches", data=body, content_type=content_type), 503, "queue_full")
    assert written_at_abort == [3]  # the count came at the end, after the items were stored ...
    assert stored(app)["batches"] == stored(app)["jobs"] == 0  # ... and the refusal deleted them
    body, content_type = encode_multipart_formdata(files[:3])
    accepted = client.post("/api/batches", data=body, content_type=content_type)
    assert accepted.status_code == 202 and accepted.get_json()["total"] == 2


def test_concurrent_submissions_never_pass_the_caps(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_queued_chat=15)
    limited, free = make_key(app, "team-a", max_queued=10), make_key(app, "team-b")

    def submit(secret: str) -> tuple[str, int, str | None]:
        response = post_job(app.test_client(), secret)
        return secret, response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(submit, [limited, free] * 40))
    accepted = [secret for secret, status, _ in results if status == 202]
    assert accepted.count(limited) <= 10 and len(accepted) == 15  # exact: room is never given twice
    assert all(status in (429, 503) and retry for _, status, retry in results if status != 202)
    assert stored(app)["jobs"] == stored(app)["sessions"] == stored(app)["messages"] == 15


def test_rate_headers_on_a_v1_answer(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    limited = make_key(app, "team-a", rpm=5, tpm=10_000)
    worker = SimulatedWorker(app)
    worker.start()
    answer = completion(app.test_client(), limited, max_tokens=10)
    worker.join(10)
    assert answer.status_code == 200 and answer.get_json()["object"] == "chat.completion"
    assert answer.headers["x-ratelimit-limit-requests"] == "5"
    assert answer.headers["x-ratelimit-remaining-requests"] == "4"
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 11)
