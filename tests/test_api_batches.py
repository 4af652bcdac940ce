"""Batch endpoints against real Redis and real SQLite and Postgres databases: answers and stored rows.

No worker runs here: a fake heartbeat opens the model gate, and the tests play the worker's part
through ``common.jobs`` where a result is needed. The end-to-end batch tests with real workers
live elsewhere.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import delete, func, select

from common import jobs
from common.db import make_session_factory
from common.ids import new_id
from common.models import Batch, Job, StoredImage
from tests import webfixtures
from tests.webfixtures import (
    WORKER_ID,
    assert_error,
    b64,
    build_app,
    heartbeat,
    png_bytes,
    queue_length,
    services_of,
)
from web.services import batches as batch_service

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

BOUNDARY = "vlgate-test-boundary-7d1f"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
TEXT = "just some notes, not an image\n" * 10


@pytest.fixture(autouse=True)
def _no_batches(app: Flask) -> None:
    """Start without batches (the shared fixture empties the other tables)."""
    with services_of(app).engine.begin() as conn:
        conn.execute(delete(Job))
        conn.execute(delete(Batch))


def colour_png(i: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small PNG whose colour is unique for i < 4096."""
    return png_bytes(size, (i % 16 * 16, i // 16 % 16 * 16, i // 256 * 16 + 8))


def noise_png(n_bytes: int) -> bytes:
    """A PNG of random pixels (it does not compress, and no two are alike) of at least ``n_bytes``."""
    side = math.ceil((n_bytes / 3) ** 0.5)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


@functools.cache
def noise_pngs(count: int, n_bytes: int) -> tuple[bytes, ...]:
    """Distinct noise PNGs, made once per test session."""
    return tuple(noise_png(n_bytes) for _ in range(count))


def part(name: str, value: bytes | str, filename: str | None = None) -> bytes:
    """Encode one multipart part."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if filename is not None:
        head += "Content-Type: application/octet-stream\r\n"
    data = value.encode() if isinstance(value, str) else value
    return head.encode() + b"\r\n" + data + b"\r\n"


def multipart(fields: Iterable[tuple[str, str]], files: Iterable[tuple[str, bytes]]) -> bytes:
    """Encode text fields, then files, as one multipart body."""
    body = b"".join(part(name, value) for name, value in fields)
    body += b"".join(part("files", data, filename) for filename, data in files)
    return body + f"--{BOUNDARY}--\r\n".encode()


def upload(client: FlaskClient, body: bytes | io.IOBase, query: str = "") -> Any:
    """POST a multipart body as it is (bytes or a file object)."""
    if isinstance(body, bytes):
        return client.post(f"/api/batches{query}", data=body, content_type=MULTIPART)
    return client.post(f"/api/batches{query}", input_stream=body, content_type=MULTIPART)


def stored(app: Flask, batch_id: str) -> tuple[Batch, list[Job]]:
    """Return a batch row and its items in order."""
    with services_of(app).session_factory() as db:
        batch = db.get(Batch, batch_id)
        items = list(db.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_index)))
        return batch, items


def counts(app: Flask) -> tuple[int, int]:
    """Return (batches, jobs)."""
    with services_of(app).session_factory() as db:
        return db.scalar(select(func.count()).select_from(Batch)), db.scalar(select(func.count()).select_from(Job))


def work(app: Flask, job_id: str, response: str = "", *, status: str = "succeeded", tokens: int = 3) -> None:
    """Play a worker: claim the job, stream its text, finish it."""
    bus = services_of(app).bus
    with make_session_factory(services_of(app).engine)() as db:
        assert jobs.claim(db, job_id, WORKER_ID, lease_s=30, max_attempts=3) is not None
        bus.publish(job_id, {"type": "token", "seq": 1, "text": response})
        outcome = jobs.Outcome(status=status, response=response, finish_reason="stop" if status == "succeeded" else
                               "cancelled", prompt_tokens=10, completion_tokens=tokens, model="demo")
        assert jobs.finish(db, job_id, WORKER_ID, outcome)
    bus.publish(job_id, {"type": "done", "seq": 2, "response": response, "status": status})


# -- JSON batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["object", "array"])
def test_a_json_batch_is_stored_in_order_and_enqueued(app: Flask, client: FlaskClient, form: str) -> None:
    heartbeat(app)
    items = [{"image": b64(colour_png(i)), "prompt": f"Describe {i}", "name": f"p{i}.png", "max_tokens": 32 + i}
             for i in range(5)]
    response = client.post("/api/batches", json={"items": items} if form == "object" else items)
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    batch_id = body["batch_id"]
    assert batch_id.startswith("batch_") and response.headers["Location"] == f"/api/batches/{batch_id}"
    assert body["status"] == "running" and body["total"] == 5 and body["progress"] == 0
    assert body["counts"] == {"queued": 5, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert body["links"] == {"self": f"/api/batches/{batch_id}", "results": f"/api/batches/{batch_id}/results"}

    batch, rows = stored(app, batch_id)
    assert counts(app) == (1, 5)
    assert batch.source == "json" and batch.total == 5 and batch.cancel_requested is False
    assert [r.batch_index for r in rows] == [0, 1, 2, 3, 4]
    assert [r.item_name for r in rows] == [f"p{i}.png" for i in range(5)]
    assert [r.prompt for r in rows] == [f"Describe {i}" for i in range(5)]
    for i, row in enumerate(rows):
        assert row.queue == "batch" and row.status == "queued" and row.enqueued_at is not None
        assert row.session_id is None and row.user_message_id is None and len(row.image_ids) == 1
        assert row.spec["stop"]["max_tokens"] == 32 + i and row.spec["sampling"]["temperature"] == 0.5
        assert row.spec["turns"] == [{"role": "user", "text": f"Describe {i}", "image_ids": row.image_ids}]
    assert queue_length(app, "batch") == 5 and queue_length(app, "chat") == 0
    assert client.get(f"/api/batches/{batch_id}").get_json() == body

    job = client.get(f"/api/jobs/{rows[3].id}").get_json()
    assert job["batch_id"] == batch_id and job["session_id"] is None and job["status"] == "queued"
    image = client.get(f"/api/images/{rows[3].image_ids[0]}")
    assert image.status_code == 200 and image.data.startswith(b"\x89PNG")


def test_an_item_with_a_bad_image_fails_alone(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    images = [b64(colour_png(1)), b64(TEXT.encode()), "not base64!!", b64(colour_png(1)), None]
    items = [{"prompt": f"q{i}", **({"image": image} if image else {})} for i, image in enumerate(images)]
    response = client.post("/api/batches", json=items)
    assert response.status_code == 202
    assert response.get_json()["counts"] == {"queued": 3, "running": 0, "succeeded": 0, "failed": 2, "cancelled": 0}
    _, rows = stored(app, response.get_json()["batch_id"])
    assert [r.status for r in rows] == ["queued", "failed", "failed", "queued", "queued"]
    for row in rows[1:3]:
        assert row.error_code == "invalid_image" and row.error_message and row.finished_at is not None
        assert row.enqueued_at is None and row.image_ids == []
    assert rows[0].image_ids == rows[3].image_ids and rows[4].image_ids == []  # stored once; text-only allowed
    assert queue_length(app, "batch") == 3
    with services_of(app).session_factory() as db:
        assert db.scalar(select(func.count()).select_from(StoredImage)) == 1
    failed = client.get(f"/api/jobs/{rows[1].id}").get_json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_image"

    # With `wait`, a batch whose items are all final answers 200 with the results.
    waited = client.post("/api/batches", json={"items": [{"prompt": "x", "image": "bad"}], "wait": 5})
    assert waited.status_code == 200 and waited.get_json()["status"] == "completed"
    assert waited.get_json()["results"][0]["error"]["code"] == "invalid_image"


SCHEMA_ERRORS = {
    "temperature": ([{"prompt": "a"}, {"prompt": "b", "temperature": 5}], ("items.1.temperature",)),
    "missing_prompt": ([{"prompt": "a"}, {"image": b64(colour_png(1))}], ("items.1.prompt: Field required",)),
    "unknown_field": ([{"prompt": "a", "wait": 3}], ("items.0.wait: unknown field",)),
    "min_over_max": ([{"prompt": "a", "max_tokens": 5, "min_tokens": 9}], ("items.0.min_tokens must not exceed",)),
    "too_many_images": ([{"prompt": "a", "images": [b64(colour_png(1))] * 9}], ("items.0.images: 9 images",)),
    "not_an_object": ([{"prompt": "a"}, "hello"], ("items.1",)),
    "empty": ([], ("items",)),
    "many_bad": ([{"prompt": ""}] * 8, ("items.0.prompt", "items.4.prompt", "and 3 more invalid items")),
    "bad_wait": ({"items": [{"prompt": "a"}], "wait": -1}, ("wait",)),
    "string_body": ("hello", ("JSON array of items",)),
}


@pytest.mark.parametrize("case", list(SCHEMA_ERRORS))
def test_a_schema_error_in_any_item_stores_nothing(app: Flask, client: FlaskClient, case: str) -> None:
    heartbeat(app)
    body, words = SCHEMA_ERRORS[case]
    for endpoint in ("/api/batches", "/api/batch"):
        assert_error(client.post(endpoint, json=body), 400, "invalid_request", *words)
    assert counts(app) == (0, 0) and queue_length(app, "batch") == 0


def test_batch_limits_content_type_and_model_gate(app: Flask, client: FlaskClient, monkeypatch) -> None:
    items = [{"prompt": "a"}] * 4
    assert_error(client.post("/api/batches", json=items), 503, "model_not_loaded")
    heartbeat(app)
    monkeypatch.setattr(batch_service, "MAX_ITEMS", 3)
    assert_error(client.post("/api/batches", json=items), 400, "invalid_request", "at most 3")
    assert_error(client.post("/api/batches", data="x", content_type="text/plain"), 415, "unsupported_media_type",
                 "multipart/form-data")
    assert_error(client.post("/api/batches?wait=soon", json=items[:1]), 400, "invalid_request", "wait")
    assert counts(app) == (0, 0)


# -- bulk upload -----------------------------------------------------------------------------------


def test_a_multipart_upload_of_200_images_with_3_corrupt_ones(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    files = [(f"photo_{i:03d}.png", colour_png(i)) for i in range(200)]
    files[17] = ("random.png", os.urandom(3000))
    files[100] = ("truncated.png", colour_png(100, (300, 200))[:300])
    files[199] = ("notes.png", TEXT.encode())
    fields = [("prompt", "Tag this photo."), ("temperature", "0.2"), ("max_tokens", "64"), ("top_k", ""),
              ("stop", "END"), ("stop", "\n\n")]
    started = time.monotonic()
    response = upload(client, multipart(fields, files))
    assert response.status_code == 202, response.get_json()
    assert time.monotonic() - started < 10
    body = response.get_json()
    assert body["total"] == 200 and body["counts"]["queued"] == 197 and body["counts"]["failed"] == 3

    batch, rows = stored(app, body["batch_id"])
    assert batch.source == "upload" and batch.total == 200 and batch.params["prompt"] == "Tag this photo."
    assert [r.batch_index for r in rows] == list(range(200))
    assert [r.item_name for r in rows] == [name for name, _ in files]
    failed = {r.batch_index: r.error_code for r in rows if r.status == "failed"}
    assert failed == {17: "invalid_image", 100: "invalid_image", 199: "invalid_image"}
    queued = [r for r in rows if r.status == "queued"]
    assert len(queued) == 197 and all(r.prompt == "Tag this photo." and len(r.image_ids) == 1 for r in queued)
    assert queued[0].spec["sampling"] == {
        "temperature": 0.2, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "seed": None, "n": 1, "logprobs": False, "top_logprobs": 0, "response_format": None}
    assert queued[0].spec["stop"] == {"max_tokens": 64, "min_tokens": 0, "strings": ["END", "\n\n"]}
    assert len({r.image_ids[0] for r in queued}) == 197  # every colour is its own image
    assert queue_length(app, "batch") == 197


def test_an_upload_keeps_only_a_few_images_in_memory(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    count, size = 300, 100 * 1024
    with tempfile.TemporaryFile() as body:
        body.write(part("prompt", "Describe."))
        for i, image in enumerate(noise_pngs(count, size)):
            body.write(part("files", image, f"noise_{i}.png"))
        body.write(f"--{BOUNDARY}--\r\n".encode())
        total = body.tell()
        body.seek(0)
        assert total > count * size
        tracemalloc.start()
        try:
            response = upload(client, body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["counts"]["queued"] == count
    print(f"upload of {total / 2**20:.1f} MiB: peak traced allocation {peak / 2**20:.1f} MiB")
    assert peak < 10 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {total / 2**20:.1f} MiB upload"
    assert queue_length(app, "batch") == count


def test_an_oversized_file_fails_alone_and_browser_encoding_works(db_url: str, tmp_path) -> None:
    app = build_app(db_url, tmp_path, max_image_bytes=64 * 1024)
    heartbeat(app)
    data = {"prompt": "¿Qué es esto? 这是什么", "seed": "7",
            "files": [(io.BytesIO(colour_png(1)), "a.png"), (io.BytesIO(noise_png(200 * 1024)), "big.png"),
                      (io.BytesIO(b""), ""), (io.BytesIO(colour_png(2)), "文件.png")]}
    response = app.test_client().post("/api/batches", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    _, rows = stored(app, response.get_json()["batch_id"])
    assert [(r.item_name, r.status, r.error_code) for r in rows] == [
        ("a.png", "queued", None), ("big.png", "failed", "image_too_large"), ("文件.png", "queued", None)]
    assert "the limit is 65,536 bytes" in rows[1].error_message
    assert rows[0].prompt == "¿Qué es esto? 这是什么" and rows[0].spec["sampling"]["seed"] == 7
    services_of(app).close()


def test_an_upload_may_be_larger_than_the_json_body_limit(db_url: str, tmp_path) -> None:
    app = build_app(db_url, tmp_path, max_image_bytes=64 * 1024, max_images_per_request=1)
    limit = app.config["MAX_CONTENT_LENGTH"]
    heartbeat(app)
    files = [(f"n{i}.png", image) for i, image in enumerate(noise_pngs(40, 60 * 1024))]
    body = multipart([("prompt", "Describe.")], files)
    assert len(body) > 2 * limit
    response = upload(app.test_client(), body)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["counts"]["queued"] == 40
    too_big = app.test_client().post("/api/batches", data=b"[" + b" " * limit + b"]", content_type="application/json")
    assert_error(too_big, 413, "payload_too_large")
    services_of(app).close()


BAD_UPLOADS = {
    "missing_prompt": ([("temperature", "0.3")], 2, ("prompt: Field required",)),
    "text_after_file": ([("prompt", "hi")], 3, ("max_tokens: text fields must come before the first file",)),
    "bad_temperature": ([("prompt", "hi"), ("temperature", "hot")], 2, ("temperature",)),
    "max_tokens_over_limit": ([("prompt", "hi"), ("max_tokens", "99999")], 2, ("max_tokens: must be at most 2048",)),
    "unknown_field": ([("prompt", "hi"), ("colour", "red")], 2, ("colour: unknown field",)),
    "twice": ([("prompt", "hi"), ("prompt", "ho")], 2, ("prompt: given more than once",)),
    "no_files": ([("prompt", "hi")], 0, ("no image files",)),
    "five_stops": ([("prompt", "hi")] + [("stop", "x")] * 5, 1, ("stop: at most 4 values",)),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_refused_and_stores_nothing(app: Flask, client: FlaskClient, monkeypatch, case: str) -> None:
    heartbeat(app)
    monkeypatch.setattr(batch_service, "FLUSH_ITEMS", 2)  # so some items were committed before the refusal
    fields, n_files, words = BAD_UPLOADS[case]
    body = multipart(fields, [(f"{i}.png", colour_png(i)) for i in range(n_files)])
    if case == "text_after_file":
        tail = f"--{BOUNDARY}--\r\n".encode()
        body = body[: -len(tail)] + part("max_tokens", "9") + part("files", colour_png(9), "late.png") + tail
    assert_error(upload(client, body), 400, "invalid_request", *words)
    assert counts(app) == (0, 0) and queue_length(app, "batch") == 0


def test_upload_limits_and_malformed_bodies(app: Flask, client: FlaskClient, monkeypatch) -> None:
    assert_error(upload(client, multipart([("prompt", "hi")], [("a.png", colour_png(1))])), 503, "model_not_loaded")
    heartbeat(app)
    monkeypatch.setattr(batch_service, "MAX_ITEMS", 3)
    monkeypatch.setattr(batch_service, "FLUSH_ITEMS", 2)
    too_many = multipart([("prompt", "hi")], [(f"{i}.png", colour_png(i)) for i in range(5)])
    assert_error(upload(client, too_many), 400, "invalid_request", "at most 3")
    assert_error(upload(client, too_many, "?wait=later"), 400, "invalid_request", "wait")
    no_end = multipart([("prompt", "hi")], [("a.png", colour_png(1))])[:-30]
    assert_error(upload(client, no_end), 400, "invalid_request", "malformed")
    response = client.post("/api/batches", data=b"--x--", content_type="multipart/form-data")
    assert_error(response, 400, "invalid_request", "boundary")
    assert counts(app) == (0, 0) and queue_length(app, "batch") == 0


# -- results, progress, cancel ---------------------------------------------------------------------


def test_results_in_input_order_as_json_jsonl_and_csv(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    names = ["第一.png", 'quote "q".png', "comma, here.png", None, "bad.png"]
    items = [{"prompt": f"q{i}", "image": b64(colour_png(i) if i != 4 else b"xx"), **({"name": n} if n else {})}
             for i, n in enumerate(names)]
    batch_id = client.post("/api/batches", json=items).get_json()["batch_id"]
    _, rows = stored(app, batch_id)
    answers = ['line one\nline "two"', "猫, 狗", "", None, None]
    for row, answer in zip(rows[:3], answers[:3], strict=True):
        work(app, row.id, answer)
    # Item 3 is still queued: the results say so.
    listed = client.get(f"/api/batches/{batch_id}/results")
    assert listed.status_code == 200 and listed.mimetype == "application/json"
    doc = listed.get_json()
    assert doc["batch_id"] == batch_id and doc["status"] == "running"
    assert [r["index"] for r in doc["results"]] == [0, 1, 2, 3, 4]
    assert [r["name"] for r in doc["results"]] == names
    assert [r["status"] for r in doc["results"]] == ["succeeded"] * 3 + ["queued", "failed"]
    assert [r["response"] for r in doc["results"]][:3] == answers[:3]
    assert doc["results"][0]["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert doc["results"][4]["error"]["code"] == "invalid_image" and doc["results"][4]["usage"] is None

    work(app, rows[3].id, "done")
    progress = client.get(f"/api/batches/{batch_id}").get_json()
    assert progress["status"] == "completed" and progress["progress"] == 1.0
    assert progress["counts"] == {"queued": 0, "running": 0, "succeeded": 4, "failed": 1, "cancelled": 0}
    doc = client.get(f"/api/batches/{batch_id}/results?format=json").get_json()
    assert doc["status"] == "completed" and doc["results"][3]["response"] == "done"

    lines = client.get(f"/api/batches/{batch_id}/results?format=jsonl")
    assert lines.mimetype == "application/x-ndjson" and "attachment" in lines.headers["Content-Disposition"]
    parsed = [json.loads(line) for line in lines.get_data(as_text=True).splitlines()]
    assert parsed == doc["results"]

    table = client.get(f"/api/batches/{batch_id}/results?format=csv")
    assert table.mimetype == "text/csv" and table.mimetype_params["charset"] == "utf-8"
    assert table.data.startswith(b"\xef\xbb\xbf")  # the BOM: Excel then reads the UTF-8 (Chinese) correctly
    reader = list(csv.reader(io.StringIO(table.data.decode("utf-8-sig"), newline="")))
    assert reader[0] == ["index", "name", "job_id", "status", "response", "finish_reason", "error_code",
                         "error_message", "prompt_tokens", "completion_tokens", "total_tokens"]
    assert [row[0] for row in reader[1:]] == ["0", "1", "2", "3", "4"]
    assert [row[1] for row in reader[1:]] == [n or "" for n in names]
    assert [row[4] for row in reader[1:]] == ['line one\nline "two"', "猫, 狗", "", "done", ""]
    assert reader[1][2] == rows[0].id and reader[1][8:] == ["10", "3", "13"]
    assert reader[5][3:] == ["failed", "", "", "invalid_image", rows[4].error_message, "", "", ""]

    assert_error(client.get(f"/api/batches/{batch_id}/results?format=xml"), 400, "invalid_request", "format")


def test_cancel_mid_batch(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    batch_id = client.post("/api/batches", json=[{"prompt": f"q{i}"} for i in range(5)]).get_json()["batch_id"]
    _, rows = stored(app, batch_id)
    ids = [r.id for r in rows]
    work(app, ids[0], "finished first")
    factory = make_session_factory(services_of(app).engine)
    with factory() as db:
        assert jobs.claim(db, ids[1], WORKER_ID, lease_s=30, max_attempts=3) is not None  # running
    bus = services_of(app).bus
    listener = bus.subscribe(ids[3])

    response = client.delete(f"/api/batches/{batch_id}")
    assert response.status_code == 200
    body = response.get_json()
    assert body["counts"] == {"queued": 0, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 3}
    assert body["status"] == "running" and body["progress"] == 0.8
    assert bus.cancelled(ids) == {ids[1]}
    with factory() as db:
        for job_id in ids[2:]:
            assert jobs.claim(db, job_id, WORKER_ID, lease_s=30, max_attempts=3) is None
    deadline, message = time.monotonic() + 2, None
    while message is None and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.5)
    listener.close()
    assert message and json.loads(message["data"])["status"] == "cancelled"
    item = client.get(f"/api/jobs/{ids[4]}").get_json()
    assert item["status"] == "cancelled" and item["finish_reason"] == "cancelled" and item["batch_id"] == batch_id

    with factory() as db:  # the running item stops at its next step and keeps its partial text
        jobs.finish(db, ids[1], WORKER_ID, jobs.Outcome(status="cancelled", response="par", finish_reason="cancelled"))
    body = client.get(f"/api/batches/{batch_id}").get_json()
    assert body["status"] == "cancelled" and body["progress"] == 1.0
    assert client.delete(f"/api/batches/{batch_id}").get_json() == body  # twice is harmless
    batch, _ = stored(app, batch_id)
    assert batch.cancel_requested is True

    done_id = client.post("/api/batches", json=[{"prompt": "x", "image": "bad"}]).get_json()["batch_id"]
    assert client.delete(f"/api/batches/{done_id}").get_json()["status"] == "completed"  # nothing left to cancel


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_batch_is_404(client: FlaskClient, method: str) -> None:
    for batch_id in (new_id("batch"), "nonsense", "batch_" + "z" * 200):
        assert_error(getattr(client, method)(f"/api/batches/{batch_id}"), 404, "batch_not_found", batch_id)
    assert_error(client.get(f"/api/batches/{new_id('batch')}/results?format=csv"), 404, "batch_not_found")


# -- the seed form ---------------------------------------------------------------------------------


def test_seed_batch_answers_202_when_the_wait_runs_out(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    started = time.monotonic()
    response = client.post("/api/batch?wait=0.2", json=[{"image": b64(colour_png(1)), "prompt": "hi"}] * 2)
    assert time.monotonic() - started < 2
    assert response.status_code == 202
    body = response.get_json()
    assert body["status"] == "running" and body["counts"]["queued"] == 2
    assert response.headers["Location"] == f"/api/batches/{body['batch_id']}"


def test_seed_batch_waits_and_answers_results_in_input_order(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    factory = make_session_factory(services_of(app).engine)

    def worker(count: int) -> None:  # takes items in queue order and answers each with its own prompt
        deadline = time.monotonic() + 10
        while count and time.monotonic() < deadline:
            with factory() as db:
                job_id = db.scalar(select(Job.id).where(Job.status == "queued", Job.queue == "batch")
                                   .order_by(Job.batch_index))
                prompt = db.scalar(select(Job.prompt).where(Job.id == job_id)) if job_id else None
            if job_id is None:
                time.sleep(0.02)
                continue
            work(app, job_id, f"answer to {prompt}")
            count -= 1

    thread = threading.Thread(target=worker, args=(3,), daemon=True)  # the fourth item fails on its own
    thread.start()
    items = [{"image": b64(colour_png(i)), "prompt": f"item {i}", "temperature": 0} for i in range(3)]
    items.append({"image": b64(b"GIF89a broken"), "prompt": "item 3"})
    response = client.post("/api/batch", json=items)
    thread.join(5)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert list(body) == ["batch_id", "status", "results"] and body["status"] == "completed"
    assert [r["response"] for r in body["results"]] == [f"answer to item {i}" for i in range(3)] + [None]
    assert body["results"][3]["status"] == "failed" and body["results"][3]["error"]["code"] == "invalid_image"
    assert all(r["job_id"].startswith("job_") for r in body["results"])


def test_openapi_describes_the_batch_endpoints(client: FlaskClient) -> None:
    doc = client.get("/api/openapi.json").get_json()
    create = doc["paths"]["/api/batches"]["post"]
    content = create["requestBody"]["content"]
    one_of = content["application/json"]["schema"]["oneOf"]
    assert {"$ref": "#/components/schemas/BatchCreate"} in one_of
    assert {"type": "array", "items": {"$ref": "#/components/schemas/BatchItemCreate"}, "minItems": 1} in one_of
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["prompt", "files"] and form["properties"]["files"]["items"]["format"] == "binary"
    assert "temperature" in form["properties"] and "image" not in form["properties"]
    results = doc["paths"]["/api/batches/{batch_id}/results"]["get"]
    assert set(results["responses"]["200"]["content"]) == {"application/json", "application/x-ndjson", "text/csv"}
    assert any(p["name"] == "format" and p["in"] == "query" for p in results["parameters"])
    assert "BatchResults" in doc["components"]["schemas"] and "BatchPublic" in doc["components"]["schemas"]
