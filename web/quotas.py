"""Quotas and backpressure: per-key requests and tokens per minute, per-key and per-queue caps on waiting jobs.

A submission passes two gates (docs/security.md, "Quotas"):

1. ``charge``: the key's requests and tokens per minute, counted in Redis by the ``limits`` library. Tokens
   are charged at admission, as OpenAI does: an estimate of the prompt (characters / 4, plus
   ``TOKENS_PER_IMAGE`` per image) plus ``max_tokens`` times the number of choices. A refused request costs
   nothing; an admitted one stays charged even if a later gate refuses it (OpenAI counts those too).
2. ``admission``: the key's unfinished jobs (``max_queued``) and the queue's waiting jobs
   (``max_queued_chat`` / ``max_queued_batch_items``), counted in the database, then the submission is
   stored and committed, all while one short Redis lock is held.

Over a key's limit is a 429, a full queue a 503; both say when to retry in ``Retry-After`` (1 to 60 s, which
the ``openai`` SDK honours). The open gateway and keys without limits have no per-key limits; the queue caps
hold for everyone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from flask import Flask, Response, current_app, g, has_request_context
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from redis.exceptions import LockError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ApiError
from common.models import Job
from common.queue import BATCH_QUEUE, CHAT_QUEUE
from web.auth import Principal, current

log = logging.getLogger(__name__)

EXTENSION_KEY = "vlgate_quotas"
TOKENS_PER_IMAGE = 256  # what an image is charged before it is seen (Qwen3-VL spends ~64 to ~1,300)
CHARS_PER_TOKEN = 4
RETRY_MIN_S, RETRY_MAX_S = 1, 60  # the openai SDK waits as told only within 60 s
TOO_MANY_QUEUED_RETRY_S = 1  # one of the key's own jobs ends soon; it asks again at once
QUEUE_FULL_RETRY_S = {CHAT_QUEUE: 2, BATCH_QUEUE: 10}  # a chat turn takes seconds; batch room frees up slower
# Admission is serialized by one Redis lock (redis-py's Lock: SET NX PX, released by a token check) held
# around "count the waiting jobs, store the submission, commit". Counting without it would let 500
# concurrent requests all see 99 waiting jobs and all be admitted. The lock is one key for all queues, so
# the per-key cap (which spans both queues) is exact too; the section it guards is a few milliseconds
# (a batch writes its items before it and only marks them enqueued inside), far less than one GPU serves
# per job. It expires on its own if its holder dies; a waiter gives up after LOCK_WAIT_S with a 503.
LOCK_NAME = "vlgate:quotas:admission"
LOCK_TIMEOUT_S = 30
LOCK_WAIT_S = 10
LOCK_POLL_S = 0.005
UNFINISHED = ("queued", "running")


def estimate_tokens(text_chars: int, images: int, max_tokens: int, choices: int = 1) -> int:
    """Estimate what a request costs in tokens before it runs: its prompt, images and largest answer."""
    return math.ceil(text_chars / CHARS_PER_TOKEN) + images * TOKENS_PER_IMAGE + max_tokens * choices


def _retry_after(seconds: float) -> int:
    """Round a wait up to whole seconds within what clients honour."""
    return min(RETRY_MAX_S, max(RETRY_MIN_S, math.ceil(seconds)))


@dataclass(frozen=True)
class RateState:
    """One per-key limit after a charge: for the ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_s: int


class Quotas:
    """One app's rate limiters on its Redis (the ``limits`` library's storage, on the app's connection pool)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        storage = RedisStorage(settings.redis_url, connection_pool=client.connection_pool, key_prefix="vlgate:limits")
        self.redis = client
        self.settings = settings
        # Requests: a moving window, exact (one list entry per request, at most rpm entries).
        self.requests = MovingWindowRateLimiter(storage)
        # Tokens: a sliding-window counter, two integers per key whatever the cost (a moving window would
        # store one list entry per token).
        self.tokens = SlidingWindowCounterRateLimiter(storage)


def quotas() -> Quotas:
    """Return the current app's quotas."""
    return current_app.extensions[EXTENSION_KEY]


def _state(limiter: RateLimiter, item: RateLimitItem, key_id: str) -> RateState:
    """Read a limit's window after a charge."""
    stats = limiter.get_window_stats(item, key_id)
    return RateState(limit=item.amount, remaining=max(0, stats.remaining),
                     reset_s=_retry_after(stats.reset_time - time.time()))


def _refuse(code: str, message: str, limiter: RateLimiter, item: RateLimitItem, key_id: str) -> ApiError:
    """Build a 429 that says when the window has room again."""
    return ApiError(code, message, retry_after=_state(limiter, item, key_id).reset_s)


def charge(requests: int, tokens: int) -> None:
    """Charge the caller's key for requests and estimated tokens, or raise 429 (nothing charged then)."""
    principal = current()
    rpm, tpm = principal.limits.rpm, principal.limits.tpm
    if principal.key_id is None or (rpm is None and tpm is None):
        return
    q, key_id = quotas(), principal.key_id
    rpm_item = RateLimitItemPerMinute(rpm) if rpm is not None else None
    tpm_item = RateLimitItemPerMinute(tpm) if tpm is not None else None
    if tpm_item is not None and tokens:
        if tokens > tpm_item.amount:  # could never pass: say so rather than let the client wait
            raise ApiError("tokens_per_minute_exceeded", f"This request needs about {tokens:,} tokens (prompt "
                           f"estimate + max_tokens × choices); the key allows {tpm:,} per minute. Ask for fewer "
                           "max_tokens or split the work.", retry_after=RETRY_MAX_S)
        if not q.tokens.test(tpm_item, key_id, cost=tokens):
            raise _refuse("tokens_per_minute_exceeded", f"The key's {tpm:,} tokens per minute are used up "
                          f"(this request needs about {tokens:,}).", q.tokens, tpm_item, key_id)
    if rpm_item is not None and requests and not q.requests.hit(rpm_item, key_id, cost=requests):
        raise _refuse("rate_limit_exceeded", f"The key's {rpm:,} requests per minute are used up.",
                      q.requests, rpm_item, key_id)
    if tpm_item is not None and tokens and not q.tokens.hit(tpm_item, key_id, cost=tokens):  # lost a race
        raise _refuse("tokens_per_minute_exceeded", f"The key's {tpm:,} tokens per minute are used up "
                      f"(this request needs about {tokens:,}).", q.tokens, tpm_item, key_id)
    if has_request_context():
        states = g.setdefault("rate_states", {})
        if rpm_item is not None:
            states["requests"] = _state(q.requests, rpm_item, key_id)
        if tpm_item is not None:
            states["tokens"] = _state(q.tokens, tpm_item, key_id)


def _count(db: Session, *where: object) -> int:
    """Count the admitted jobs matching ``where`` (an upload's items still streaming in are not admitted)."""
    return db.scalar(select(func.count()).select_from(Job).where(Job.enqueued_at.is_not(None), *where)) or 0


def check_room(db: Session, queue: str, jobs: int, principal: Principal | None = None) -> None:
    """Raise 429 if the key would hold more than ``max_queued`` unfinished jobs, 503 if the queue is full."""
    principal = principal or current()
    settings = quotas().settings
    most = principal.limits.max_queued
    if principal.key_id is not None and most is not None and jobs:
        mine = _count(db, Job.key_id == principal.key_id, Job.status.in_(UNFINISHED))
        if mine + jobs > most:
            never = f" This submission alone has {jobs:,} jobs: split it." if jobs > most else ""
            raise ApiError("too_many_queued", f"The key may have {most:,} unfinished jobs at once and has "
                           f"{mine:,}; wait for some to finish.{never}", retry_after=TOO_MANY_QUEUED_RETRY_S)
    cap = settings.max_queued_chat if queue == CHAT_QUEUE else settings.max_queued_batch_items
    waiting = _count(db, Job.queue == queue, Job.status == "queued")
    if jobs and waiting + jobs > cap:
        kind = "chat jobs" if queue == CHAT_QUEUE else "batch items"
        never = f" This submission alone has {jobs:,}: split it." if jobs > cap else ""
        raise ApiError("queue_full", f"The server is full: {waiting:,} {kind} are waiting and it takes {cap:,} at "
                       f"most; try again shortly.{never}", retry_after=QUEUE_FULL_RETRY_S.get(queue, 2))


@contextmanager
def admission(db: Session, queue: str, jobs: int) -> Iterator[None]:
    """Hold the admission lock, check there is room for ``jobs`` more, and let the caller store and commit."""
    principal = current()
    lock = quotas().redis.lock(LOCK_NAME, timeout=LOCK_TIMEOUT_S, sleep=LOCK_POLL_S, blocking_timeout=LOCK_WAIT_S)
    if not lock.acquire():
        raise ApiError("queue_full", "The server is too busy admitting other requests; try again shortly.",
                       retry_after=QUEUE_FULL_RETRY_S.get(queue, 2))
    try:
        db.commit()  # start a fresh transaction, so the count sees every commit made before the lock
        check_room(db, queue, jobs, principal)
        yield
    finally:
        try:
            lock.release()
        except LockError:  # held past its timeout: another request may have entered; say so
            log.warning("the admission lock expired before it was released (held over %d s)", LOCK_TIMEOUT_S)


def _rate_headers(response: Response) -> Response:
    """Tell a limited key where it stands, in OpenAI's ``x-ratelimit-*`` headers."""
    for kind, state in g.get("rate_states", {}).items():
        response.headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
        response.headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
        response.headers[f"x-ratelimit-reset-{kind}"] = f"{state.reset_s}s"
    return response


def init_app(app: Flask, client: redis.Redis, settings: Settings) -> None:
    """Create the app's rate limiters and add the rate headers to answers that were charged."""
    app.extensions[EXTENSION_KEY] = Quotas(client, settings)
    app.after_request(_rate_headers)
