"""The admission gate's two paths (web/quotas.py): far below the caps submissions are admitted side by side
without the lock, yet every submission still in flight counts toward the cap, so concurrent ones near it are
admitted exactly up to it; an in-flight mark left by a dead process expires instead of blocking the gate.

Direct calls to ``admission`` on SQLite and Postgres with a real Redis; the 500-request burst against real
gunicorn is in ``test_quotas_live.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask

from common.errors import ApiError
from common.ids import new_id, utcnow
from common.models import Job
from common.queue import CHAT_QUEUE
from tests import webfixtures
from tests.webfixtures import build_app, row_counts, services_of
from web import quotas

db_url, app = webfixtures.db_url, webfixtures.app


@pytest.fixture
def capped(app: Flask, db_url: str, tmp_path: Any) -> Iterator[Flask]:
    """An app whose chat queue takes 5 waiting jobs, on the fixture's emptied database and Redis DB."""
    five = build_app(db_url, tmp_path, max_queued_chat=5)
    yield five
    services_of(five).close()


def admit(app: Flask, inside: Any = None) -> str:
    """Admit one queued chat job through the gate (as the open gateway); run ``inside`` after its commit."""
    with app.app_context(), services_of(app).session_factory() as db:
        try:
            with quotas.admission(db, CHAT_QUEUE, jobs=1):
                now = utcnow()
                db.add(Job(id=new_id("job"), queue=CHAT_QUEUE, status="queued", spec={}, params={}, attempts=0,
                           cancel_requested=False, created_at=now, enqueued_at=now, tenant="default"))
                db.commit()
                if inside is not None:
                    inside()
        except ApiError as refused:
            return refused.code
    return "admitted"


def test_far_below_the_cap_submissions_are_admitted_side_by_side(app: Flask) -> None:
    both_inside = threading.Barrier(2, timeout=10)  # one lock around admission would break it
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: admit(app, both_inside.wait), range(2)))
    assert outcomes == ["admitted", "admitted"]
    assert not services_of(app).redis.zcard(quotas.IN_FLIGHT)  # each left the in-flight set


def test_submissions_in_flight_count_toward_the_cap(capped: Flask) -> None:
    start = threading.Barrier(12, timeout=10)

    def one(_: int) -> str:
        start.wait()  # all at once: each counts 0 committed jobs, so only the in-flight set keeps the cap
        return admit(capped, lambda: time.sleep(0.2))  # stay in flight while the others count

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert outcomes.count("admitted") == 5, outcomes  # exact: never over, and none refused on an estimate
    assert set(outcomes) == {"admitted", "queue_full"}
    assert row_counts(capped)["jobs"] == 5


def test_a_dead_submissions_mark_expires(capped: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quotas, "LOCK_WAIT_S", 0.3)
    client = services_of(capped).redis
    client.zadd(quotas.IN_FLIGHT, {f"dead|{CHAT_QUEUE}||5": time.time() * 1000 + 60_000})  # 5 jobs, died
    assert admit(capped) == "queue_full"  # the locked path waits for it to leave, then gives up: busy
    client.zadd(quotas.IN_FLIGHT, {f"dead|{CHAT_QUEUE}||5": time.time() * 1000 - 1})  # its expiry passed
    assert admit(capped) == "admitted"
    assert not client.zcard(quotas.IN_FLIGHT)
