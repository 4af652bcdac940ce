"""Readable, prefixed, random identifiers (``sess_…``, ``job_…``, ``batch_…``) and UTC time."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

_HEX = re.compile(r"[0-9a-f]{24}")


def new_id(prefix: str) -> str:
    """Return a new identifier like ``job_3f9c0a…`` (96 random bits)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def is_id(prefix: str, value: str) -> bool:
    """Tell whether ``value`` is shaped like an id ``new_id(prefix)`` makes (so a lookup can 404 at once)."""
    return len(value) == len(prefix) + 25 and value.startswith(f"{prefix}_") and _HEX.fullmatch(value[-24:]) is not None


def utcnow() -> datetime:
    """Return the current UTC time as a naive datetime (how the database stores it)."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_epoch(value: datetime | None) -> float | None:
    """Convert a stored naive-UTC datetime to epoch seconds."""
    return value.replace(tzinfo=UTC).timestamp() if value else None


def from_epoch(value: float) -> datetime:
    """Convert epoch seconds to the naive-UTC datetime the database stores."""
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def isoformat(value: datetime | None) -> str | None:
    """Render a stored UTC datetime as ISO 8601 with a ``Z``."""
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"
