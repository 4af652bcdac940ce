"""``/v1`` at the HTTP layer (Flask's client, real Redis and SQLite/Postgres): error shapes, the model gate,
the media guard, and what a completion stores; the workers' part is played through the shared contract."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from common.models import Job
from tests import webfixtures
from tests.webfixtures import SimulatedWorker, b64, build_app, heartbeat, png_bytes, row_counts, services_of

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

EMPTY = {"sessions": 0, "messages": 0, "images": 0, "message_images": 0, "jobs": 0}
DATA_URL = "data:image/png;base64," + b64(png_bytes())


def body(**extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": DATA_URL}}]
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def assert_openai_error(response: Any, status: int, code: str, param: str | None = None, *words: str) -> dict:
    """Check OpenAI's error shape, the status the SDK maps to its exception class, and the message."""
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert error["param"] == param
    for word in words:
        assert word in error["message"]
    return error


def test_errors_on_v1_take_openais_shape_and_api_keeps_its_own(client: FlaskClient, app: Flask):
    error = assert_openai_error(client.post("/v1/chat/completions", json=body()), 503, "model_not_loaded", None,
                                "no worker is running")
    assert error["type"] == "service_unavailable_error"
    api = client.post("/api/chat", json={"prompt": "hi"})
    assert api.status_code == 503 and set(api.get_json()["error"]) == {"code", "message"}
    heartbeat(app)
    bad = assert_openai_error(client.post("/v1/chat/completions", json=body(temperature=5)), 400, "invalid_request",
                              "temperature", "temperature")
    assert bad["type"] == "invalid_request_error"
    assert_openai_error(client.post("/v1/chat/completions", data="{", content_type="application/json"), 400,
                        "invalid_json")
    assert_openai_error(client.get("/v1/nowhere"), 404, "not_found")
    assert_openai_error(client.post("/v1/chat/completions", json=body(model="gpt-4o")), 404, "model_not_found",
                        "model", "gpt-4o")
    assert row_counts(app) == EMPTY


@pytest.mark.parametrize("extra, param, words", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": DATA_URL, "max_pixels": 10**9}}]}]}, "messages.0.content.0.image_url.max_pixels", ["max_pixels"]),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", ["tool"]),
    ({"logit_bias": {"5": 10}}, "logit_bias", ["logit_bias"]),
    ({"top_logprobs": 2}, "top_logprobs", ["requires logprobs"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ["at most 4"]),
    ({"messages": []}, "messages", ["at least 1"]),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "messages", ["user message"]),
    ({"response_format": {"type": "json_schema"}}, "response_format", ["json_schema"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", []),
])
def test_bad_completion_requests_store_nothing(client: FlaskClient, app: Flask, extra, param, words):
    heartbeat(app)
    response = client.post("/v1/chat/completions", json=body(**extra))
    assert_openai_error(response, 400, "invalid_request", param, *words)
    assert row_counts(app) == EMPTY


def test_harmless_unknown_fields_are_ignored_and_the_job_is_stored(client: FlaskClient, app: Flask):
    heartbeat(app)
    worker = SimulatedWorker(app, tokens=("A", " cat"))
    worker.start()
    answer = client.post("/v1/chat/completions", json=body(service_tier="auto", store=False, metadata={"a": "b"},
                                                           user="u1", seed=4, stop="END", presence_penalty=0.5))
    worker.join(10)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    doc = answer.get_json()
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "A cat", "refusal": None}
    assert doc["usage"]["prompt_tokens"] == 12 and answer.headers["x-request-id"] == worker.job_id
    with services_of(app).session_factory() as db:
        job = db.get(Job, worker.job_id)
        assert job.session_id is None and job.queue == "chat"
        assert job.spec["sampling"]["seed"] == 4 and job.spec["sampling"]["presence_penalty"] == 0.5
        assert job.spec["stop"] == {"max_tokens": 8, "min_tokens": 0, "strings": ["END"]}
    assert row_counts(app)["images"] == 1


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(png_bytes())

    def log_message(self, *_: object) -> None:
        pass


def test_an_allowlisted_host_on_a_private_address_is_refused_without_a_connection(db_url: str, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app = build_app(db_url, tmp_path, allowed_media_domains=["localhost"])
    try:
        heartbeat(app)
        url = f"http://localhost:{server.server_address[1]}/x.png"
        content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
        response = app.test_client().post("/v1/chat/completions", json=body(
            messages=[{"role": "user", "content": content}]))
        assert response.status_code == 400
        assert response.get_json()["error"]["code"] == "invalid_image_url"
        assert _Counter.hits == []
    finally:
        server.shutdown()
        services_of(app).close()


def sse_frames(response: Any, count: int) -> list[str]:
    """Read ``count`` SSE frames from a streamed test response (its generator, frame by frame)."""
    frames, body = [], response.response
    for piece in body:
        frames.append(piece.decode() if isinstance(piece, bytes) else piece)
        if len(frames) == count:
            break
    return frames


def test_a_queued_stream_sends_keep_alives_and_closing_it_cancels_the_job(db_url: str, tmp_path):
    app = build_app(db_url, tmp_path, sse_keepalive_s=0.05)
    try:
        heartbeat(app)  # a worker is "up", but none takes the job: it stays queued
        response = app.test_client().post("/v1/chat/completions", json=body(stream=True), buffered=False)
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        job_id = response.headers["x-request-id"]
        first, *rest = sse_frames(response, 3)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert rest == [": keep-alive\n\n", ": keep-alive\n\n"]
        response.close()  # the client leaves
        with services_of(app).session_factory() as db:
            assert db.get(Job, job_id).status == "cancelled"
    finally:
        services_of(app).close()


def test_a_failure_mid_stream_arrives_as_an_error_frame(client: FlaskClient, app: Flask):
    heartbeat(app)
    worker = SimulatedWorker(app, status="failed", tokens=("Hal",), error_code="generation_failed",
                             error_message="the GPU fell over")
    worker.start()
    response = client.post("/v1/chat/completions", json=body(stream=True, stream_options={"include_usage": True}))
    worker.join(10)
    frames = [f for f in response.get_data(as_text=True).split("\n\n") if f]
    payloads = [f.removeprefix("data: ") for f in frames]
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error == {"message": "the GPU fell over", "type": "server_error", "param": None,
                     "code": "generation_failed"}
    deltas = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:-2]]
    assert "Hal" in deltas
