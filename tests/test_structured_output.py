"""``response_format`` on the ``/api`` entry points: checked by the grammar engine before anything is stored,
carried in every job's spec (chat turns, JSON batch items, multipart uploads)."""

from __future__ import annotations

import io
import json

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from common.models import Job
from tests import webfixtures
from tests.webfixtures import b64, heartbeat, png_bytes, row_counts, services_of

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

SCHEMA = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True}}
IMAGE = b64(png_bytes())


def specs(app: Flask) -> list[dict]:
    with services_of(app).session_factory() as db:
        return [job.spec for job in db.scalars(select(Job).order_by(Job.created_at, Job.batch_index))]


def test_chat_turns_and_json_batch_items_carry_the_format(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    turn = client.post("/api/jobs", json={"prompt": "Colour?", "image": IMAGE, "response_format": FORMAT,
                                          "presence_penalty": 0.5})
    assert turn.status_code == 202, turn.get_json()
    batch = client.post("/api/batches", json={"items": [
        {"prompt": "Colour?", "image": IMAGE, "response_format": {"type": "json_object"}},
        {"prompt": "Describe.", "image": IMAGE},
    ]})
    assert batch.status_code == 202, batch.get_json()
    chat, tagged, free = specs(app)
    assert chat["sampling"]["response_format"] == FORMAT and chat["sampling"]["presence_penalty"] == 0.5
    assert tagged["sampling"]["response_format"] == {"type": "json_object"}
    assert free["sampling"]["response_format"] is None
    text = client.post("/api/jobs", json={"prompt": "Hi", "response_format": {"type": "text"}})
    assert text.status_code == 202 and specs(app)[-1]["sampling"]["response_format"] is None  # free text


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "("}}}}}, ["response_format", "regex", "unclosed group"]),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                      "maximum": 1}}}, ["response_format"]),
    ({"type": "json_schema"}, ["json_schema: required"]),
    ({"type": "yaml"}, ["response_format.type"]),
    ("{not json", ["response_format", "JSON object"]),
])
def test_a_format_the_engine_cannot_compile_is_a_400_and_stores_nothing(app: Flask, client: FlaskClient, fmt,
                                                                      words) -> None:
    heartbeat(app)
    before = row_counts(app)
    response = client.post("/api/chat", json={"prompt": "Colour?", "response_format": fmt})
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_request" and all(w in error["message"] for w in words), error
    assert row_counts(app) == before
    batch = client.post("/api/batches", json={"items": [{"prompt": "x", "image": IMAGE, "response_format": fmt}]})
    assert batch.status_code == 400 and "items.0.response_format" in batch.get_json()["error"]["message"]
    assert row_counts(app) == before


def test_an_upload_takes_the_format_as_a_form_field(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    data = {"prompt": "Colour?", "response_format": json.dumps(FORMAT),
            "files": [(io.BytesIO(png_bytes(color=(i, 9, 9))), f"{i}.png") for i in range(3)]}
    response = client.post("/api/batches", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    assert [s["sampling"]["response_format"] for s in specs(app)] == [FORMAT] * 3
    bad = {"prompt": "Colour?", "response_format": "{", "files": [(io.BytesIO(png_bytes()), "a.png")]}
    refused = client.post("/api/batches", data=bad, content_type="multipart/form-data")
    assert refused.status_code == 400 and "response_format" in refused.get_json()["error"]["message"]
    assert len(specs(app)) == 3
