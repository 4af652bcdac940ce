"""Conversation affinity: a conversation's next turn goes to the worker that holds its cached prefix.

The worker that answered a turn and kept its KV cache (worker/prefix_cache.py) writes
``vlgate:affinity:<conversation key>`` → its worker id. When the next turn is submitted, the web reads it
in one round trip with the worker's liveness mark; a live worker gets the job as a hint (``jobs.worker_hint``)
and its Celery task on that worker's own queue. Other workers leave a hinted job alone for
``AFFINITY_GRACE_S`` after it was enqueued, then anyone may take it (the hinted worker is full or gone:
the answer is the same, only its prefill is longer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import redis

from common.bus import PREFIX

log = logging.getLogger(__name__)

AFFINITY_GRACE_S = 1.0  # how long other workers leave a job hinted to a live worker alone
AFFINITY_TTL_S = 3600.0  # a session idle for longer has most likely lost its cache to newer ones


def conversation_key(tenant: str, turns: Sequence[Any], answer: str | None = None) -> str:
    """Return the key of a conversation so far: its tenant and each turn's role, text and image ids (plus an
    answer to it, when given).

    A turn's cache is kept under the key of its conversation with its answer; the next turn looks up the key of
    everything before its own question. Sessions, forks of a session and stateless ``/v1`` clients that resend
    the whole conversation all find the same entry, and tenants never share one.
    """
    digest = hashlib.sha256(json.dumps(tenant).encode())
    for turn in turns:
        digest.update(json.dumps([turn.role, turn.text, list(turn.image_ids)]).encode())
    if answer is not None:
        digest.update(json.dumps(["assistant", answer, []]).encode())
    return digest.hexdigest()


def direct_queue(worker_id: str) -> str:
    """Return the Celery queue only this worker consumes (its sessions' next turns)."""
    return f"worker.{worker_id}"


def remember(client: redis.Redis, key: str, worker_id: str) -> None:
    """Record that this worker holds the conversation's prefix (a Redis hiccup only costs the routing)."""
    try:
        client.set(f"{PREFIX}:affinity:{key}", worker_id, ex=int(AFFINITY_TTL_S))
    except redis.RedisError as exc:
        log.warning("could not record where conversation %s is cached: %s", key[:12], exc)


def route(client: redis.Redis, key: str) -> str | None:
    """Return the live worker holding the session's prefix, or None (no cache, or its worker is gone)."""
    worker = client.get(f"{PREFIX}:affinity:{key}")
    if worker is None:
        return None
    worker_id = worker.decode() if isinstance(worker, bytes) else str(worker)
    return worker_id if client.exists(f"{PREFIX}:alive:{worker_id}") else None
