"""Hardening on SQLite and Postgres: CORS closed unless origins are listed, security headers on the pages and the
API, small body limits on every route but the image-carrying ones, and no production start with a default password."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from PIL import Image
from sqlalchemy.engine import make_url

from common.deployment import UnsafeDeployment
from common.keys import create_key
from tests import webfixtures
from tests.webfixtures import REDIS_URL, b64, build_app, heartbeat, png_bytes, services_of
from web.auth import EXTENSION_KEY as GATE_KEY
from web.security import CONTENT_SECURITY_POLICY, LARGE_BODY_ENDPOINTS, SMALL_BODY_BYTES

db_url = webfixtures.db_url  # the fixture, bound by assignment: the root conftest belongs to the whole suite

ROOT = Path(__file__).resolve().parent.parent
LISTED = "https://app.example.com"
OTHER = "https://evil.example.net"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.fixture
def make_app(db_url: str, tmp_path: Path) -> Iterator[Any]:
    """Build apps with setting overrides on an empty database and Redis DB; close them afterwards."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = build_app(db_url, tmp_path, **overrides)
        if not made:  # a fresh test: no rows, and the gate forgets the keys it saw at start-up
            webfixtures._empty_database(services_of(app))
            gate_of(app).forget()
        made.append(app)
        return app

    yield make
    for app in made:
        services_of(app).close()


def gate_of(app: Flask) -> Any:
    return app.extensions[GATE_KEY]


def _cors_headers(response: Any) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


# --- CORS ------------------------------------------------------------------------------------------------------------

def test_cors_is_closed_when_no_origin_is_listed(make_app):
    client = make_app().test_client()
    answer = client.get("/api/health", headers={"Origin": LISTED})
    assert answer.status_code in (200, 503) and _cors_headers(answer) == {}
    preflight = client.options("/api/jobs", headers={"Origin": LISTED, **PREFLIGHT})
    assert _cors_headers(preflight) == {}, "a browser must refuse the cross-origin POST"


def test_cors_answers_listed_origins_only_and_never_with_credentials(make_app):
    app = make_app(cors_origins=f"{LISTED}/, http://localhost:3000", key_cache_s=0)
    with services_of(app).session_factory() as db:
        secret = create_key(db, "team-a").secret  # keys required from now on
    client = app.test_client()

    preflight = client.options("/api/jobs", headers={"Origin": LISTED, **PREFLIGHT})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == LISTED  # the trailing slash was normalised
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert set(preflight.headers["Access-Control-Allow-Headers"].lower().split(", ")) == {"authorization",
                                                                                          "content-type"}
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    assert _cors_headers(client.options("/api/jobs", headers={"Origin": OTHER, **PREFLIGHT})) == {}

    # A real call from the listed origin, with its key: readable, and so is a refusal (the page can show it).
    ok = client.get("/api/jobs/job_missing", headers={"Origin": LISTED, "Authorization": f"Bearer {secret}"})
    assert ok.status_code == 404 and ok.headers["Access-Control-Allow-Origin"] == LISTED
    assert {"retry-after", "location"} <= set(ok.headers["Access-Control-Expose-Headers"].lower().split(", "))
    assert "Origin" in ok.headers.get("Vary", "")
    refused = client.get("/api/jobs/job_missing", headers={"Origin": LISTED})
    assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == LISTED
    assert _cors_headers(client.get("/api/jobs/job_missing",
                                    headers={"Origin": OTHER, "Authorization": f"Bearer {secret}"})) == {}
    # The pages are not an API: no CORS there even for a listed origin.
    assert _cors_headers(client.get("/", headers={"Origin": LISTED})) == {}


def test_a_wildcard_origin_never_comes_with_credentials(make_app):
    client = make_app(cors_origins="*").test_client()
    answer = client.options("/v1/chat/completions", headers={"Origin": OTHER, **PREFLIGHT})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers


@pytest.mark.parametrize("origins", ["*, https://app.example.com", "app.example.com", "https://app.example.com/ui",
                                     "https://.*\\.example\\.com", "ftp://files.example.com"])
def test_a_malformed_origin_list_stops_the_start(db_url: str, tmp_path: Path, origins: str):
    with pytest.raises(ValueError, match="VLGATE_CORS_ORIGINS"):
        build_app(db_url, tmp_path, cors_origins=origins)


# --- headers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/batch"])
def test_pages_carry_every_security_header(make_app, path: str):
    answer = make_app().test_client().get(path)
    assert answer.status_code == 200 and answer.mimetype == "text/html"
    assert answer.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert "camera=()" in answer.headers["Permissions-Policy"]


def test_api_answers_are_nosniff_and_not_stored_unless_they_say_otherwise(make_app):
    app = make_app()
    client = app.test_client()
    for answer in (client.get("/api/health"), client.get("/api/jobs/job_missing"), client.get("/v1/models"),
                   client.get("/api/nowhere")):
        assert answer.headers["X-Content-Type-Options"] == "nosniff", answer.request.path
        assert answer.headers["Cache-Control"] == "no-store", answer.request.path
        assert "Content-Security-Policy" not in answer.headers  # JSON is not a page
    heartbeat(app)
    created = client.post("/api/jobs", json={"prompt": "hi", "image": b64(png_bytes())})
    assert created.status_code == 202, created.get_json()
    session = client.get(f"/api/sessions/{created.get_json()['session_id']}").get_json()
    image_id = session["messages"][0]["image_ids"][0]
    image = client.get(f"/api/images/{image_id}")
    # Image bytes keep their own cache rule (content-addressed and private), and are never sniffed.
    assert image.status_code == 200 and "immutable" in image.headers["Cache-Control"]
    assert image.headers["X-Content-Type-Options"] == "nosniff"
    static = client.get("/static/app.js")
    assert static.headers["X-Content-Type-Options"] == "nosniff"


# --- body sizes ------------------------------------------------------------------------------------------------------

def _path(rule: Any) -> str:
    """Fill a rule's variables with a placeholder."""
    path = rule.rule
    for argument in rule.arguments:
        path = path.replace(f"<{argument}>", "x").replace(f"<path:{argument}>", "x")
    return path


def test_every_small_route_refuses_a_large_body_with_413_in_its_shape(make_app):
    app = make_app()
    client = app.test_client()
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    registered = {name for name in LARGE_BODY_ENDPOINTS if name.split(".")[0] in app.blueprints}
    assert registered >= {"api.chat", "api.create_batch", "openai.chat_completions"}
    assert endpoints >= registered, f"renamed or gone: {registered - endpoints}"
    body = b'{"key": "' + b"x" * SMALL_BODY_BYTES + b'"}'
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in LARGE_BODY_ENDPOINTS:
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            answer = client.open(_path(rule), method=method, data=body, content_type="application/json")
            where = f"{method} {rule.rule}"
            assert answer.status_code == 413, f"{where}: {answer.status_code}"
            error = answer.get_json()["error"]
            assert error["code"] == "payload_too_large" and "64 KiB" in error["message"], where
            if rule.rule.startswith("/v1/"):
                assert error["type"] == "invalid_request_error", where  # OpenAI's shape
            checked += 1
    assert checked >= 15
    # A chunked body has no Content-Length: the limit holds while it is read (gunicorn terminates the stream).
    chunked = client.post("/api/auth/login", input_stream=io.BytesIO(body), content_type="application/json",
                          headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert chunked.request.content_length is None
    assert chunked.status_code == 413 and chunked.get_json()["error"]["code"] == "payload_too_large"
    at_limit = b" " * (SMALL_BODY_BYTES - 2) + b"{}"  # exactly the limit, chunked: past the size check
    login = client.post("/api/auth/login", input_stream=io.BytesIO(at_limit), content_type="application/json",
                        headers={"Transfer-Encoding": "chunked"}, environ_overrides={"wsgi.input_terminated": True})
    assert login.status_code == 401 and login.get_json()["error"]["code"] == "invalid_api_key", login.get_json()
    # Under the limit, a small route works as before: a login with a real key.
    with services_of(app).session_factory() as db:
        secret = create_key(db, "team-a").secret
    assert client.post("/api/auth/login", json={"key": secret}).status_code == 200


def _noise_png(seed: int) -> bytes:
    """Encode a small PNG of random pixels (it does not compress: about 3 KiB)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (36, 30), bytes(rng.getrandbits(8) for _ in range(36 * 30 * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_routes_keep_the_large_limit_and_uploads_their_streaming_one(make_app):
    # A small app limit (one 4 KiB image: about 1 MiB in all) so that the bodies stay small in the test.
    app = make_app(max_image_bytes=4096, max_images_per_request=1)
    limit = app.config["MAX_CONTENT_LENGTH"]
    assert 1 << 20 < limit < (1 << 20) + 8192
    heartbeat(app)
    client = app.test_client()
    image = b64(png_bytes())
    # Past 64 KiB but under the app's limit: the image routes take it (a long prompt of 3-byte characters).
    long_prompt = "中" * 30_000
    for path, body in (("/api/jobs", {"prompt": long_prompt, "image": image}),
                       ("/api/batches", {"items": [{"prompt": long_prompt, "image": image}] * 2}),
                       # an unknown model: answered (404) after the whole body was read and parsed
                       ("/v1/chat/completions", {"model": "no-such-model", "messages": [
                           {"role": "user", "content": long_prompt}]})):
        assert len(json.dumps(body)) > SMALL_BODY_BYTES
        answer = client.post(path, json=body)
        assert answer.status_code == (404 if path.startswith("/v1/") else 202), (path, answer.get_json())
    # Past the app's limit: 413 in the endpoint's shape.
    huge = client.post("/api/batches", json={"items": [{"prompt": long_prompt, "image": image}] * 12})
    assert huge.status_code == 413 and huge.get_json()["error"]["code"] == "payload_too_large"
    huge_v1 = client.post("/v1/chat/completions", json={"model": "demo", "messages": [
        {"role": "user", "content": long_prompt}] * 12})
    assert huge_v1.status_code == 413 and huge_v1.get_json()["error"]["type"] == "invalid_request_error"
    # A multipart upload streams past the app's limit under its own (GiB) limit.
    files = [(io.BytesIO(_noise_png(i)), f"img_{i:03d}.png", "image/png") for i in range(400)]
    upload = client.post("/api/batches", data={"prompt": "Tag it.", "max_tokens": "2", "files": files},
                         content_type="multipart/form-data")
    assert upload.request.content_length > limit
    assert upload.status_code == 202, upload.get_json()
    assert upload.get_json()["total"] == 400
    if "openai_batches" in app.blueprints:  # /v1/files streams under its own limit too
        line = json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "demo", "messages": [{"role": "user", "content": "x" * 900}]}})
        jsonl = ("\n".join([line] * 1200) + "\n").encode()
        assert len(jsonl) > limit
        stored = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(jsonl), "in.jsonl")},
                             content_type="multipart/form-data")
        assert stored.status_code == 200, stored.get_json()


# --- production refuses the default database password ----------------------------------------------------------------

def _with_password(url: str, password: str) -> str:
    return make_url(url).set(password=password).render_as_string(hide_password=False)


def test_production_refuses_the_default_password_and_development_allows_it(db_url: str, tmp_path: Path):
    if make_url(db_url).get_backend_name() == "sqlite":
        # No password in a SQLite URL: production starts.
        services_of(build_app(db_url, tmp_path, environment="production")).close()
        return
    default = _with_password(db_url, "vlgate")  # the test server trusts local connections: any password works
    with pytest.raises(UnsafeDeployment, match="production.*well-known default password"):
        build_app(default, tmp_path, environment="production")
    services_of(build_app(default, tmp_path, environment="development")).close()
    services_of(build_app(_with_password(db_url, "a-Strong-one-42"), tmp_path, environment="production")).close()


def test_the_worker_and_its_supervisor_refuse_to_start_too(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLGATE_")}
    env.update(VLGATE_ENVIRONMENT="production", VLGATE_DATA_DIR=str(tmp_path), VLGATE_GPUS="none",
               VLGATE_DATABASE_URL="postgresql+psycopg://vlgate:vlgate@postgres:5432/vlgate")
    supervisor = subprocess.run([sys.executable, "scripts/supervise.py"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
    assert supervisor.returncode != 0 and "refusing to start" in supervisor.stderr, supervisor.stderr
    assert "starting" not in supervisor.stdout  # no worker was started to fail over and over
    worker = subprocess.run([sys.executable, "-c", "import worker.celery_app"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode != 0 and "UnsafeDeployment: refusing to start" in worker.stderr, worker.stderr[-2000:]
