"""The JSON API against real Redis and real SQLite and Postgres databases: answers and stored rows."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from common import jobs
from common.db import make_session_factory
from common.ids import new_id
from common.models import Job, StoredImage
from tests import webfixtures
from tests.webfixtures import (
    DEAD_REDIS_URL,
    SimulatedWorker,
    assert_error,
    b64,
    build_app,
    heartbeat,
    png_bomb,
    png_bytes,
    queue_length,
    row_counts,
    services_of,
)

# The fixtures, bound by assignment: the root conftest belongs to the whole suite.
db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

EMPTY = {"sessions": 0, "messages": 0, "images": 0, "message_images": 0, "jobs": 0}
IMAGE = b64(png_bytes())



def _json(**fields: Any) -> dict[str, Any]:
    return {"json": fields}


BAD_INPUT = {
    "not_json": ({"data": "{prompt: hi", "content_type": "application/json"}, 400, "invalid_json", ()),
    "empty_body": ({"data": "", "content_type": "application/json"}, 400, "invalid_json", ()),
    "form_encoded": ({"data": "prompt=hi", "content_type": "application/x-www-form-urlencoded"}, 415,
                     "unsupported_media_type", ()),
    "text_plain": ({"data": '{"prompt": "hi"}', "content_type": "text/plain"}, 415, "unsupported_media_type", ()),
    "array_body": ({"json": [{"prompt": "hi"}]}, 400, "invalid_request", ("object, not an array",)),
    "null_body": ({"data": "null", "content_type": "application/json"}, 400, "invalid_request", ("null",)),
    "missing_prompt": (_json(image=IMAGE), 400, "invalid_request", ("prompt",)),
    "empty_prompt": (_json(prompt=""), 400, "invalid_request", ("prompt",)),
    "blank_prompt": (_json(prompt="  \n\t "), 400, "invalid_request", ("prompt",)),
    "prompt_not_string": (_json(prompt=42), 400, "invalid_request", ("prompt",)),
    "prompt_too_long": (_json(prompt="x" * 32_001), 400, "invalid_request", ("prompt", "32000")),
    "bad_base64": (_json(prompt="hi", image="not base64 at all!!"), 400, "invalid_image", ("base64",)),
    "text_file_as_image": (_json(prompt="hi", image=b64(b"just some notes\n" * 20)), 400, "invalid_image", ()),
    "second_image_bad": (_json(prompt="hi", images=[IMAGE, b64(b"GIF89a broken")]), 400, "invalid_image", ()),
    "image_15mb": (_json(prompt="hi", image=b64(os.urandom(15 * 1024 * 1024))), 413, "image_too_large", ()),
    "png_bomb": (_json(prompt="hi", image=b64(png_bomb())), 400, "invalid_image", ("too large",)),
    "too_many_images": (_json(prompt="hi", images=[IMAGE] * 9), 400, "invalid_request", ("images", "8")),
    "temperature_5": (_json(prompt="hi", temperature=5), 400, "invalid_request",
                      ("temperature: Input should be less than or equal to 2",)),
    "temperature_negative": (_json(prompt="hi", temperature=-0.1), 400, "invalid_request", ("temperature",)),
    "max_tokens_0": (_json(prompt="hi", max_tokens=0), 400, "invalid_request", ("max_tokens",)),
    "max_tokens_99999": (_json(prompt="hi", max_tokens=99999), 400, "invalid_request", ("max_tokens", "2048")),
    "top_p_0": (_json(prompt="hi", top_p=0), 400, "invalid_request", ("top_p",)),
    "unknown_field": (_json(prompt="hi", foo=1), 400, "invalid_request",
                      ("foo: unknown field (extra inputs are not permitted)",)),
    "malformed_session_id": (_json(prompt="hi", session_id="abc"), 400, "invalid_request", ("session_id",)),
    "unknown_session": (_json(prompt="hi", session_id=new_id("sess")), 404, "session_not_found", ()),
    "negative_wait": (_json(prompt="hi", wait=-1), 400, "invalid_request", ("wait",)),
}


@pytest.mark.parametrize("endpoint", ["/api/chat", "/api/jobs"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_and_stores_nothing(app: Flask, client: FlaskClient, endpoint: str, case: str) -> None:
    heartbeat(app)  # a ready model, so only the input can be the reason
    kwargs, status, code, words = BAD_INPUT[case]
    started = time.monotonic()
    response = client.post(endpoint, **kwargs)
    assert_error(response, status, code, *words)
    assert time.monotonic() - started < 5
    assert row_counts(app) == EMPTY
    assert queue_length(app) == 0


def test_a_body_past_the_request_limit_is_413(db_url: str, tmp_path) -> None:
    app = build_app(db_url, tmp_path, max_image_bytes=512 * 1024, max_images_per_request=1)
    heartbeat(app)
    response = app.test_client().post("/api/chat", data=b"x" * (3 * 1024 * 1024), content_type="application/json")
    assert_error(response, 413, "payload_too_large", "MiB")
    services_of(app).close()


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_job_is_404(client: FlaskClient, method: str) -> None:
    for job_id in (new_id("job"), "nonsense", "job_" + "z" * 200):
        assert_error(getattr(client, method)(f"/api/jobs/{job_id}"), 404, "job_not_found", job_id)


def test_unknown_routes_and_methods_answer_json(client: FlaskClient) -> None:
    assert_error(client.get("/api/nothing-here"), 404, "not_found", "/api/nothing-here")
    assert_error(client.get("/nothing-here"), 404, "not_found")
    response = client.get("/api/chat")
    assert_error(response, 405, "method_not_allowed", "POST")
    assert "POST" in response.headers["Allow"]
    assert_error(client.put("/api/jobs/job_x"), 405, "method_not_allowed")
    assert_error(client.get(f"/api/images/img_{'0' * 24}"), 404, "not_found")


def test_no_worker_means_503_model_not_loaded_quickly(app: Flask, client: FlaskClient) -> None:
    started = time.monotonic()
    response = client.post("/api/chat", json={"prompt": "hi", "image": IMAGE})
    elapsed = time.monotonic() - started
    assert_error(response, 503, "model_not_loaded", "no worker is running")
    assert 0.45 <= elapsed < 2.5
    assert row_counts(app) == EMPTY and queue_length(app) == 0


@pytest.mark.parametrize(("state", "loaded", "error", "words"), [
    ("loading", False, None, ("test-worker is loading",)),
    ("error", True, "CUDA error: out of memory", ("test-worker: CUDA error: out of memory",)),
])
def test_model_not_loaded_explains_the_heartbeats(app: Flask, client: FlaskClient, state: str, loaded: bool,
                                                  error: str | None, words: tuple[str, ...]) -> None:
    heartbeat(app, state=state, loaded=loaded, error=error)
    assert_error(client.post("/api/jobs", json={"prompt": "hi"}), 503, "model_not_loaded", *words)
    assert row_counts(app) == EMPTY


def test_the_gate_waits_for_a_worker_that_finishes_loading(app: Flask, client: FlaskClient) -> None:
    heartbeat(app, state="loading", loaded=False)
    threading.Timer(0.2, heartbeat, args=(app,)).start()
    assert client.post("/api/jobs", json={"prompt": "hi"}).status_code == 202


def test_dead_redis_gives_a_fast_503_and_stores_nothing(db_url: str, tmp_path) -> None:
    app = build_app(db_url, tmp_path, redis_url=DEAD_REDIS_URL)
    before = row_counts(app)
    started = time.monotonic()
    response = app.test_client().post("/api/chat", json={"prompt": "hi", "image": IMAGE})
    assert_error(response, 503, "service_unavailable", "Redis")
    assert time.monotonic() - started < 6
    assert row_counts(app) == before
    health = app.test_client().get("/api/health")
    assert health.status_code == 503
    report = health.get_json()
    assert report["status"] == "down" and report["redis"]["ok"] is False and report["database"]["ok"] is True
    services_of(app).close()


def test_submit_stores_rows_enqueues_and_deduplicates_images(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    response = client.post("/api/jobs", json={"prompt": "What is this?", "image": IMAGE, "max_tokens": 64})
    assert response.status_code == 202
    body = response.get_json()
    job_id, session_id = body["job_id"], body["session_id"]
    assert job_id.startswith("job_") and session_id.startswith("sess_") and body["status"] == "queued"
    assert body["links"] == {"self": f"/api/jobs/{job_id}", "stream": f"/ws/jobs/{job_id}"}
    assert response.headers["Location"] == f"/api/jobs/{job_id}"
    assert row_counts(app) == {"sessions": 1, "messages": 1, "images": 1, "message_images": 1, "jobs": 1}
    assert queue_length(app) == 1

    # The same image again, twice, in the same conversation: still one stored image.
    again = client.post("/api/jobs", json={"prompt": "And now?", "session_id": session_id,
                                           "images": [IMAGE, "data:image/png;base64," + IMAGE]})
    assert again.status_code == 202 and again.get_json()["session_id"] == session_id
    assert row_counts(app) == {"sessions": 1, "messages": 2, "images": 1, "message_images": 3, "jobs": 2}
    assert queue_length(app) == 2

    with services_of(app).session_factory() as db:
        job = db.get(Job, job_id)
        assert job.queue == "chat" and job.enqueued_at is not None and job.attempts == 0
        assert job.spec["stop"]["max_tokens"] == 64 and job.spec["sampling"]["temperature"] == 0.5  # the default
        (image_id,) = db.scalars(select(StoredImage.id)).all()
        assert job.spec["turns"] == [{"role": "user", "text": "What is this?", "image_ids": [image_id]}]
        assert job.user_message_id is not None
        second = db.get(Job, again.get_json()["job_id"])
        # The job carries the turns the model sees: the first question, then the new one with its two images.
        assert [t["text"] for t in second.spec["turns"]] == ["What is this?", "And now?"]
        assert second.spec["turns"][1]["image_ids"] == [image_id] * 2


def test_concurrent_submissions_of_one_new_image_store_it_once(app: Flask) -> None:
    heartbeat(app)
    image = b64(png_bytes(color=(1, 2, 3)))
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def submit() -> None:
        barrier.wait()
        statuses.append(app.test_client().post("/api/jobs", json={"prompt": "hi", "image": image}).status_code)

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert statuses == [202] * 4
    assert row_counts(app) == {"sessions": 4, "messages": 4, "images": 1, "message_images": 4, "jobs": 4}
    assert queue_length(app) == 4


def test_poll_and_cancel_a_queued_job(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    job_id = client.post("/api/jobs", json={"prompt": "hi"}).get_json()["job_id"]
    polled = client.get(f"/api/jobs/{job_id}")
    assert polled.status_code == 200
    job = polled.get_json()
    assert job["status"] == "queued" and job["response"] is None and job["attempts"] == 0
    assert job["created_at"].endswith("Z") and job["finished_at"] is None

    listener = services_of(app).bus.subscribe(job_id)
    cancelled = client.delete(f"/api/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled" and cancelled.get_json()["finished_at"].endswith("Z")
    # Followers of the stream learn that it ended, since no worker will ever publish for this job.
    deadline, message = time.monotonic() + 2, None
    while message is None and time.monotonic() < deadline:  # the subscribe confirmation reads as None
        message = listener.get_message(timeout=0.5)
    listener.close()
    assert message and b'"done"' in message["data"] and b'"cancelled"' in message["data"]

    with make_session_factory(services_of(app).engine)() as db:
        assert jobs.claim(db, job_id, "w", lease_s=30, max_attempts=3) is None
    assert client.get(f"/api/jobs/{job_id}").get_json()["status"] == "cancelled"
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200  # cancelling twice is harmless


def test_a_running_job_shows_its_text_so_far_and_cancel_raises_the_flag(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    job_id = client.post("/api/jobs", json={"prompt": "hi"}).get_json()["job_id"]
    bus = services_of(app).bus
    with make_session_factory(services_of(app).engine)() as db:
        assert jobs.claim(db, job_id, "w", lease_s=30, max_attempts=3) is not None
    bus.publish(job_id, {"type": "token", "seq": 1, "text": "Hello"})
    bus.publish(job_id, {"type": "token", "seq": 2, "text": " wor"})
    job = client.get(f"/api/jobs/{job_id}").get_json()
    assert job["status"] == "running" and job["response"] == "Hello wor" and job["attempts"] == 1
    assert job["started_at"].endswith("Z")
    response = client.delete(f"/api/jobs/{job_id}")
    assert response.status_code == 200 and response.get_json()["status"] == "running"
    assert bus.cancelled([job_id]) == {job_id}


def test_chat_waits_for_the_answer_and_continues_the_session(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    worker = SimulatedWorker(app)
    worker.start()
    response = client.post("/api/chat", json={"image": IMAGE, "prompt": "What is this?", "temperature": 0.4,
                                              "max_tokens": 384})
    worker.join(5)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["response"] == "Hello world" and body["status"] == "succeeded" and body["job_id"] == worker.job_id
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    assert body["finish_reason"] == "stop" and body["model"] == "demo" and body["timings"]["generate_s"] == 0.1
    session_id = body["session_id"]

    worker = SimulatedWorker(app, tokens=("Still", " red"))
    worker.start()
    second = client.post("/api/chat", json={"prompt": "And the colour?", "session_id": session_id})
    worker.join(5)
    assert second.status_code == 200 and second.get_json()["response"] == "Still red"
    assert second.get_json()["session_id"] == session_id

    session = client.get(f"/api/sessions/{session_id}").get_json()
    assert [(m["role"], m["text"]) for m in session["messages"]] == [
        ("user", "What is this?"), ("assistant", "Hello world"),
        ("user", "And the colour?"), ("assistant", "Still red"),
    ]
    image_id = session["messages"][0]["image_ids"][0]
    assert session["messages"][2]["image_ids"] == [] and session["created_at"].endswith("Z")
    picture = client.get(f"/api/images/{image_id}")
    assert picture.status_code == 200 and picture.mimetype == "image/png"
    assert picture.data.startswith(b"\x89PNG")
    finished = client.get(f"/api/jobs/{body['job_id']}").get_json()
    assert finished["response"] == "Hello world" and finished["first_token_at"].endswith("Z")


def test_chat_reports_a_failed_job_as_its_error(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    worker = SimulatedWorker(app, status="failed", error_code="context_length_exceeded",
                             error_message="the prompt is 9000 tokens; the context holds 8192")
    worker.start()
    response = client.post("/api/chat", json={"prompt": "hi"})
    worker.join(5)
    assert_error(response, 400, "context_length_exceeded", worker.job_id or "?", "9000 tokens")
    failed = client.get(f"/api/jobs/{worker.job_id}").get_json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "context_length_exceeded"


def test_chat_answers_202_when_the_wait_runs_out(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    started = time.monotonic()
    response = client.post("/api/chat", json={"prompt": "hi", "wait": 0.3})
    assert time.monotonic() - started < 2
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "queued" and response.headers["Location"] == f"/api/jobs/{body['job_id']}"


def test_a_waiting_chat_returns_as_soon_as_its_job_is_cancelled(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)

    def cancel_when_queued() -> None:
        worker = SimulatedWorker(app)
        job_id = worker._next_job()
        time.sleep(0.1)
        app.test_client().delete(f"/api/jobs/{job_id}")

    threading.Thread(target=cancel_when_queued, daemon=True).start()
    started = time.monotonic()
    response = client.post("/api/chat", json={"prompt": "hi", "wait": 20})
    assert time.monotonic() - started < 1.9  # woken by the event, not by the periodic re-read
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled" and response.get_json()["response"] == ""


def test_jobs_with_wait_returns_the_finished_job(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    worker = SimulatedWorker(app)
    worker.start()
    response = client.post("/api/jobs", json={"prompt": "hi", "wait": 5})
    worker.join(5)
    assert response.status_code == 200
    assert response.get_json()["status"] == "succeeded" and response.get_json()["response"] == "Hello world"


def test_delete_session_cancels_its_jobs_and_removes_its_messages(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    first = client.post("/api/jobs", json={"prompt": "hi", "image": IMAGE}).get_json()
    session_id = first["session_id"]
    session = client.get(f"/api/sessions/{session_id}")
    assert session.status_code == 200
    assert session.get_json()["messages"][0]["job_id"] == first["job_id"]

    response = client.delete(f"/api/sessions/{session_id}")
    assert response.status_code == 200 and response.get_json() == {"session_id": session_id, "deleted": True}
    counts = row_counts(app)
    assert counts["sessions"] == 0 and counts["messages"] == 0 and counts["message_images"] == 0
    assert counts["images"] == 1 and counts["jobs"] == 1  # shared images and the record of jobs stay
    job = client.get(f"/api/jobs/{first['job_id']}").get_json()
    assert job["status"] == "cancelled" and job["session_id"] is None

    assert_error(client.get(f"/api/sessions/{session_id}"), 404, "session_not_found", session_id)
    assert_error(client.delete(f"/api/sessions/{session_id}"), 404, "session_not_found")
    assert_error(client.post("/api/jobs", json={"prompt": "hi", "session_id": session_id}), 404, "session_not_found")


def test_health_without_and_with_a_worker(app: Flask, client: FlaskClient) -> None:
    response = client.get("/api/health")
    assert response.status_code == 503
    report = response.get_json()
    assert report["status"] == "degraded" and report["model_ready"] is False and report["workers"] == []
    assert report["database"] == {"ok": True, "error": None} and report["redis"] == {"ok": True, "error": None}
    assert report["queues"] == {"chat": 0, "batch": 0}

    heartbeat(app)
    client.post("/api/jobs", json={"prompt": "hi"})
    response = client.get("/api/health")
    assert response.status_code == 200
    report = response.get_json()
    assert report["status"] == "ok" and report["model_ready"] is True and report["model"].startswith("demo")
    assert report["queues"]["chat"] == 1
    (worker,) = report["workers"]
    assert worker["worker_id"] == "test-worker" and worker["loaded"] is True and worker["age_s"] >= 0


def test_index_page_names_the_model(app: Flask, client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html" and b"not loaded" in page.data
    heartbeat(app)
    assert b"random weights" in client.get("/").data
