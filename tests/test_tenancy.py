"""Tenant isolation on SQLite and Postgres: another tenant's id is a 404 on every route that takes one, over
HTTP and WebSocket, and touches nothing; admins see every tenant; image de-duplication stays per tenant.

The matrix is derived from ``app.url_map``: every route with an ``*_id`` argument is tried with every
method it allows, and a new id route that the matrix cannot fill fails the test instead of going untested.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from simple_websocket import Client, ConnectionClosed
from sqlalchemy import MetaData, select
from werkzeug.routing import Rule
from werkzeug.serving import make_server

from common import jobs
from common.keys import prefix_of
from common.models import ApiKey, Job, StoredImage
from tests import webfixtures
from tests.webfixtures import WORKER_ID, b64, bearer, heartbeat, make_key, png_bytes, queue_length, services_of

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

IMAGE = png_bytes(color=(10, 200, 90))
# Routes whose id names no tenant's row, with the reason (anything else with an id must be in FILL).
NOT_TENANT_OWNED = {"openai.read_model": "the served model is the same for every tenant"}
# (the route's first path segment, an id argument) -> (the kind of tenant A's things that fill it, the 404 code
# another tenant gets). Keyed by the segment too: /v1's ids (files, batches) are other things than /api's.
FILL = {("api", "job_id"): ("jobs", "job_not_found"), ("api", "session_id"): ("sessions", "session_not_found"),
        ("api", "batch_id"): ("batches", "batch_not_found"), ("api", "image_id"): ("images", "not_found"),
        ("ws", "job_id"): ("jobs", "job_not_found"), ("v1", "file_id"): ("files", "file_not_found"),
        ("v1", "batch_id"): ("openai_batches", "batch_not_found")}
RESULT_FORMATS = ("", "?format=json", "?format=jsonl", "?format=csv")  # every GET is tried with each




def snapshot(app: Flask, own_key: str | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the database, in a fixed order; the caller's own key bookkeeping is left out
    (``last_used_at`` and the usage row of ``own_key``: counting its own requests is not touching A's rows)."""
    tables = MetaData()
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with services_of(app).engine.connect() as conn:
        tables.reflect(bind=conn)  # what the database holds, not what the models say
        for table in tables.sorted_tables:
            columns = [c for c in table.columns if not (table.name == "api_keys" and c.name == "last_used_at")]
            query = select(*columns).order_by(*(table.primary_key.columns or columns))
            if table.name == "usage_days" and own_key is not None:
                query = query.where(table.c.key_id != own_key)
            rows[table.name] = [tuple(row) for row in conn.execute(query)]
    assert {"sessions", "messages", "images", "jobs", "batches", "api_keys"} <= set(rows)
    return rows


def key_id(app: Flask, secret: str) -> str:
    """Return the id of the key a secret belongs to."""
    with services_of(app).session_factory() as db:
        return db.scalars(select(ApiKey.id).where(ApiKey.prefix == prefix_of(secret))).one()


@dataclass
class World:
    """Tenant A's things, and the keys of A, B and an admin."""

    a: str
    b: str
    admin: str
    things: dict[str, list[str]] = field(default_factory=dict)


def upload_batch(client: FlaskClient, headers: dict[str, str]) -> str:
    """Create a batch from a multipart upload (text fields first, then the files) and return its id."""
    files = [(io.BytesIO(png_bytes(color=(i * 40, 10, 10))), f"u{i}.png") for i in range(2)]
    response = client.post("/api/batches", headers=headers, content_type="multipart/form-data",
                           data={"prompt": "Tag it.", "max_tokens": "8", "files": files})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["batch_id"]


def openai_batch(client: FlaskClient, headers: dict[str, str]) -> tuple[str, str]:
    """Upload a /v1 batch input file and start a batch of it; return (file id, batch id). No keeper runs in a test
    app (gunicorn starts it), so the batch rests in ``validating``."""
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    jsonl = io.BytesIO(json.dumps(line).encode() + b"\n")
    uploaded = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                           data={"purpose": "batch", "file": (jsonl, "in.jsonl")})
    assert uploaded.status_code == 200, uploaded.get_json()
    file_id = uploaded.get_json()["id"]
    made = client.post("/v1/batches", headers=headers, json={"input_file_id": file_id, "completion_window": "24h",
                                                             "endpoint": "/v1/chat/completions"})
    assert made.status_code == 200, made.get_json()
    return file_id, made.get_json()["id"]


@pytest.fixture
def world(app: Flask, client: FlaskClient) -> World:
    """Tenant A has a running chat job (with a streamed token) in a session with an image, a JSON batch and an
    uploaded batch; B and an admin have keys and nothing else."""
    heartbeat(app, ttl_s=600)
    world = World(a=make_key(app, "team-a"), b=make_key(app, "team-b"), admin=make_key(app, "ops", admin=True))
    mine = bearer(world.a)
    job = client.post("/api/jobs", headers=mine, json={"prompt": "What is this?", "image": b64(IMAGE)}).get_json()
    with services_of(app).session_factory() as db:
        assert jobs.claim(db, job["job_id"], WORKER_ID, lease_s=600, max_attempts=3) is not None
    services_of(app).bus.publish(job["job_id"], {"type": "token", "seq": 1, "text": "Hello"})
    session = client.get(f"/api/sessions/{job['session_id']}", headers=mine).get_json()
    items = [{"prompt": "One?", "image": b64(IMAGE), "name": "one.png"}, {"prompt": "Two?"}]
    batch = client.post("/api/batches", headers=mine, json={"items": items}).get_json()["batch_id"]
    uploaded = upload_batch(client, mine)
    with services_of(app).session_factory() as db:
        items_ids = list(db.scalars(select(Job.id).where(Job.batch_id.in_([batch, uploaded])).order_by(Job.id)))
    world.things = {"jobs": [job["job_id"], *items_ids], "sessions": [job["session_id"]],
                    "batches": [batch, uploaded], "images": session["messages"][0]["image_ids"]}
    if "openai_batches.upload_file" in app.view_functions:  # the /v1 Batch API
        file_id, openai_batch_id = openai_batch(client, mine)
        world.things.update(files=[file_id], openai_batches=[openai_batch_id])
    assert all(world.things.values()) and len(items_ids) == 4
    return world


def id_rules(app: Flask) -> Iterator[tuple[Rule, list[str]]]:
    """Yield every route with an id argument that names a tenant's row, with those arguments."""
    for rule in app.url_map.iter_rules():
        ids = sorted(arg for arg in rule.arguments if arg.endswith("_id"))
        if ids and rule.endpoint not in NOT_TENANT_OWNED:
            yield rule, ids


def fills(rule: Rule, ids: list[str]) -> list[tuple[str, str]]:
    """Return how to fill each id of a rule; fail, naming the rule, if the matrix does not know one."""
    segment = rule.rule.strip("/").split("/")[0]
    unknown = [arg for arg in ids if (segment, arg) not in FILL]
    assert not unknown, f"{rule.rule}: the tenancy matrix cannot fill {unknown}; add them to FILL (or the route " \
                        "to NOT_TENANT_OWNED, with a reason)"
    return [FILL[(segment, arg)] for arg in ids]


def filled(rule: Rule, ids: list[str], world: World) -> Iterator[tuple[str, str]]:
    """Yield (path, expected 404 code) for every combination of A's things that fills a rule."""
    how = fills(rule, ids)
    for values in itertools.product(*(world.things[kind] for kind, _ in how)):
        path = rule.build(dict(zip(ids, values, strict=True)))[1]
        yield path, how[0][1]


def test_the_matrix_covers_every_id_route(app: Flask) -> None:
    routes = {rule.rule for rule, _ in id_rules(app)}
    assert {"/api/jobs/<job_id>", "/api/sessions/<session_id>", "/api/batches/<batch_id>",
            "/api/batches/<batch_id>/results", "/api/images/<image_id>", "/ws/jobs/<job_id>"} <= routes
    for rule, ids in id_rules(app):
        fills(rule, ids)


def test_another_tenants_ids_are_404_everywhere_and_touch_nothing(app: Flask, client: FlaskClient,
                                                                  world: World) -> None:
    svc = services_of(app)
    before, queued = snapshot(app, key_id(app, world.b)), queue_length(app, "chat") + queue_length(app, "batch")
    tried = 0
    for rule, ids in id_rules(app):
        if rule.rule.startswith("/ws/"):
            continue  # WebSockets: see the next test
        for path, code in filled(rule, ids, world):
            for method in sorted((rule.methods or set()) - {"OPTIONS"}):
                for query in RESULT_FORMATS if method in ("GET", "HEAD") else ("",):
                    their = client.open(path + query, method=method, headers=bearer(world.b))
                    assert their.status_code == 404, (method, path + query, their.get_data(as_text=True)[:300])
                    if method != "HEAD":
                        assert their.get_json()["error"]["code"] == code, (method, path)
                    if method in ("GET", "HEAD"):  # the ids are real: their owner and an admin see them
                        for who in (world.a, world.admin):
                            seen = client.open(path + query, method=method, headers=bearer(who))
                            assert seen.status_code == 200, (method, path + query, seen.get_data(as_text=True)[:300])
                    tried += 1
    assert tried >= 40, tried
    assert snapshot(app, key_id(app, world.b)) == before
    assert queue_length(app, "chat") + queue_length(app, "batch") == queued
    assert svc.bus.cancelled(world.things["jobs"]) == set()  # no cancel flag was raised for a running job


def test_admin_acts_on_every_tenant(app: Flask, client: FlaskClient, world: World) -> None:
    admin = bearer(world.admin)
    job_id = world.things["jobs"][0]
    assert client.delete(f"/api/jobs/{job_id}", headers=admin).status_code == 200
    assert services_of(app).bus.cancelled([job_id]) == {job_id}
    assert client.delete(f"/api/batches/{world.things['batches'][0]}", headers=admin).get_json()["status"] in (
        "cancelled", "running")
    session_id = world.things["sessions"][0]
    assert client.delete(f"/api/sessions/{session_id}", headers=admin).get_json() == {
        "session_id": session_id, "deleted": True}


@pytest.mark.parametrize("endpoint", ["/api/chat", "/api/jobs"])
def test_continuing_another_tenants_session_is_404_and_stores_nothing(app: Flask, client: FlaskClient,
                                                                      world: World, endpoint: str) -> None:
    before = snapshot(app, key_id(app, world.b))
    queued = queue_length(app)
    body = {"prompt": "And now?", "session_id": world.things["sessions"][0], "image": b64(png_bytes(color=(1, 1, 1)))}
    response = client.post(endpoint, headers=bearer(world.b), json=body)
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "session_not_found"
    assert snapshot(app, key_id(app, world.b)) == before and queue_length(app) == queued


def test_image_deduplication_is_per_tenant(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    a, b = make_key(app, "team-a"), make_key(app, "team-b")
    picture = b64(png_bytes(color=(5, 6, 7)))

    def sent_by(secret: str) -> str:
        job = client.post("/api/jobs", headers=bearer(secret), json={"prompt": "hi", "image": picture}).get_json()
        session = client.get(f"/api/sessions/{job['session_id']}", headers=bearer(secret)).get_json()
        return session["messages"][0]["image_ids"][0]

    a_image, b_image, a_again = sent_by(a), sent_by(b), sent_by(a)
    assert a_image != b_image and a_again == a_image
    with services_of(app).session_factory() as db:
        rows = db.execute(select(StoredImage.id, StoredImage.tenant, StoredImage.sha256)).all()
    assert sorted((row.id, row.tenant) for row in rows) == sorted([(a_image, "team-a"), (b_image, "team-b")])
    assert len({row.sha256 for row in rows}) == 1  # the same picture, stored once per tenant
    assert client.get(f"/api/images/{a_image}", headers=bearer(b)).status_code == 404
    assert client.get(f"/api/images/{b_image}", headers=bearer(a)).status_code == 404
    assert client.get(f"/api/images/{a_image}", headers=bearer(a)).data.startswith(b"\x89PNG")


# -- WebSockets, over a real HTTP server in this process ------------------------------------------------


@pytest.fixture
def server(app: Flask) -> Iterator[str]:
    """Serve the app over real sockets (werkzeug, threaded) and yield its ws:// base."""
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(5)


def first_frame(url: str, headers: dict[str, str] | None = None, send: dict[str, Any] | None = None) -> dict:
    """Open a socket, optionally send one message, and return the first frame (fail after 10 s)."""
    ws = Client.connect(url, headers=headers)
    try:
        if send is not None:
            ws.send(json.dumps(send))
        raw = ws.receive(timeout=10)
        assert raw is not None, f"no frame from {url}"
        return json.loads(raw)
    finally:
        try:
            ws.close()
        except (ConnectionClosed, OSError):  # the server may have closed it first (job_socket does, after errors)
            pass


def test_following_another_tenants_job_is_job_not_found(app: Flask, client: FlaskClient, world: World,
                                                        server: str) -> None:
    before = snapshot(app, key_id(app, world.b))
    ws_rules = [(rule, ids) for rule, ids in id_rules(app) if rule.rule.startswith("/ws/")]
    assert ws_rules
    for rule, ids in ws_rules:
        for path, code in filled(rule, ids, world):
            assert first_frame(server + path, bearer(world.b))["error"]["code"] == code, path
            ticket = client.post("/api/auth/ticket", headers=bearer(world.b)).get_json()["ticket"]
            assert first_frame(f"{server}{path}?ticket={ticket}")["error"]["code"] == code, path
    job_id = world.things["jobs"][0]  # the running chat job, with one token on its stream
    for who in (world.a, world.admin):
        frame = first_frame(f"{server}/ws/jobs/{job_id}", bearer(who))
        assert (frame["type"], frame["seq"], frame["text"], frame["job_id"]) == ("token", 1, "Hello", job_id)
    # A chat turn over the socket that names A's session is refused the same way.
    turn = {"type": "chat", "prompt": "And now?", "session_id": world.things["sessions"][0]}
    frame = first_frame(f"{server}/ws/chat", bearer(world.b), send=turn)
    assert frame["type"] == "error" and frame["error"]["code"] == "session_not_found"
    assert snapshot(app, key_id(app, world.b)) == before
