"""The audit log: one JSON line per request, WebSocket connection and chat turn, written by several gunicorn
processes into one rotating file, with no key, ticket or cookie in it; prompts only when asked for."""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from simple_websocket import Client, ConnectionClosed
from sqlalchemy import select

from common.bus import TokenBus
from common.db import make_engine, make_session_factory
from common.keys import create_key
from common.models import StoredImage
from common.schemas import WorkerStatus
from devtools import live
from devtools.databases import fresh_database, make_image
from tests.webfixtures import REDIS_URL, SimulatedWorker, b64, build_app, heartbeat, png_bytes, services_of

WRONG_KEY = "vlg_0badc0de_" + "x" * 43


def audit_lines(log_dir: Path) -> list[dict[str, Any]]:
    """Read every line of audit.log and its rotated files."""
    return [json.loads(line) for path in sorted(log_dir.glob("audit.log*"))
            for line in path.read_text().splitlines() if line]


def all_text(log_dir: Path) -> str:
    """Return everything written under the log directory (audit files, lock files)."""
    return "".join(path.read_text(errors="replace") for path in log_dir.iterdir() if path.is_file())


def beat(client: redis.Redis) -> None:
    """Announce a loaded worker, as a real one does, so submissions are accepted (jobs just stay queued)."""
    now = time.time()
    TokenBus(client).beat(WorkerStatus(worker_id="audit-w", hostname="h", pid=1, state="idle", device="cpu",
                                       model="demo", model_label="demo", is_demo=True, loaded=True,
                                       started_at=now, last_heartbeat=now), 120.0)


@dataclass
class Deployment:
    base: str
    log_dir: Path
    secret: str
    prefix: str
    key_id: str
    db_url: str


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """gunicorn with two processes sharing one audit file that rotates every few kilobytes; no model worker."""
    tmp = tmp_path_factory.mktemp("audit")
    databases = fresh_database("sqlite", tmp)
    db_url = next(databases)
    with make_session_factory(make_engine(db_url))() as db:
        made = create_key(db, "team-a")
    redis_port, web_port = live.free_port(), live.free_port()
    services = [live.redis_server(redis_port, tmp).start()]
    env = live.stack_env(db_url, f"redis://127.0.0.1:{redis_port}/0", tmp / "data",
                         VLGATE_AUDIT_MAX_BYTES="6000", VLGATE_AUDIT_BACKUPS="500", VLGATE_KEY_CACHE_S="0")
    try:
        live.wait_until(lambda: redis.Redis(port=redis_port).ping(), 10, what="redis")
        beat(redis.Redis(port=redis_port))
        services.append(live.web(web_port, env, tmp, processes=2).start())
        base = f"http://127.0.0.1:{web_port}"
        live.wait_for_web(base)
        yield Deployment(base, tmp / "data" / "logs", made.secret, made.key.prefix, made.key.id, db_url)
    except Exception:
        print("\n".join(service.log() for service in services))
        raise
    finally:
        for service in reversed(services):
            service.stop()
        next(databases, None)


def test_lines_match_requests_one_to_one_across_processes_and_hold_no_secret(deployment: Deployment):
    base, key = deployment.base, {"Authorization": f"Bearer {deployment.secret}"}
    earlier = {line["request_id"] for line in audit_lines(deployment.log_dir)}  # the fixture's wait for the web
    image = base64.b64encode(make_image()).decode()
    calls: list[tuple[str, str, dict[str, Any]]] = (
        [("get", "/api/health", {})] * 20
        + [("get", "/api/jobs/job_000000000000000000000000", {})] * 8  # no key: 401
        + [("get", "/api/jobs/job_000000000000000000000000", {"headers": {"X-API-Key": WRONG_KEY}})] * 8  # 401
        + [("get", "/api/jobs/job_000000000000000000000000", {"headers": key})] * 8  # 404
        + [("get", "/api/nowhere", {"headers": key})] * 4  # 404 without an endpoint
        + [("post", "/api/jobs", {"headers": key, "json": {"prompt": "count the cats", "image": image}})] * 10
        + [("post", "/api/batches", {"headers": key, "json": {"items": [{"prompt": "one", "image": image},
                                                                      {"prompt": "two"}]}})] * 3
        + [("get", "/api/usage?since=2000-01-01", {"headers": key})] * 4
    )
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: requests.request(c[0], base + c[1], timeout=30, **c[2]), calls))
    # The pages' sign-in cookie, and a one-use ticket that opens a socket carrying three turns.
    login = requests.post(f"{base}/api/auth/login", json={"key": deployment.secret}, timeout=10)
    cookie = login.cookies["vlgate_session"]
    assert requests.get(f"{base}/api/auth/whoami", cookies={"vlgate_session": cookie}, timeout=10).json()["signed_in"]
    ticket = requests.post(f"{base}/api/auth/ticket", headers=key, timeout=10).json()["ticket"]
    ws = Client.connect(base.replace("http://", "ws://") + f"/ws/chat?ticket={ticket}")
    frames = []
    try:
        for body in ({"prompt": "first turn"}, {"prompt": "bad turn", "temperature": 9}, {"prompt": "third turn"}):
            ws.send(json.dumps({"type": "chat", **body}))
            frames.append(json.loads(ws.receive(timeout=30)))
    finally:
        try:
            ws.close()
        except ConnectionClosed:
            pass
    assert [f["type"] for f in frames] == ["accepted", "error", "accepted"]
    expected = len(calls) + 4 + 3  # the calls; login, whoami, ticket and the socket; its three turns

    # The socket's line is written when the server sees it closed.
    def new_lines() -> list[dict[str, Any]]:
        return [line for line in audit_lines(deployment.log_dir) if line["request_id"] not in earlier]

    lines = live.wait_until(lambda: (found := new_lines()) and len(found) >= expected and found, 15,
                            what="every audit line")
    assert len(lines) == expected
    assert len(list(deployment.log_dir.glob("audit.log.*"))) >= 2, "the tiny size limit must have rotated the file"
    seen = Counter((line["event"], line["method"], line["path"], line["status"]) for line in lines)
    sent = Counter(("request", method.upper(), path.split("?")[0], answer.status_code)
                   for (method, path, _), answer in zip(calls, answers, strict=True))
    for item, count in sent.items():
        assert seen[item] == count, (item, seen)
    assert len({line["request_id"] for line in lines if line["event"] != "ws_turn"}) == expected - 3

    mine = [line for line in lines if line["key_id"] == deployment.key_id]
    assert all(line["key_prefix"] == deployment.prefix and line["tenant"] == "team-a" for line in mine)
    assert len(mine) == 8 + 4 + 10 + 3 + 4 + 1 + 1 + 1 + 3  # ... login, whoami (cookie), ticket, socket, its turns
    wrong = [line for line in lines if line["status"] == 401 and line["key_prefix"] is not None]
    assert len(wrong) == 8 and {line["key_prefix"] for line in wrong} == {"vlg_0badc0de"}
    assert all(line["key_id"] is None for line in lines if line["status"] == 401)

    jobs = [line for line in lines if line["path"] == "/api/jobs" and line["method"] == "POST"]
    returned = {answer.json()["job_id"] for answer in answers if answer.request.path_url == "/api/jobs"}
    assert {line["job_ids"][0] for line in jobs} == returned and all(len(line["job_ids"]) == 1 for line in jobs)
    assert all(line["prompt_chars"] == len("count the cats") and "prompts" not in line for line in jobs)
    with make_session_factory(make_engine(deployment.db_url))() as db:
        stored = set(db.scalars(select(StoredImage.sha256)))
    batches = [line for line in lines if line["path"] == "/api/batches"]
    assert {line["batch_id"] for line in batches} == {a.json()["batch_id"] for a in answers if "batch_id" in a.json()}
    assert all(line["jobs"] == 2 and line["prompt_chars"] == 6 for line in batches)
    assert all(set(line["image_sha256s"]) <= stored and len(line["image_sha256s"]) == 1 for line in jobs + batches)

    socket_line = next(line for line in lines if line["event"] == "ws_connection")
    assert socket_line["status"] == 101 and socket_line["via"] == "ticket" and socket_line["latency_ms"] > 0
    turns = [line for line in lines if line["event"] == "ws_turn"]
    assert [t["status"] for t in turns] == [202, 400, 202] and turns[1]["error"] == "invalid_request"
    assert [t["job_ids"] for t in turns] == [[frames[0]["job_id"]], [], [frames[2]["job_id"]]]
    assert {t["request_id"] for t in turns} == {socket_line["request_id"]}

    written = all_text(deployment.log_dir)
    for secret in (deployment.secret, WRONG_KEY, ticket, cookie, "Bearer", "count the cats", "first turn"):
        assert secret not in written
    assert socket_line["query"] == "ticket=%5Bredacted%5D"


# -- in-process checks: prompts, proxies, tokens, rotation -------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield from fresh_database("sqlite", tmp_path)


def make_app(sqlite_url: str, tmp_path: Path, **overrides: Any) -> Flask:
    """An open gateway (no key exists) on an empty Redis DB, with a loaded worker announced."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    app = build_app(sqlite_url, tmp_path, **overrides)
    heartbeat(app)
    return app


@pytest.mark.parametrize("audited", [False, True])
def test_prompt_text_only_when_audit_prompts_is_on(sqlite_url: str, tmp_path: Path, audited: bool):
    app = make_app(sqlite_url, tmp_path, audit_prompts=audited)
    worker = SimulatedWorker(app)
    worker.start()
    prompt = "the secret plans are vlg_12345678_" + "y" * 43
    answer = app.test_client().post("/api/chat", json={"prompt": prompt, "image": b64(png_bytes())})
    worker.join(10)
    assert answer.status_code == 200
    [line] = audit_lines(tmp_path / "logs")
    assert line["prompt_chars"] == len(prompt) and line["job_ids"] == [answer.json["job_id"]]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (12, 2)  # known when /api/chat answers
    assert line["key_id"] is None and line["tenant"] == "default"  # the open gateway
    written = all_text(tmp_path / "logs")
    assert ("the secret plans are" in written) is audited
    assert "y" * 43 not in written  # even an audited prompt loses anything shaped like a key
    if audited:
        assert line["prompts"] == ["the secret plans are [redacted]"]
    services_of(app).close()


def test_v1_answer_carries_tokens(sqlite_url: str, tmp_path: Path):
    app = make_app(sqlite_url, tmp_path)
    worker = SimulatedWorker(app)
    worker.start()
    body = {"model": "demo", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hello"}]}
    answer = app.test_client().post("/v1/chat/completions", json=body)
    worker.join(10)
    assert answer.status_code == 200
    [line] = audit_lines(tmp_path / "logs")
    assert line["job_ids"] == [answer.headers["x-request-id"]] and line["prompt_chars"] == len("be brief") + 5
    assert (line["prompt_tokens"], line["completion_tokens"]) == (12, 2)
    services_of(app).close()


def test_forwarded_for_is_believed_only_from_trusted_proxies(sqlite_url: str, tmp_path: Path):
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7, 10.0.0.2"}
    plain = make_app(sqlite_url, tmp_path / "a")
    plain.test_client().get("/api/health", headers=headers)
    proxied = make_app(sqlite_url, tmp_path / "b", trusted_proxies="127.0.0.1,10.0.0.0/8")
    proxied.test_client().get("/api/health", headers=headers)
    assert [line["client"] for line in audit_lines(tmp_path / "a" / "logs")] == ["127.0.0.1"]
    # Read from the right: the first hop that is not a trusted proxy; 6.6.6.6 could be made up by the client.
    assert [line["client"] for line in audit_lines(tmp_path / "b" / "logs")] == ["203.0.113.7"]
    services_of(plain).close()
    services_of(proxied).close()


def test_file_rotates_and_keeps_every_line(sqlite_url: str, tmp_path: Path):
    app = make_app(sqlite_url, tmp_path, audit_max_bytes=2000, audit_backups=100)
    client = app.test_client()
    for index in range(60):
        assert client.get(f"/api/nowhere/{index}").status_code == 404
    log_dir = tmp_path / "logs"
    assert len(list(log_dir.glob("audit.log.*"))) >= 5
    # The handler checks the size before each write, so a file ends at most one line past the limit.
    assert all(path.stat().st_size < 2000 + 1000 for path in log_dir.glob("audit.log*"))
    assert sorted(line["path"] for line in audit_lines(log_dir)) == sorted(f"/api/nowhere/{i}" for i in range(60))
    services_of(app).close()


def test_audit_lines_stay_out_of_the_app_log(sqlite_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    app = make_app(sqlite_url, tmp_path, log_format="json")  # JSON: a propagated line would show its fields
    app.test_client().get("/api/nowhere/marker-path")
    assert "marker-path" not in capfd.readouterr().err
    assert [line["path"] for line in audit_lines(tmp_path / "logs")] == ["/api/nowhere/marker-path"]
    services_of(app).close()
