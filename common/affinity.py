"""Session affinity: a chat session's next turn goes to the worker that holds its cached prefix.

The worker that answered a turn and kept its KV cache (worker/prefix_cache.py) writes
``vlgate:affinity:<tenant>:<session>`` → its worker id. When the next turn is submitted, the web reads it
in one round trip with the worker's liveness mark; a live worker gets the job as a hint (``jobs.worker_hint``)
and its Celery task on that worker's own queue. Other workers leave a hinted job alone for
``AFFINITY_GRACE_S`` after it was enqueued, then anyone may take it (the hinted worker is full or gone:
the answer is the same, only its prefill is longer).
"""

from __future__ import annotations

import redis

from common.bus import PREFIX

AFFINITY_GRACE_S = 1.0  # how long other workers leave a job hinted to a live worker alone
AFFINITY_TTL_S = 3600.0  # a session idle for longer has most likely lost its cache to newer ones


def session_key(tenant: str, session_id: str) -> str:
    """Return the cache key of a session: sessions are per tenant, like every other row."""
    return f"{tenant}:{session_id}"


def direct_queue(worker_id: str) -> str:
    """Return the Celery queue only this worker consumes (its sessions' next turns)."""
    return f"worker.{worker_id}"


def remember(client: redis.Redis, key: str, worker_id: str) -> None:
    """Record that this worker holds the session's prefix."""
    client.set(f"{PREFIX}:affinity:{key}", worker_id, ex=int(AFFINITY_TTL_S))


def route(client: redis.Redis, key: str) -> str | None:
    """Return the live worker holding the session's prefix, or None (no cache, or its worker is gone)."""
    worker = client.get(f"{PREFIX}:affinity:{key}")
    if worker is None:
        return None
    worker_id = worker.decode() if isinstance(worker, bytes) else str(worker)
    return worker_id if client.exists(f"{PREFIX}:alive:{worker_id}") else None
