"""Schemathesis against the generated OpenAPI document, in-process, on SQLite and Postgres.

Every operation of ``/api/openapi.json`` (``/api`` and ``/v1``) gets requests generated from the
document with a fixed seed and a bounded number of examples: valid ones, and (where the document
constrains something) invalid ones. Every answer must be no server error, have a status and media
type the document lists, and match the schema documented for it; an invalid request must be
refused; a request the document calls valid must not be refused as malformed.

A thread plays the worker's part (claim any queued job, finish it, publish ``done``), so the
endpoints that wait for an answer (``/api/chat``, ``/api/batch``, ``/v1/chat/completions`` whole or
streamed) return within milliseconds instead of their wait limits.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, assume, given
from pydantic import ValidationError
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from common import jobs
from common.config import Settings
from common.db import make_session_factory
from common.events import DoneEvent
from common.params import NOT_BLANK, ResponseFormat
from common.queue import QUEUES
from common.schemas import Usage
from tests import webfixtures
from tests.webfixtures import b64, heartbeat, png_bytes, services_of
from web.openapi import openapi_document

# The fixtures, bound by assignment: the root conftest belongs to the whole suite.
db_url, app = webfixtures.db_url, webfixtures.app

SEED = 20240611
MAX_EXAMPLES = 10  # per operation and mode: both databases together take about a minute on two cores
FUZZ_WORKER = "schemathesis-worker"
# The server refuses NUL in every string (PostgreSQL cannot store it); the document says so in words, since
# JSON Schema would need a pattern on every string and every property name.
CONFIG = schemathesis.Config.from_dict({"generation": {"allow-x00": False}})
# A schema-valid request may still be refused for what JSON Schema cannot say: bytes that are not an image,
# an id that does not exist, a model this server does not serve. Refused as malformed, it means the
# document promised more than the server accepts.
MALFORMED = {"invalid_json", "invalid_request", "unsupported_media_type"}


def _cases() -> list[Any]:
    """Every documented operation in positive mode; in negative mode those with a body or a query to break
    (a path parameter is any string: nothing in a URL can violate it)."""
    cases = []
    for path, methods in openapi_document()["paths"].items():
        for method, spec in methods.items():
            label = f"{method.upper()} {path}"
            cases.append(pytest.param(method.upper(), path, GenerationMode.POSITIVE, id=f"{label} positive"))
            if "requestBody" in spec or any(p["in"] == "query" for p in spec.get("parameters", [])):
                cases.append(pytest.param(method.upper(), path, GenerationMode.NEGATIVE, id=f"{label} negative"))
    return cases


class InstantWorker(threading.Thread):
    """Finish every queued job at once, as a worker would: commit the row, then publish ``done``."""

    def __init__(self, app: Flask) -> None:
        super().__init__(daemon=True)
        svc = services_of(app)
        self.factory = make_session_factory(svc.engine)
        self.bus = svc.bus
        self.stopping = threading.Event()
        self.error: BaseException | None = None  # what stopped it early (then waiting requests would hang)

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.01):
                self._finish_queued()
        except BaseException as exc:
            self.error = exc
            raise

    def _finish_queued(self) -> None:
        with self.factory() as db:
            for job in jobs.claim_next(db, FUZZ_WORKER, lease_s=60, max_attempts=3, limit=64, queues=QUEUES):
                outcome = jobs.Outcome(status="succeeded", response="ok", finish_reason="stop", prompt_tokens=3,
                                       completion_tokens=1, timings={"queue_s": 0.0}, model="demo")
                if jobs.finish(db, job.id, FUZZ_WORKER, outcome):
                    done = DoneEvent(seq=1, response="ok", finish_reason="stop", usage=Usage.of(3, 1))
                    self.bus.publish(job.id, done.wire(), 2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        assert self.error is None, f"the simulated worker failed: {self.error!r}"


# -- rules the document states in words, because JSON Schema cannot compare two fields -----------------
def _params_hold(params: Any, settings: Settings) -> bool:
    """min_tokens is not above max_tokens; image and images together are not more than the limit."""
    if not isinstance(params, dict):
        return True
    least, most = params.get("min_tokens"), params.get("max_tokens")
    if isinstance(least, int | float) and isinstance(most, int | float) and least > most:
        return False
    images = params.get("images")
    count = (1 if params.get("image") else 0) + (len(images) if isinstance(images, list) else 0)
    return count <= settings.max_images_per_request


def _completion_holds(body: dict[str, Any], settings: Settings) -> bool:
    """A /v1 request's min_tokens is not above its token budget (max_completion_tokens, max_tokens or 512)."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens") or settings.default_max_tokens
    least = body.get("min_tokens")
    return not (isinstance(least, int | float) and isinstance(budget, int | float) and least > budget)


def _upload_holds(form: dict[str, Any]) -> bool:
    """An upload's response_format is the JSON text of a response_format (its ``contentSchema``)."""
    if "response_format" not in form:
        return True
    try:
        ResponseFormat.model_validate(json.loads(form["response_format"]))
    except (ValueError, ValidationError):
        return False
    return True


def follows_documented_rules(case: Case, settings: Settings) -> bool:
    """Tell whether a body keeps the rules its fields' descriptions state."""
    body = case.body
    query = case.query or {}
    if case.path == "/api/usage" and isinstance(query.get("since"), str) and isinstance(query.get("until"), str):
        return query["since"] <= query["until"]  # documented: since must not be after until (ISO dates sort)
    if case.path.startswith("/v1/"):
        return _completion_holds(body, settings) if isinstance(body, dict) else True
    if case.media_type == "multipart/form-data":
        return _params_hold(body, settings) and _upload_holds(body)
    if isinstance(body, list):
        return all(_params_hold(item, settings) for item in body)
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        return all(_params_hold(item, settings) for item in body["items"])
    return _params_hold(body, settings)


def as_documented(case: Case, settings: Settings) -> None:
    """Send an upload's text fields before its files, as its description asks (JSON Schema has no order), and
    ask /v1 for the model served, so that valid requests get past the model check to the job they make."""
    if case.media_type == "multipart/form-data" and isinstance(case.body, dict) and "files" in case.body:
        # In place: a body reassigned is validated again, and Schemathesis calls any body with bytes invalid.
        case.body["files"] = case.body.pop("files")
    if case.path == "/v1/chat/completions" and isinstance(case.body, dict):
        case.body["model"] = settings.model


def valid_requests_accepted(ctx: CheckContext, response: Response, case: Case) -> None:
    """A request generated as valid is not refused as malformed (a 400 for its content is fine)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    try:
        code = response.json()["error"]["code"]
    except (ValueError, TypeError, KeyError):  # not an error in the JSON shape
        return
    if code in MALFORMED:
        raise AssertionError(f"the document calls this request valid, the server refused it: {response.text[:500]}")


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, valid_requests_accepted]


@pytest.fixture
def fuzzed_app(app: Flask) -> Iterator[Flask]:
    """An app on empty stores with a loaded worker (a heartbeat) and a thread that finishes its jobs."""
    heartbeat(app, ttl_s=600)
    worker = InstantWorker(app)
    worker.start()
    yield app
    worker.stop()


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_operation_conforms(fuzzed_app: Flask, method: str, path: str, mode: GenerationMode) -> None:
    """Generated requests get no 5xx, only documented statuses, bodies that match their schemas."""
    settings = services_of(fuzzed_app).settings
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", fuzzed_app, config=CONFIG)
    operation = schema[path][method]

    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Case) -> None:
        if mode.is_positive:
            assume(follows_documented_rules(case, settings))
            as_documented(case, settings)
        case.call_and_validate(checks=CHECKS)

    check()


def test_what_generated_requests_rarely_reach_conforms(fuzzed_app: Flask) -> None:
    """Walk what random ids and image URLs never reach: reading and cancelling real jobs, sessions, images and
    batches, results in every format, and a completion whole and streamed (each event checked)."""
    schema = schemathesis.openapi.from_wsgi("/api/openapi.json", fuzzed_app, config=CONFIG)
    image = b64(png_bytes())

    def call(method: str, path: str, status: int = 200, **parts: Any) -> Response:
        media = {"media_type": "application/json"} if "body" in parts else {}
        response = schema[path][method].Case(**media, **parts).call_and_validate(checks=CHECKS)
        assert response.status_code == status, response.text[:500]
        return response

    chat = call("POST", "/api/chat", body={"prompt": "What is this?", "image": image, "wait": 10}).json()
    job, session = {"job_id": chat["job_id"]}, {"session_id": chat["session_id"]}
    call("GET", "/api/jobs/{job_id}", path_parameters=job)
    call("DELETE", "/api/jobs/{job_id}", path_parameters=job)
    turns = call("GET", "/api/sessions/{session_id}", path_parameters=session).json()["messages"]
    call("GET", "/api/images/{image_id}", path_parameters={"image_id": turns[0]["image_ids"][0]})
    call("DELETE", "/api/sessions/{session_id}", path_parameters=session)
    call("POST", "/api/jobs", 202, body={"prompt": "Later.", "images": [image]})

    items = [{"prompt": "One?", "image": image, "name": "one.png"}, {"prompt": "Two?", "image": "not an image"}]
    batch = {"batch_id": call("POST", "/api/batch", body=items, query={"wait": 10}).json()["batch_id"]}
    call("GET", "/api/batches/{batch_id}", path_parameters=batch)
    for fmt in ("json", "jsonl", "csv"):
        call("GET", "/api/batches/{batch_id}/results", path_parameters=batch, query={"format": fmt})
    call("DELETE", "/api/batches/{batch_id}", path_parameters=batch)
    call("POST", "/api/batches", 202, body={"items": items})

    model = services_of(fuzzed_app).settings.model
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    request = {"model": model, "messages": [{"role": "user", "content": content}], "n": 2, "logprobs": True}
    assert call("POST", "/v1/chat/completions", body=request).json()["object"] == "chat.completion"
    streamed = {**request, "stream": True, "stream_options": {"include_usage": True}}
    assert call("POST", "/v1/chat/completions", body=streamed).text.endswith("data: [DONE]\n\n")
    call("GET", "/v1/models/{model_id}", path_parameters={"model_id": model})


def test_the_documented_prompt_pattern_is_what_the_server_calls_not_blank() -> None:
    """``NOT_BLANK`` matches a text exactly when ``str.strip`` leaves something (the server's test)."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)  # no lone surrogates
    assert re.sub(NOT_BLANK, "", everything) == "".join(filter(str.isspace, everything))  # what strip() removes
