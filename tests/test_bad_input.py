"""Inputs that used to reach a 500, on SQLite and Postgres: each is a clear 4xx in the endpoint's error shape and
stores nothing. Also: spreadsheet formulas defused in CSV results, uploads invisible to workers until complete."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from common import jobs
from common.ids import utcnow
from common.models import Batch, Job
from tests import webfixtures
from tests.webfixtures import b64, heartbeat, png_bytes, row_counts, services_of

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

IMAGE = b64(png_bytes())
NESTED = "[" * 5000 + "]" * 5000


def api_error(response: Any, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code and all(w in error["message"] for w in words), error


@pytest.mark.parametrize("raw, code, words", [
    (NESTED, "invalid_json", ["nested too deeply"]),
    ('{"prompt": ' + "[" * 70 + "1" + "]" * 70 + "}", "invalid_json", ["nested too deeply"]),
    ('{"prompt": "half a pair \\ud800"}', "invalid_request", ["prompt", "unpaired surrogate"]),
    ('{"prompt": "a\\u0000b"}', "invalid_request", ["prompt", "NUL"]),
    ('{"prompt": "x", "stop": ["\\u0000"]}', "invalid_request", ["stop.0", "NUL"]),
    ('{"prompt": "x", "max_tokens": true}', "invalid_request", ["max_tokens", "boolean"]),
    ('{"prompt": "x", "repetition_penalty": 1e-300}', "invalid_request", ["repetition_penalty"]),
    ('{"prompt": "x", "temperature": 1e-300, "seed": false}', "invalid_request", ["seed", "boolean"]),
])
def test_hostile_chat_bodies_are_400s_that_store_nothing(app: Flask, client: FlaskClient, raw, code, words):
    heartbeat(app)
    before = row_counts(app)
    api_error(client.post("/api/jobs", data=raw, content_type="application/json"), 400, code, *words)
    assert row_counts(app) == before


def test_hostile_bodies_on_v1_and_batches_take_each_endpoints_shape(app: Flask, client: FlaskClient):
    heartbeat(app)
    v1 = client.post("/v1/chat/completions", data=NESTED, content_type="application/json")
    assert v1.status_code == 400 and v1.get_json()["error"]["type"] == "invalid_request_error"
    bad_name = client.post("/api/batches", json={"items": [{"prompt": "x", "image": IMAGE, "name": "a\x00.png"}]})
    api_error(bad_name, 400, "invalid_request", "items.0.name", "NUL")
    answer = client.post("/v1/chat/completions", json={"model": "demo", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": True})
    assert answer.status_code == 400 and answer.get_json()["error"]["param"] == "max_tokens"
    assert row_counts(app)["jobs"] == 0


@pytest.mark.parametrize("path", ["/api/sessions/%00", "/api/jobs/%00", "/api/batches/%00", "/api/images/%00",
                                  "/api/jobs/job_" + "0" * 23 + "\u00e9", "/api/sessions/sess_%ff"])
def test_malformed_ids_are_404s(client: FlaskClient, path: str):
    response = client.get(path)
    assert response.status_code == 404 and response.get_json()["error"]["code"].endswith("not_found")
    assert client.delete(path).status_code in (404, 405)


def test_multipart_text_with_nul_is_refused_and_a_nul_file_name_is_stored_safely(app: Flask, client: FlaskClient):
    heartbeat(app)
    refused = client.post("/api/batches", content_type="multipart/form-data",
                          data={"prompt": "a\x00b", "files": [(io.BytesIO(png_bytes()), "a.png")]})
    api_error(refused, 400, "invalid_request", "prompt", "NUL")
    kept = client.post("/api/batches", content_type="multipart/form-data",
                       data={"prompt": "Tag.", "files": [(io.BytesIO(png_bytes()), "we\x00ird.png")]})
    assert kept.status_code == 202, kept.get_json()
    with services_of(app).session_factory() as db:
        assert db.scalars(select(Job.item_name)).all() == ["we\ufffdird.png"]


def test_csv_results_defuse_spreadsheet_formulas(app: Flask, client: FlaskClient):
    heartbeat(app)
    names = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "plain.png"]
    batch = client.post("/api/batches", json={"items": [{"prompt": "p", "image": IMAGE, "name": n} for n in names]})
    batch_id = batch.get_json()["batch_id"]
    table = client.get(f"/api/batches/{batch_id}/results?format=csv").get_data(as_text=True)
    rows = list(csv.reader(io.StringIO(table, newline="")))[1:]
    assert [row[1] for row in rows] == ["'" + n for n in names[:-1]] + ["plain.png"]
    as_json = client.get(f"/api/batches/{batch_id}/results").get_json()["results"]
    assert [item["name"] for item in as_json] == names  # only the spreadsheet format is defused


def test_an_upload_is_invisible_to_workers_until_it_commits_and_an_abandoned_one_is_reaped(app: Flask):
    from common.jobspec import SamplingSpec, StopSpec
    from web.services.batches import BatchWriter, PreparedItem

    svc = services_of(app)
    with svc.session_factory() as db:
        writer = BatchWriter(db, svc.celery, source="upload")
        for i in range(3):
            writer.add(PreparedItem(prompt=f"p{i}", sampling=SamplingSpec(), stop=StopSpec()))
        writer.flush()  # written, as a slow upload's first items are, but the upload goes on
        assert db.scalar(select(Batch.total).where(Batch.id == writer.batch_id)) == 0
        assert jobs.claim_next(db, "w", 30, 3, limit=8, queues=("chat", "batch")) == []
        # The web died mid-upload: nothing more comes. Once abandoned, the reaper removes it.
        assert jobs.reap_abandoned_batches(db, abandon_s=600) == []
        long_ago = utcnow() - timedelta(hours=1)
        db.execute(update(Batch).where(Batch.id == writer.batch_id).values(created_at=long_ago))
        db.execute(update(Job).where(Job.batch_id == writer.batch_id).values(created_at=long_ago))
        db.commit()
        assert jobs.reap_abandoned_batches(db, abandon_s=600) == [writer.batch_id]
        assert db.scalar(select(Batch.id).where(Batch.id == writer.batch_id)) is None
        assert db.scalars(select(Job.id).where(Job.batch_id == writer.batch_id)).all() == []

        complete = BatchWriter(db, svc.celery, source="upload")
        complete.add(PreparedItem(prompt="p", sampling=SamplingSpec(), stop=StopSpec()))
        complete.commit()
        assert [j.batch_id for j in jobs.claim_next(db, "w", 30, 3, limit=8, queues=("batch",))] == [complete.batch_id]
