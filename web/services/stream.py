"""Relay job events from Redis to a client exactly once, in order, whenever the client joins."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from common import jobs
from common.bus import TokenBus, job_channel
from common.events import FINAL_EVENTS, ChoiceOutcome, DoneEvent, ErrorEvent, ResetEvent, TokenEvent
from common.models import Job
from common.schemas import FINAL_STATUSES
from web.services.jobs import timings, usage

# How often a follower that hears nothing checks the database (a job may have ended without an event).
DB_CHECK_S = 2.0
# A follower that stays quiet checks less and less often, up to this: a job waiting behind a long queue costs
# the database one read per follower per DB_CHECK_MAX_S, not per 2 s (1,000 followers made 500 reads a second).
DB_CHECK_MAX_S = 10.0

Send = Callable[[dict[str, Any]], None]


def final_event_from_row(job: Job, seq: int) -> dict[str, Any]:
    """Build the closing event of a finished job from its database row."""
    if job.status == "failed":
        error = ErrorEvent(seq=seq, code=job.error_code or "generation_failed",
                           message=job.error_message or "generation failed")
        return {**error.wire(), "job_id": job.id}
    choices = [ChoiceOutcome.model_validate(c) for c in job.choices] if job.choices else None
    done = DoneEvent(seq=seq, response=job.response or "", status=job.status, finish_reason=job.finish_reason,
                     usage=usage(job), timings=timings(job), choices=choices, image_tokens=job.image_tokens,
                     truncated_turns=job.truncated_turns, cached_tokens=job.cached_tokens)
    return {**done.wire(), "job_id": job.id}


class Follower:
    """One job followed by one client: what it has already been sent, and what comes next."""

    def __init__(self, job_id: str, after: int) -> None:
        self.job_id = job_id
        self.last_seq = max(after, 0)
        self.finished = False
        self.db_check_s = DB_CHECK_S
        self.next_db_check = time.monotonic() + DB_CHECK_S

    def catch_up(self, bus: TokenBus, db_factory: sessionmaker[Session], send: Send) -> None:
        """Send what the client misses (call after subscribing): the snapshot, or the stored result."""
        seq, text, final = bus.snapshot(self.job_id)
        if seq == 0:
            self._from_database(db_factory, send)
            return
        if seq <= self.last_seq:
            return
        have = bus.resume_point(self.job_id, self.last_seq)
        if have is None:
            send({**ResetEvent(seq=seq).wire(), "job_id": self.job_id})
            have = 0
        token_seq = seq - 1 if final else seq
        if text[have:] and token_seq > self.last_seq:
            send({**TokenEvent(seq=token_seq, text=text[have:]).wire(), "job_id": self.job_id})
        self.last_seq = seq
        if final:
            send({**final, "job_id": self.job_id})
            self.finished = True

    def relay(self, event: dict[str, Any], send: Send) -> None:
        """Forward a live event unless the client already has it."""
        if self.finished or event.get("seq", 0) <= self.last_seq:
            return
        self.last_seq = event["seq"]
        self.db_check_s = DB_CHECK_S  # a follower that hears events needs no database check
        self.next_db_check = time.monotonic() + DB_CHECK_S
        send({**event, "job_id": self.job_id})
        self.finished = event["type"] in FINAL_EVENTS

    def check_database(self, db_factory: sessionmaker[Session], send: Send) -> None:
        """Close the stream from the database if the job ended without a final event reaching us."""
        if self.finished or time.monotonic() < self.next_db_check:
            return
        self.db_check_s = min(self.db_check_s * 2, DB_CHECK_MAX_S)
        self.next_db_check = time.monotonic() + self.db_check_s
        self._from_database(db_factory, send)

    def _from_database(self, db_factory: sessionmaker[Session], send: Send) -> None:
        """Serve a finished job whose events are gone (or never existed) from its row."""
        with db_factory() as db:
            job = jobs.load(db, self.job_id)
        if job is None or job.status not in FINAL_STATUSES:
            return
        if self.last_seq == 0 and job.response:
            send({**TokenEvent(seq=1, text=job.response).wire(), "job_id": self.job_id})
        self.last_seq += 2
        send(final_event_from_row(job, self.last_seq))
        self.finished = True


class StreamHub:
    """The followed jobs of one client connection, over one Redis subscription."""

    def __init__(self, bus: TokenBus, db_factory: sessionmaker[Session], send: Send) -> None:
        self.bus = bus
        self.db_factory = db_factory
        self.send = send
        self.pubsub = bus.redis.pubsub(ignore_subscribe_messages=True)
        self.followers: dict[str, Follower] = {}

    def follow(self, job_id: str, after: int = 0) -> None:
        """Start relaying a job: subscribe first, then catch up from the snapshot."""
        follower = Follower(job_id, after)
        self.followers[job_id] = follower
        self.pubsub.subscribe(job_channel(job_id))
        follower.catch_up(self.bus, self.db_factory, self.send)
        self._drop_finished()

    def pump(self, timeout: float) -> None:
        """Relay what Redis delivers within ``timeout`` seconds, and look after quiet followers."""
        if not self.followers:
            time.sleep(timeout)
            return
        message = self.pubsub.get_message(timeout=timeout)
        while message is not None:
            if message.get("type") == "message":
                event = json.loads(message["data"])
                job_id = message["channel"].decode().rsplit(":", 1)[-1]
                follower = self.followers.get(job_id)
                if follower is not None:
                    follower.relay(event, self.send)
            message = self.pubsub.get_message(timeout=0)
        for follower in self.followers.values():
            follower.check_database(self.db_factory, self.send)
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Unsubscribe from jobs whose stream has ended."""
        for job_id in [j for j, f in self.followers.items() if f.finished]:
            del self.followers[job_id]
            self.pubsub.unsubscribe(job_channel(job_id))

    def close(self) -> None:
        """Drop the subscription: all a disconnected client costs."""
        try:
            self.pubsub.close()
        except redis.RedisError:
            pass
