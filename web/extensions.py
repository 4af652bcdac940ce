"""The web process's connections: database, Redis, token bus and the Celery producer, bound in ``init_app``."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.bus import TokenBus
from common.config import Settings
from common.db import make_engine, make_session_factory
from common.queue import make_celery

EXTENSION_KEY = "vlgate"
# A dead Redis must answer 503 in seconds, not hang a request thread.
REDIS_TIMEOUT_S = 5.0
# Every open stream holds one pub/sub connection; redis-py's default pool (100) would refuse the 101st stream.
REDIS_MAX_CONNECTIONS = 10_000


@dataclass
class Services:
    """Everything a request may need, created once per app."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    redis: redis.Redis
    bus: TokenBus
    celery: Celery

    def close(self) -> None:
        """Release pools (tests build many apps in one process)."""
        self.celery.close()
        self.redis.close()
        self.engine.dispose()


def _make_producer(settings: Settings) -> Celery:
    """Create the Celery app used only to send tasks, with short publish retries."""
    celery = make_celery(settings)
    # The web only publishes. Bound the retries so a dead broker costs about a second, not minutes:
    # the job row is already committed and the workers' reaper re-enqueues it later.
    celery.conf.task_publish_retry_policy = {
        "max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
    }
    celery.conf.broker_connection_timeout = REDIS_TIMEOUT_S
    celery.conf.broker_transport_options = {
        **celery.conf.broker_transport_options,
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
    }
    return celery


def init_app(app: Flask, settings: Settings) -> None:
    """Create the connections for this app and close each request's database session afterwards."""
    engine = make_engine(settings.sqlalchemy_url)
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
        max_connections=REDIS_MAX_CONNECTIONS,
    )
    app.extensions[EXTENSION_KEY] = Services(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        redis=client,
        bus=TokenBus(client),
        celery=_make_producer(settings),
    )
    app.teardown_appcontext(_close_db)


def services() -> Services:
    """Return the current app's services."""
    return current_app.extensions[EXTENSION_KEY]


def get_db() -> Session:
    """Return this request's database session, opening it on first use."""
    if "db" not in g:
        g.db = services().session_factory()
    return g.db


def _close_db(_exc: BaseException | None) -> None:
    """Close the request's database session (rolling back anything uncommitted)."""
    db = g.pop("db", None)
    if db is not None:
        db.close()
