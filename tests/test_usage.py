"""Usage accounting: atomic per-key-per-day counters on SQLite and Postgres, tokens counted once when a job
finishes, ``GET /api/usage`` scoped to the caller's key, and a real worker stack whose report adds up."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from sqlalchemy import select

from common import jobs
from common.db import make_engine, make_session_factory
from common.keys import create_key
from common.models import ApiKey, Job, UsageDay
from common.usage import add_usage, today
from devtools import live
from devtools.databases import make_image
from tests.conftest import store_queued_job
from tests.webfixtures import app, db_url, services_of  # noqa: F401 - fixtures

DAY = date(2026, 3, 1)


def usage_of(factory: Any, key_id: str, day: date) -> UsageDay | None:
    with factory() as db:
        return db.get(UsageDay, (key_id, day))


def test_concurrent_additions_are_never_lost(database_url: str):
    factory = make_session_factory(make_engine(database_url))
    start = threading.Barrier(6)

    def add_many() -> None:
        start.wait()
        for _ in range(20):
            with factory() as db:
                add_usage(db, "key_a", "team-a", day=DAY, requests=1, jobs=2, images=1, prompt_tokens=7)
                db.commit()

    threads = [threading.Thread(target=add_many) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    row = usage_of(factory, "key_a", DAY)
    assert (row.requests, row.jobs, row.images, row.prompt_tokens, row.completion_tokens) == (120, 240, 120, 840, 0)
    with factory() as db:
        add_usage(db, None, "default", day=DAY, jobs=1)  # the open gateway counts under "-"
        db.commit()
    assert usage_of(factory, "-", DAY).jobs == 1


def test_a_job_finished_twice_counts_its_tokens_once(database_url: str):
    factory = make_session_factory(make_engine(database_url))
    with factory() as db:
        job_id = store_queued_job(db, tenant="team-a", key_id="key_a")
        assert jobs.claim(db, job_id, "w1", lease_s=30, max_attempts=3)
        outcome = jobs.Outcome("succeeded", response="hi", prompt_tokens=30, completion_tokens=5)
        assert jobs.finish(db, job_id, "w1", outcome)
        assert not jobs.finish(db, job_id, "w1", outcome)  # a second finish writes nothing
        assert not jobs.finish(db, job_id, "w2", outcome)  # nor does a worker that never held it
    row = usage_of(factory, "key_a", today())
    assert (row.tenant, row.prompt_tokens, row.completion_tokens, row.requests) == ("team-a", 30, 5, 0)


# -- GET /api/usage on the app -------------------------------------------------------------------------------


@pytest.fixture
def keyed(app: Flask) -> Iterator[tuple[Flask, dict[str, dict[str, str]], dict[str, str]]]:  # noqa: F811
    """The app with keys for two tenants and an admin, and usage on three days."""
    factory = services_of(app).session_factory
    with factory() as db:
        made = {name: create_key(db, name, admin=name == "root") for name in ("team-a", "team-b", "root")}
        ids = {name: new.key.id for name, new in made.items()}
        for offset in range(3):
            add_usage(db, ids["team-a"], "team-a", day=DAY + timedelta(days=offset), jobs=1 + offset, prompt_tokens=10)
        add_usage(db, ids["team-b"], "team-b", day=DAY, jobs=5, completion_tokens=3)
        db.commit()
    app.extensions["vlgate_auth"].forget()  # the gate saw no key a moment ago: keys are required from now on
    headers = {name: {"Authorization": f"Bearer {new.secret}"} for name, new in made.items()}
    yield app, headers, ids


def test_a_key_reads_its_own_usage_and_an_admin_everyone_s(keyed):
    web, headers, ids = keyed
    client = web.test_client()
    own = client.get("/api/usage", headers=headers["team-a"]).json
    assert [(d["day"], d["key_id"], d["usage"]["jobs"]) for d in own["days"]] == [
        ("2026-03-01", ids["team-a"], 1), ("2026-03-02", ids["team-a"], 2), ("2026-03-03", ids["team-a"], 3)]
    assert own["totals"] == {"requests": 0, "jobs": 6, "images": 0, "prompt_tokens": 30, "completion_tokens": 0,
                             "total_tokens": 30}
    with services_of(web).session_factory() as db:
        prefix = db.get(ApiKey, ids["team-a"]).prefix
    assert own["days"][0]["key_prefix"] == prefix and own["days"][0]["key_name"] == "team-a"
    window = client.get("/api/usage?since=2026-03-02&until=2026-03-02", headers=headers["team-a"]).json
    assert [d["day"] for d in window["days"]] == ["2026-03-02"] and window["since"] == "2026-03-02"
    other = client.get("/api/usage", headers=headers["team-b"]).json
    assert {d["key_id"] for d in other["days"]} == {ids["team-b"]} and other["totals"]["total_tokens"] == 3
    every = client.get("/api/usage", headers=headers["root"]).json
    assert {d["key_id"] for d in every["days"]} == {ids["team-a"], ids["team-b"]} and every["totals"]["jobs"] == 11
    only_b = client.get("/api/usage?tenant=team-b", headers=headers["root"]).json
    assert {d["tenant"] for d in only_b["days"]} == {"team-b"}
    by_key = client.get(f"/api/usage?key_id={ids['team-a']}&until=2026-03-01", headers=headers["root"]).json
    assert [d["day"] for d in by_key["days"]] == ["2026-03-01"]


@pytest.mark.parametrize("query, status, code", [
    ("since=2026-3-1", 400, "invalid_request"), ("until=yesterday", 400, "invalid_request"),
    ("since=2026-02-30", 400, "invalid_request"), ("since=2026-03-02&until=2026-03-01", 400, "invalid_request"),
    ("key_id=key_someone_else", 403, "admin_required"), ("tenant=team-b", 403, "admin_required"),
])
def test_bad_queries_are_refused(keyed, query: str, status: int, code: str):
    web, headers, _ = keyed
    answer = web.test_client().get(f"/api/usage?{query}", headers=headers["team-a"])
    assert answer.status_code == status and answer.json["error"]["code"] == code


def test_no_key_no_usage(keyed):
    web, _, _ = keyed
    assert web.test_client().get("/api/usage").status_code == 401


def test_last_used_at_is_written_at_most_once_a_minute(keyed):
    web, headers, ids = keyed
    client = web.test_client()
    factory = services_of(web).session_factory

    def last_used() -> Any:
        with factory() as db:
            return db.get(ApiKey, ids["team-a"]).last_used_at

    assert last_used() is None
    client.get("/api/usage", headers=headers["team-a"])
    first = last_used()
    assert first is not None
    client.get("/api/usage", headers=headers["team-a"])
    assert last_used() == first


# -- a real deployment ---------------------------------------------------------------------------------------


def test_a_worker_stack_reports_each_key_s_jobs_images_and_tokens(tmp_path: Path, data_dir: Path):
    image = base64.b64encode(make_image((64, 48))).decode()
    with live.running_stack("postgres", tmp_path, data_dir, "usage-w", VLGATE_KEY_CACHE_S="0") as stack:
        factory = make_session_factory(make_engine(stack.database_url))
        with factory() as db:
            keys = {name: create_key(db, name, admin=name == "root") for name in ("team-a", "team-b", "root")}
        auth = {name: {"Authorization": f"Bearer {new.secret}"} for name, new in keys.items()}

        def post(name: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
            answer = requests.post(stack.base + path, json=body, headers=auth[name], timeout=60)
            assert answer.status_code in (200, 202), answer.text
            return answer.json()

        small = {"max_tokens": 4, "temperature": 0}
        post("team-a", "/api/chat", {"prompt": "What is this?", "image": image, **small})
        post("team-a", "/api/chat", {"prompt": "And this?", "images": [image, image], **small})
        post("team-a", "/api/batches", {"items": [{"prompt": "one", "image": image, **small},
                                                  {"prompt": "two", **small}]})
        post("team-b", "/api/chat", {"prompt": "Hello", **small})
        post("team-b", "/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 3})

        def finished() -> list[Job] | None:
            with factory() as db:
                rows = list(db.scalars(select(Job)))
            return rows if len(rows) == 6 and all(r.status in ("succeeded", "failed") for r in rows) else None

        done = live.wait_until(finished, 60, 0.2, "every job to finish")
        assert all(row.status == "succeeded" and row.completion_tokens for row in done)

        def report(name: str) -> dict[str, Any]:
            answer = requests.get(f"{stack.base}/api/usage", headers=auth[name], timeout=10)
            assert answer.status_code == 200, answer.text
            return answer.json()

        expected = {name: (3 if name == "team-a" else 2, 4 if name == "team-a" else 2, 4 if name == "team-a" else 0)
                    for name in ("team-a", "team-b")}
        for name, (requests_made, jobs_made, images) in expected.items():
            own = [row for row in done if row.key_id == keys[name].key.id]
            body = report(name)
            assert {day["key_id"] for day in body["days"]} == {keys[name].key.id}  # only its own
            assert body["totals"] == {
                "requests": requests_made, "jobs": jobs_made, "images": images,
                "prompt_tokens": sum(row.prompt_tokens for row in own),
                "completion_tokens": sum(row.completion_tokens for row in own),
                "total_tokens": sum(row.prompt_tokens + row.completion_tokens for row in own),
            }
        every = report("root")
        assert {day["key_prefix"] for day in every["days"]} == {keys["team-a"].key.prefix, keys["team-b"].key.prefix}
        assert every["totals"]["completion_tokens"] == sum(row.completion_tokens for row in done)
