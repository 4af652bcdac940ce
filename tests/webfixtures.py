"""Fixtures and helpers for the web tests: a migrated SQLite file or Postgres database, a clean Redis DB,
apps built from the factory, fake heartbeats and a simulated worker.

Import the fixtures explicitly (``from tests.webfixtures import app, client, db_url``); the root
conftest belongs to the whole suite.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import func, select, text

from common import jobs
from common.bus import TokenBus
from common.config import Settings
from common.db import make_session_factory
from common.events import DoneEvent, ErrorEvent, TokenEvent
from common.keys import KeyLimits, create_key
from common.models import ChatSession, Job, Message, MessageImage, StoredImage
from common.schemas import WorkerStatus
from devtools.databases import fresh_database
from web import create_app
from web.auth import EXTENSION_KEY
from web.extensions import Services

ROOT = Path(__file__).resolve().parent.parent
# A DB of its own (each test flushes it); TEST_REDIS_DB lets two suites run side by side on one Redis.
REDIS_URL = f"redis://127.0.0.1:6379/{os.environ.get('TEST_REDIS_DB', '14')}"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused at once
# children first
TABLES = ("message_images", "jobs", "batches", "messages", "images", "sessions", "api_keys", "usage_days")
WORKER_ID = "test-worker"


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database per backend, made once per test session (tests empty it, see ``app``)."""
    yield from fresh_database(request.param, tmp_path_factory.mktemp("web-db"))


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for a test app: its own database and Redis DB, a short model wait."""
    values: dict[str, Any] = {
        "database_url": db_url, "redis_url": REDIS_URL, "data_dir": tmp_path, "model": "demo",
        "model_wait_s": 0.5, "chat_wait_s": 5.0,
    }
    values.update(overrides)
    return Settings(**values)


def _empty_database(svc: Services) -> None:
    """Delete every row, so each test starts from an empty schema."""
    with svc.engine.begin() as conn:
        for table in TABLES:
            conn.execute(text(f"DELETE FROM {table}"))


def build_app(db_url: str, tmp_path: Path, **overrides: Any) -> Flask:
    """Create an app from the factory for these settings."""
    app = create_app(make_settings(db_url, tmp_path, **overrides))
    app.testing = True
    return app


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app on an empty database and an empty Redis DB."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    app = build_app(db_url, tmp_path)
    _empty_database(services_of(app))
    yield app
    services_of(app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


def services_of(app: Flask) -> Services:
    """Return an app's services."""
    return app.extensions["vlgate"]


def heartbeat(app: Flask, *, state: str = "idle", loaded: bool = True, error: str | None = None,
              worker_id: str = WORKER_ID, ttl_s: float = 60.0) -> WorkerStatus:
    """Store a worker heartbeat as a real worker would (a legitimate fake for the model gate)."""
    now = time.time()
    status = WorkerStatus(worker_id=worker_id, hostname="testhost", pid=4242, state=state, device="cpu",
                          model="demo", model_label="demo (random weights, not a real model)", is_demo=True,
                          loaded=loaded, error=error, started_at=now, last_heartbeat=now)
    TokenBus(services_of(app).redis).beat(status, ttl_s)
    return status


def assert_error(response: Any, status: int, code: str, *words: str) -> str:
    """Check the one error shape, its status and code, and that the message names what matters."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]["message"]



def bearer(secret: str) -> dict[str, str]:
    """Return the header that carries a key."""
    return {"Authorization": f"Bearer {secret}"}


def make_key(app: Flask, name: str, **options: Any) -> str:
    """Make a key in the app's database and return its secret; ``rpm``, ``tpm`` and ``max_queued`` become its
    limits, other options go to ``create_key``. The gate forgets its cached lookups, as after `keys create`."""
    limits = KeyLimits(**{k: options.pop(k) for k in ("rpm", "tpm", "max_queued") if k in options})
    with services_of(app).session_factory() as db:
        secret = create_key(db, name, limits=limits, **options).secret
    app.extensions[EXTENSION_KEY].forget()
    return secret


def row_counts(app: Flask) -> dict[str, int]:
    """Count the rows of every table the API writes."""
    models = {"sessions": ChatSession, "messages": Message, "images": StoredImage,
              "message_images": MessageImage, "jobs": Job}
    with services_of(app).session_factory() as db:
        return {name: db.scalar(select(func.count()).select_from(model)) or 0 for name, model in models.items()}


def queue_length(app: Flask, queue: str = "chat") -> int:
    """Return how many tasks wait in a Celery queue on the broker."""
    return int(services_of(app).redis.llen(queue))


# -- images ----------------------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """Encode a solid-colour PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    """Encode bytes as standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    """Build one PNG chunk with its CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """Build a tiny, well-formed PNG that declares a huge size (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


# -- a simulated worker ----------------------------------------------------------------------------


class SimulatedWorker(threading.Thread):
    """Play a worker's part through the shared contract: claim the next queued job, stream, finish."""

    def __init__(self, app: Flask, *, status: str = "succeeded", tokens: tuple[str, ...] = ("Hello", " world"),
                 error_code: str | None = None, error_message: str | None = None, delay_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        svc = services_of(app)
        self.factory = make_session_factory(svc.engine)
        self.bus = svc.bus
        self.status, self.tokens, self.delay_s = status, tokens, delay_s
        self.error_code, self.error_message = error_code, error_message
        self.job_id: str | None = None

    def _next_job(self, timeout_s: float = 10.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.factory() as db:
                job_id = db.scalar(select(Job.id).where(Job.status == "queued").order_by(Job.created_at))
            if job_id:
                return job_id
            time.sleep(0.02)
        raise TimeoutError("no queued job appeared")

    def run(self) -> None:
        job_id = self.job_id = self._next_job()
        with self.factory() as db:
            assert jobs.claim(db, job_id, WORKER_ID, lease_s=30, max_attempts=3) is not None
            seq = 0
            for piece in self.tokens:
                time.sleep(self.delay_s)
                seq += 1
                self.bus.publish(job_id, TokenEvent(seq=seq, text=piece).wire())
            answer = "".join(self.tokens)
            outcome = jobs.Outcome(
                status=self.status, response=answer if self.status != "failed" else "",
                finish_reason="stop" if self.status == "succeeded" else None,
                error_code=self.error_code, error_message=self.error_message,
                prompt_tokens=12, completion_tokens=len(self.tokens),
                timings={"queue_s": 0.01, "generate_s": 0.1, "first_token_at": time.time()}, model="demo",
            )
            assert jobs.finish(db, job_id, WORKER_ID, outcome)
        # As a worker does: commit the row, then publish the end of the stream.
        if self.status == "failed":
            final = ErrorEvent(seq=seq + 1, code=self.error_code or "generation_failed",
                               message=self.error_message or "failed").wire()
        else:
            final = DoneEvent(seq=seq + 1, response=answer, status=self.status).wire()
        self.bus.publish(job_id, final)
