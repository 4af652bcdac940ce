"""API keys on SQLite and Postgres: when keys are required, how they are sent, refused (revoked, expired,
garbage: always 401, never 500) and never echoed; what health shows to whom; the bootstrap admin key; and
the ``keys`` command line, whose secret is printed once and never stored or listed."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.routing import Map

from common.config import get_settings
from common.ids import utcnow
from common.keys import list_keys, new_secret, prefix_of, revoke_key
from common.models import ApiKey, Job
from tests import webfixtures
from tests.webfixtures import ROOT, bearer, build_app, heartbeat, make_key, services_of
from vlgate_cli.cli import main
from web.auth import EXTENSION_KEY, PUBLIC_ENDPOINTS
from web.openapi import openapi_document

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client

SECRET_SHAPE = re.compile(r"vlg_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
REFUSED = {"missing_api_key", "invalid_api_key"}




def random_part(secret: str) -> str:
    """Return what follows a secret's public prefix."""
    return secret[len(prefix_of(secret) or "") + 1:]


def error_code(response: Any) -> str:
    """Return the code of an error in either shape (/api's or OpenAI's)."""
    return response.get_json()["error"]["code"]


def example_path(url_map: Map, endpoint: str, arguments: set[str]) -> str:
    """Build a route's URL with made-up values for its arguments."""
    return url_map.bind("localhost").build(endpoint, {arg: f"x_{arg}" for arg in arguments})


# -- modes -----------------------------------------------------------------------------------------


def test_open_on_loopback_without_keys(app: Flask, client: FlaskClient, db_url: str, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    heartbeat(app)
    assert client.get("/api/auth/whoami").get_json() == {"auth": "open", "signed_in": True, "key": {
        "id": None, "name": "open", "tenant": "default", "prefix": None, "admin": True, "rpm": None, "tpm": None,
        "max_queued": None}}
    job_id = client.post("/api/jobs", json={"prompt": "hi"}).get_json()["job_id"]
    with services_of(app).session_factory() as db:
        job = db.get(Job, job_id)
        assert (job.tenant, job.key_id) == ("default", None)
    with caplog.at_level(logging.INFO, logger="web.auth"):
        services_of(build_app(db_url, tmp_path)).close()
    assert "vlgate runs OPEN" in caplog.text and "keys create" in caplog.text


def test_every_route_but_the_public_ones_needs_a_key_once_one_exists(app: Flask, client: FlaskClient, db_url: str,
                                                                     tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    make_key(app, "team-a")
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        path = example_path(app.url_map, rule.endpoint, set(rule.arguments))
        for method in sorted((rule.methods or set()) - {"OPTIONS", "HEAD"}):
            response = client.open(path, method=method, json={"prompt": "hi"} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.get_data(as_text=True)[:300])
            assert error_code(response) == "missing_api_key", (method, path)
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="vlgate"'
            checked += 1
    assert checked >= 15
    assert client.get("/api/auth/whoami").get_json() == {"auth": "required", "signed_in": False, "key": None}
    message = client.post("/api/jobs", json={"prompt": "hi"}).get_json()["error"]["message"]
    assert "Authorization: Bearer" in message and "X-API-Key" in message
    with caplog.at_level(logging.INFO, logger="web.auth"):
        services_of(build_app(db_url, tmp_path)).close()
    assert "API keys are required" in caplog.text and "OPEN" not in caplog.text


@pytest.mark.parametrize(("overrides", "required"), [
    ({"bind_hosts": ["0.0.0.0"]}, True),
    ({"bind_hosts": ["127.0.0.1", "::1", "10.0.0.5"]}, True),
    ({"auth": "required"}, True),
    ({"bind_hosts": ["127.0.0.1", "[::1]", "localhost"]}, False),
])
def test_mode_without_any_key(app: Flask, db_url: str, tmp_path: Path, overrides: dict[str, Any],
                              required: bool) -> None:
    built = build_app(db_url, tmp_path, **overrides)
    heartbeat(built)
    client = built.test_client()
    assert client.get("/api/auth/whoami").get_json()["auth"] == ("required" if required else "open")
    response = client.post("/api/jobs", json={"prompt": "hi"})
    if required:
        assert response.status_code == 401 and error_code(response) == "missing_api_key"
    else:
        assert response.status_code == 202
    services_of(built).close()


# -- sending keys, and refusing them ---------------------------------------------------------------


def test_both_header_forms_work(app: Flask, client: FlaskClient) -> None:
    secret = make_key(app, "team-a", tenant="alpha")
    for headers in (bearer(secret), {"Authorization": f"bearer   {secret}  "}, {"X-API-Key": secret},
                    {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": secret}):
        me = client.get("/api/auth/whoami", headers=headers).get_json()
        assert me["signed_in"] and me["key"]["prefix"] == prefix_of(secret) and me["key"]["tenant"] == "alpha"


def test_a_revoked_key_is_refused_within_a_second(app: Flask, client: FlaskClient) -> None:
    assert services_of(app).settings.key_cache_s == 1.0  # the default
    secret = make_key(app, "team-a")
    probe = "/api/jobs/job_000000000000000000000000"
    assert error_code(client.get(probe, headers=bearer(secret))) == "job_not_found"  # let in, and now cached
    with services_of(app).session_factory() as db:  # as `keys revoke` does, from another process
        revoke_key(db, prefix_of(secret) or "")
    revoked_at = time.monotonic()
    while (response := client.get(probe, headers=bearer(secret))).status_code != 401:
        assert time.monotonic() - revoked_at < 1.5, "a revoked key still worked after 1.5 s"
        time.sleep(0.02)
    assert error_code(response) == "key_revoked"
    message = response.get_json()["error"]["message"]
    assert f"The API key {prefix_of(secret)}… was revoked on " in message
    assert "ask an administrator for a new one" in message and secret not in message


def test_an_expired_key_is_refused(app: Flask, client: FlaskClient) -> None:
    old = make_key(app, "old", expires_at=utcnow() - timedelta(seconds=1))
    response = client.post("/api/auth/ticket", headers=bearer(old))
    assert response.status_code == 401 and error_code(response) == "key_expired"
    assert "expired on" in response.get_json()["error"]["message"]
    soon = make_key(app, "soon", expires_at=utcnow() + timedelta(seconds=1.2))
    assert client.post("/api/auth/ticket", headers=bearer(soon)).status_code == 200
    time.sleep(1.3)
    assert error_code(client.post("/api/auth/ticket", headers=bearer(soon))) == "key_expired"


def garbage(secret: str) -> list[dict[str, str]]:
    """Headers that carry no valid key: made-up, near misses of a real one, huge, non-ASCII, wrong scheme."""
    near = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    return [
        bearer("garbage"), bearer("vlg_"), bearer("vlg_12345678_"), bearer("vlg_zzzzzzzz_" + "a" * 43),
        bearer(near), bearer(secret + "x"), bearer(secret.upper()), {"X-API-Key": prefix_of(secret) or ""},
        bearer("x" * 20_000), {"X-API-Key": secret + "a" * 10_000},
        {"X-API-Key": "vlg_12345678_" + "é" * 40}, bearer("vlg_ключ_секрет" * 3), bearer("🔑" * 30),
        {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}, {"Authorization": "Bearer    "},
        {"X-API-Key": "   "}, {"Authorization": f"Token {secret}"},
    ]


def test_garbage_keys_are_401_never_500(app: Flask, client: FlaskClient) -> None:
    secret = make_key(app, "team-a")
    for headers in garbage(secret):
        for method, path in (("GET", "/api/jobs/job_000000000000000000000000"), ("POST", "/api/auth/ticket"),
                             ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            response = client.open(path, method=method, headers=headers)
            shown = {name: value[:40] for name, value in headers.items()}
            assert response.status_code == 401, (shown, path, response.get_data(as_text=True)[:300])
            assert error_code(response) in REFUSED, (shown, path)
            text = response.get_data(as_text=True)
            assert all(value.strip() not in text for value in headers.values() if len(value.strip()) > 8)


def test_keys_never_appear_in_any_answer(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    admin = make_key(app, "ops", admin=True)
    secret = make_key(app, "team-a")
    with services_of(app).session_factory() as db:
        hashes = [key.secret_hash for key in list_keys(db)]
    tail = random_part(secret)  # the random part, which no answer may hold even without the prefix
    answers = []
    for who in (secret, admin):
        answers += [client.get("/api/auth/whoami", headers=bearer(who)), client.post("/api/auth/ticket",
                    headers=bearer(who)), client.get("/api/health", headers=bearer(who))]
        job = client.post("/api/jobs", headers=bearer(who), json={"prompt": "hi"})
        answers += [job, client.get(f"/api/jobs/{job.get_json()['job_id']}", headers=bearer(who))]
        answers += [client.open(path, method=method, headers=bearer(who + "x")) for method, path in
                    (("GET", "/api/auth/whoami"), ("POST", "/api/jobs"), ("GET", "/v1/models"))]
        answers.append(client.post("/api/auth/login", json={"key": who}))
        answers.append(client.post("/api/auth/login", json={"key": who + "x"}))
    answers += [client.get("/metrics"), client.get("/"), client.get("/api/openapi.json")]
    for response in answers:
        everything = response.get_data(as_text=True) + "\n" + str(response.headers)
        for needle in (secret, admin, tail, random_part(admin), *hashes):
            assert needle not in everything, response.request.path
    login = next(r for r in answers if r.request.path == "/api/auth/login" and r.status_code == 200)
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


# -- health ----------------------------------------------------------------------------------------


def test_only_admins_get_the_detailed_health_report(app: Flask, client: FlaskClient) -> None:
    heartbeat(app)
    admin, member = make_key(app, "ops", admin=True), make_key(app, "team-a")
    detailed = client.get("/api/health", headers=bearer(admin)).get_json()
    assert detailed["workers"][0]["hostname"] == "testhost" and detailed["model"]
    for headers in (bearer(member), {}, bearer("vlg_12345678_wrong")):
        response = client.get("/api/health", headers=headers)
        assert response.status_code == 200 and response.get_json() == {"status": "ok", "model_ready": True}
        assert b"testhost" not in response.data and b"demo" not in response.data


def test_the_document_asks_for_a_key_exactly_where_the_gate_does(app: Flask) -> None:
    document = openapi_document()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey", "cookie"}
    checked = 0
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation = document["paths"].get(path, {}).get(method.lower())
            if operation is None:  # the pages, WebSockets, /metrics: not part of the JSON API's document
                assert not path.startswith(("/api/", "/v1/")), f"{method} {path} is not documented"
                continue
            public = rule.endpoint in PUBLIC_ENDPOINTS
            assert ({} in operation["security"]) == public, (method, path)
            assert {next(iter(s), None) for s in operation["security"]} - {None} == {"bearer", "apiKey", "cookie"}
            if not public:
                assert "missing_api_key" in operation["responses"]["401"]["description"], (method, path)
            checked += 1
    assert checked >= 15


# -- the bootstrap admin key -----------------------------------------------------------------------


def test_the_bootstrap_admin_key_is_made_once(app: Flask, db_url: str, tmp_path: Path) -> None:
    secret = new_secret()
    apps = [build_app(db_url, tmp_path, admin_key=secret) for _ in range(2)]
    with services_of(app).session_factory() as db:
        (key,) = list_keys(db)
    assert (key.name, key.tenant, key.admin, key.prefix) == ("bootstrap-admin", "admin", True, prefix_of(secret))
    assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest() != secret
    for built in apps:
        me = built.test_client().get("/api/auth/whoami", headers=bearer(secret)).get_json()
        assert me["auth"] == "required" and me["key"]["admin"] is True
        services_of(built).close()
    other = new_secret()
    (tmp_path / "admin.key").write_text(other + "\n")  # a compose secret file ends with a newline
    services_of(build_app(db_url, tmp_path, admin_key_file=tmp_path / "admin.key")).close()
    with services_of(app).session_factory() as db:
        assert sorted(k.prefix for k in list_keys(db)) == sorted([prefix_of(secret), prefix_of(other)])


@pytest.mark.parametrize("bad", ["changeme", "vlg_12345678_short", "vlg_1234567_" + "a" * 43, "sk-" + "a" * 48])
def test_a_malformed_bootstrap_key_refuses_to_start(app: Flask, db_url: str, tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="bootstrap admin key must look like vlg_"):
        build_app(db_url, tmp_path, admin_key=bad)
    with services_of(app).session_factory() as db:
        assert list_keys(db) == []


# -- the keys command line -------------------------------------------------------------------------


@pytest.fixture
def cli(app: Flask, db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner whose commands use the test database (the settings are read again for it)."""
    monkeypatch.setenv("VLGATE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_keys_cli_create_list_revoke(app: Flask, client: FlaskClient, cli: CliRunner) -> None:
    made = cli.invoke(main, ["keys", "create", "--name", "team-a", "--rpm", "60", "--max-queued", "5",
                             "--expires", "30d"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    assert SECRET_SHAPE.fullmatch(secret) and made.stdout == secret + "\n"
    assert "shown only now" in made.stderr and secret not in made.stderr
    admin = cli.invoke(main, ["keys", "create", "--name", "ops", "--admin"]).stdout.strip()
    with services_of(app).session_factory() as db:
        key = db.scalar(select(ApiKey).where(ApiKey.name == "team-a"))
        assert (key.tenant, key.rpm, key.max_queued, key.admin) == ("team-a", 60, 5, False)
        assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert timedelta(days=29) < key.expires_at - utcnow() <= timedelta(days=30)
        stored = repr([tuple(row) for row in db.execute(select(ApiKey.__table__))])
    assert secret not in stored and random_part(secret) not in stored
    app.extensions[EXTENSION_KEY].forget()
    assert client.get("/api/auth/whoami", headers=bearer(secret)).get_json()["key"]["rpm"] == 60

    for args in (["keys", "list"], ["keys", "list", "--json"]):
        listed = cli.invoke(main, args)
        assert listed.exit_code == 0 and prefix_of(secret) in listed.output and prefix_of(admin) in listed.output
        for needle in (secret, admin, key.secret_hash, random_part(secret)):
            assert needle not in listed.output
    lines = cli.invoke(main, ["keys", "list", "--json"]).stdout.splitlines()
    rows = {row["name"]: row for row in map(json.loads, lines)}
    assert rows["ops"]["admin"] is True and "secret_hash" not in rows["ops"]

    revoked = cli.invoke(main, ["keys", "revoke", prefix_of(secret) or ""])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    app.extensions[EXTENSION_KEY].forget()
    assert error_code(client.post("/api/auth/ticket", headers=bearer(secret))) == "key_revoked"
    assert "revoked" in cli.invoke(main, ["keys", "list"]).output
    unknown = cli.invoke(main, ["keys", "revoke", "vlg_00000000"])
    assert unknown.exit_code != 0 and "no single key matches" in unknown.output
    assert cli.invoke(main, ["keys", "create", "--name", "x", "--expires", "someday"]).exit_code != 0


def test_keys_cli_new_secret_is_a_bootstrap_key_and_stores_nothing(app: Flask, cli: CliRunner) -> None:
    printed = cli.invoke(main, ["keys", "new-secret"])
    assert printed.exit_code == 0 and SECRET_SHAPE.fullmatch(printed.stdout.strip())
    with services_of(app).session_factory() as db:
        assert list_keys(db) == []


def test_python_m_vlgate_cli_keys_create(app: Flask, db_url: str) -> None:
    env = {"VLGATE_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "vlgate_cli", "keys", "create", "--name", "team-z"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert SECRET_SHAPE.fullmatch(result.stdout.strip())
    with services_of(app).session_factory() as db:
        (key,) = list_keys(db)
    assert key.prefix == prefix_of(result.stdout.strip()) and key.name == "team-z"
