"""The Redis token bus: per-job events with a sequence number, a snapshot for late followers,
cancel flags, and worker heartbeats."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

import redis

from common.schemas import WorkerStatus

PREFIX = "vlgate"
SNAPSHOT_TTL_S = 24 * 3600


def job_channel(job_id: str) -> str:
    """Return the pub/sub channel of a job's events."""
    return f"{PREFIX}:job:{job_id}"


class TokenBus:
    """Publish and read job events, cancel flags and heartbeats in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    # -- events ------------------------------------------------------------------------------------
    def publish(self, job_id: str, event: dict[str, Any], length: int | None = None) -> None:
        """Publish one event with its snapshot update (see ``publish_many``)."""
        self.publish_many([(job_id, event, length)])

    def publish_many(self, events: list[tuple[str, dict[str, Any], int | None]],
                     cancel_check: list[str] | None = None) -> set[str]:
        """Publish events (job id, event, text length after it) in one transaction; optionally read cancel flags.

        Token text is appended to the snapshot; ``done``/``error`` are stored whole as the final event;
        ``reset`` (a retried job starting over) clears the text. The list of lengths lets a follower
        resume after any ``seq``. One round trip per decoding step, however many rows stream.
        """
        pipe = self.redis.pipeline(transaction=True)
        for job_id, event, length in events:
            key = f"{PREFIX}:job:{job_id}"
            if event["type"] == "token":
                if not event.get("index"):  # the snapshot holds choice 0; the done event carries every choice
                    pipe.append(f"{key}:text", event["text"])
            elif event["type"] == "reset":
                pipe.set(f"{key}:text", "")
                pipe.set(f"{key}:reset", event["seq"])
            else:
                pipe.set(f"{key}:final", json.dumps(event))
            pipe.set(f"{key}:seq", event["seq"])
            pipe.rpush(f"{key}:lengths", -1 if length is None else length)
            pipe.publish(job_channel(job_id), json.dumps(event))
            if event["type"] != "token" or event["seq"] % 64 == 1:  # keep the snapshot alive, cheaply
                for suffix in ("text", "seq", "final", "reset", "lengths"):
                    pipe.expire(f"{key}:{suffix}", SNAPSHOT_TTL_S)
        if cancel_check:
            pipe.mget([f"{PREFIX}:cancel:{j}" for j in cancel_check])
        if not events and not cancel_check:
            return set()
        replies = pipe.execute()
        if not cancel_check:
            return set()
        return {j for j, flag in zip(cancel_check, replies[-1], strict=True) if flag}

    def snapshot(self, job_id: str) -> tuple[int, str, dict[str, Any] | None]:
        """Return (last seq, text so far, final event or None), read atomically."""
        key = f"{PREFIX}:job:{job_id}"
        seq, text, final = self.redis.mget(f"{key}:seq", f"{key}:text", f"{key}:final")
        return (
            int(seq) if seq is not None else 0,
            text.decode("utf-8", "replace") if isinstance(text, bytes) else (text or ""),
            json.loads(final) if final else None,
        )

    def resume_point(self, job_id: str, after: int) -> int | None:
        """Return how many characters of the current text a follower that saw events up to ``after`` has.

        None means it cannot be told (its text belongs to an attempt that was since reset, or the
        length was not recorded): the follower must drop its text and take the whole of it again.
        """
        if after <= 0:
            return 0
        key = f"{PREFIX}:job:{job_id}"
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(f"{key}:reset")
        pipe.lindex(f"{key}:lengths", after - 1)
        reset, length = pipe.execute()
        if (reset is not None and int(reset) > after) or length is None or int(length) < 0:
            return None
        return int(length)

    def subscribe(self, job_id: str) -> redis.client.PubSub:
        """Subscribe to a job's events (do this before reading the snapshot)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(job_channel(job_id))
        return pubsub

    # -- cancellation ------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        """Raise the cancel flag that the generation loop checks at every step."""
        self.redis.set(f"{PREFIX}:cancel:{job_id}", 1, ex=SNAPSHOT_TTL_S)

    def cancelled(self, job_ids: list[str]) -> set[str]:
        """Return which of these jobs have their cancel flag raised (one round trip)."""
        return self.publish_many([], job_ids)

    # -- heartbeats --------------------------------------------------------------------------------
    def beat(self, status: WorkerStatus, ttl_s: float, alive_ttl_s: float | None = None) -> None:
        """Store a worker's status (it disappears if the worker stops beating) and mark it alive."""
        status.last_heartbeat = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{PREFIX}:worker:{status.worker_id}", status.model_dump_json(), px=int(ttl_s * 1000))
        pipe.set(f"{PREFIX}:alive:{status.worker_id}", 1, px=int((alive_ttl_s or ttl_s) * 1000))
        pipe.execute()

    def touch_alive(self, worker_id: str, ttl_s: float) -> None:
        """Renew a worker's short liveness mark (every second or so: a dead worker is noticed in seconds)."""
        self.redis.set(f"{PREFIX}:alive:{worker_id}", 1, px=int(ttl_s * 1000))

    def alive_workers(self, worker_ids: Collection[str]) -> set[str]:
        """Return which of these workers renewed their liveness mark recently."""
        ids = sorted(worker_ids)
        if not ids:
            return set()
        marks = self.redis.mget([f"{PREFIX}:alive:{w}" for w in ids])
        return {w for w, mark in zip(ids, marks, strict=True) if mark}

    def forget_worker(self, worker_id: str) -> None:
        """Remove a worker that is shutting down cleanly."""
        self.redis.delete(f"{PREFIX}:worker:{worker_id}", f"{PREFIX}:alive:{worker_id}")

    def workers(self) -> list[WorkerStatus]:
        """Return every live worker's last heartbeat, with its age (a worker whose liveness mark lapsed is gone)."""
        keys = sorted(self.redis.scan_iter(match=f"{PREFIX}:worker:*", count=100))
        now = time.time()
        out = []
        for raw in self.redis.mget(keys) if keys else []:
            if raw:
                status = WorkerStatus.model_validate_json(raw)
                status.age_s = round(now - status.last_heartbeat, 3)
                out.append(status)
        alive = self.alive_workers([w.worker_id for w in out])
        return [w for w in out if w.worker_id in alive]

    def lock(self, name: str, ttl_s: float) -> bool:
        """Take a short-lived named lock (e.g. one reaper per interval across workers)."""
        return bool(self.redis.set(f"{PREFIX}:lock:{name}", 1, nx=True, px=int(ttl_s * 1000)))
