"""Usage accounting: requests, jobs, images and tokens per key per UTC day, and when each key was last used.

The web adds a request's jobs and images in the transaction that stores them; the worker adds a job's
prompt and completion tokens in the transaction that finishes it (``common.jobs.finish``, which writes
only once), so nothing is counted twice and nothing counted was not stored. Each addition is one atomic
upsert (``INSERT … ON CONFLICT DO UPDATE SET n = n + excluded.n``), so concurrent web processes and
workers never lose an update to a read-modify-write race.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from sqlalchemy import Select, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from common.ids import utcnow
from common.models import ApiKey, UsageDay

OPEN_KEY = "-"  # the key id the open gateway's use is counted under
COUNTERS = ("requests", "jobs", "images", "prompt_tokens", "completion_tokens")
# Dialects whose insert() has on_conflict_do_update (the two databases vlgate supports).
UPSERTS: dict[str, Any] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def today() -> date:
    """Return the current UTC date (the day usage is counted on)."""
    return utcnow().date()


def add_usage(db: Session, key_id: str | None, tenant: str, *, day: date | None = None, **counts: int) -> None:
    """Add counts (``requests``, ``jobs``, ``images``, ``prompt_tokens``, ``completion_tokens``) to a key's day.

    Runs in the caller's transaction; the caller commits (so the counts land with the rows they count).
    """
    unknown = set(counts) - set(COUNTERS)
    if unknown:
        raise ValueError(f"unknown usage counters: {sorted(unknown)}")
    counts = {name: int(value) for name, value in counts.items() if value}
    if not counts:
        return
    values = {name: counts.get(name, 0) for name in COUNTERS}
    statement = _upsert(db.get_bind().dialect.name, tuple(counts))
    db.connection().execute(statement, {"key_id": key_id or OPEN_KEY, "day": day or today(), "tenant": tenant,
                                        **values})


@functools.cache
def _upsert(dialect: str, names: tuple[str, ...]) -> Any:
    """Build the upsert adding ``names`` to a key's day once (building it cost more than running it)."""
    insert = UPSERTS.get(dialect)
    if insert is None:
        raise NotImplementedError(f"usage accounting supports SQLite and Postgres, not {dialect}")
    table = UsageDay.__table__
    statement = insert(table).values({name: bindparam(name) for name in ("key_id", "day", "tenant", *COUNTERS)})
    return statement.on_conflict_do_update(
        index_elements=[table.c.key_id, table.c.day],
        set_={name: table.c[name] + statement.excluded[name] for name in names},
    )


def count_submission(db: Session, owner: dict[str, Any], *, jobs: int, images: int) -> None:
    """Count one accepted request that stored ``jobs`` jobs with ``images`` images (``owner``: tenant, key_id)."""
    add_usage(db, owner.get("key_id"), owner["tenant"], requests=1, jobs=jobs, images=images)


@dataclass(frozen=True)
class UsageQuery:
    """Which rows a report covers: one key (or all), one tenant (or all), and a range of days (inclusive)."""

    key_id: str | None = None
    tenant: str | None = None
    since: date | None = None
    until: date | None = None


def usage_rows(db: Session, query: UsageQuery) -> list[tuple[UsageDay, ApiKey | None]]:
    """Return the matching days with their keys (None for the open gateway or a deleted key), oldest first."""
    statement: Select[Any] = select(UsageDay, ApiKey).outerjoin(ApiKey, ApiKey.id == UsageDay.key_id)
    if query.key_id is not None:
        statement = statement.where(UsageDay.key_id == query.key_id)
    if query.tenant is not None:
        statement = statement.where(UsageDay.tenant == query.tenant)
    if query.since is not None:
        statement = statement.where(UsageDay.day >= query.since)
    if query.until is not None:
        statement = statement.where(UsageDay.day <= query.until)
    rows = db.execute(statement.order_by(UsageDay.day, UsageDay.tenant, UsageDay.key_id)).all()
    return [(day, key) for day, key in rows]


class LastUsed:
    """Keep ``api_keys.last_used_at`` roughly current at the cost of one UPDATE per key per ``every_s``.

    Each process remembers when it last wrote a key, and the UPDATE's WHERE skips a row another process
    wrote within ``every_s``, so a busy key costs a database write about once a minute, not per request.
    """

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._written: dict[str, float] = {}

    def due(self, key_id: str) -> bool:
        """Tell whether this process should write the key now (and assume it will)."""
        now = time.monotonic()
        with self._lock:
            last = self._written.get(key_id)
            if last is not None and now - last < self.every_s:
                return False
            if len(self._written) > 10_000:  # bounded, whatever the number of keys
                self._written.clear()
            self._written[key_id] = now
            return True

    def touch(self, session_factory: sessionmaker[Session], key_id: str) -> None:
        """Record that a key was used just now, if it is due."""
        if not self.due(key_id):
            return
        now = utcnow()
        stale = now - timedelta(seconds=self.every_s)
        with session_factory() as db:
            db.execute(update(ApiKey).where(ApiKey.id == key_id,
                                            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale))
                       .values(last_used_at=now).execution_options(synchronize_session=False))
            db.commit()
