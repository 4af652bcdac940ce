"""Quotas and backpressure: per-key requests and tokens per minute, per-key and per-queue caps on waiting jobs.

A submission passes two gates (docs/security.md, "Quotas"):

1. ``charge``: the key's requests and tokens per minute, counted in Redis by the ``limits`` library. Tokens
   are charged at admission, as OpenAI does: an estimate of the prompt (characters / 4, plus
   ``TOKENS_PER_IMAGE`` per image) plus ``max_tokens`` times the number of choices. A refused request costs
   nothing; an admitted one stays charged even if a later gate refuses it (OpenAI counts those too).
2. ``admission``: the key's unfinished jobs (``max_queued``) and the queue's waiting jobs
   (``max_queued_chat`` / ``max_queued_batch_items``), counted in the database, plus the submissions still
   in flight, then the submission is stored and committed. Far below the caps that needs no lock; near them
   one short Redis lock serializes it (``admission`` explains why both stay exact).

Over a key's limit is a 429, a full queue a 503; both say when to retry in ``Retry-After`` (1 to 60 s, which
the ``openai`` SDK honours). The open gateway and keys without limits have no per-key limits; the queue caps
hold for everyone.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, current_app, g, has_request_context
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from redis.exceptions import LockError
from sqlalchemy import Select, bindparam, func, select
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
# Admission has two paths; both keep the caps exact (docs/security.md, "Quotas").
# Locked: one Redis lock (redis-py's Lock: SET NX PX, released by a token check) held around "count the waiting
# jobs, store the submission, commit". Counting without it would let 500 concurrent requests all see 99 waiting
# jobs and all be admitted. The lock is one key for all queues, so the per-key cap (which spans both queues) is
# exact too. It expires on its own if its holder dies; a waiter gives up after LOCK_WAIT_S with a 503.
# Fast: while nobody holds the lock, a submission registers itself in a Redis sorted set of admissions in
# flight (one script: refused if the lock is held), counts the database, and is admitted without the lock if
# the count plus every admission in flight (its own included) fits the caps; it leaves the set after its
# commit. Any set of admitted jobs is then within the cap: the last of them to register saw each earlier one
# either in the set or, having left it after committing, in its count. A fast submission that does not fit
# takes the locked path instead, so none is refused on an estimate; the lock holder first waits for the fast
# ones in flight to leave, and new ones keep out while it holds the lock, so its count is exact as before.
# Far from the caps no submission waits for another: with the leaner store in web/services, bench.service on
# Postgres with 8 clients went from 27-76 (median 43) to 86-196 (median 139) accepted jobs/s, runs alternating.
LOCK_NAME = "vlgate:quotas:admission"
IN_FLIGHT = "vlgate:quotas:in_flight"  # members "token|queue|key|jobs", scored by when they expire (ms)
LOCK_TIMEOUT_S = 30  # also how long an admission in flight counts if its process dies before leaving the set
LOCK_WAIT_S = 10
LOCK_POLL_S = 0.005
# KEYS: the lock, the set. ARGV: member, ttl ms, queue, key ('' = no per-key cap). Returns the jobs in flight
# for the queue and for the key (the new member's included), or nil while the lock is held.
ENTER_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then return nil end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
local in_queue, in_key = 0, 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local queue, key, jobs = string.match(member, '^[^|]*|([^|]*)|([^|]*)|(%d+)$')
  if queue == ARGV[3] then in_queue = in_queue + tonumber(jobs) end
  if ARGV[4] ~= '' and key == ARGV[4] then in_key = in_key + tonumber(jobs) end
end
return {in_queue, in_key}
"""
# KEYS: the set. Forgets members whose holder died, returns how many are left.
PENDING_SCRIPT = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return redis.call('ZCARD', KEYS[1])
"""
UNFINISHED = ("queued", "running")
# The two counts every admission makes, built once as Core statements (an admitted job has enqueued_at; an
# upload's items still streaming in have not): building and running them through the ORM cost more than
# the query itself.
_JOBS = Job.__table__.c
WAITING = (select(func.count()).select_from(Job.__table__)
           .where(_JOBS.enqueued_at.is_not(None), _JOBS.queue == bindparam("queue"), _JOBS.status == "queued"))
KEY_UNFINISHED = (select(func.count()).select_from(Job.__table__)
                  .where(_JOBS.enqueued_at.is_not(None), _JOBS.key_id == bindparam("key_id"),
                         _JOBS.status.in_(UNFINISHED)))


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
        self.enter_script = client.register_script(ENTER_SCRIPT)
        self.pending_script = client.register_script(PENDING_SCRIPT)


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


def _count(db: Session, statement: Select[Any], **params: str) -> int:
    """Run one of the admitted-job counts in the session's transaction."""
    return db.connection().execute(statement, params).scalar_one()


def _room(db: Session, queue: str, jobs: int, principal: Principal, in_queue: int = 0,
          in_key: int = 0) -> ApiError | None:
    """Return the 429 or 503 that ``jobs`` more would earn, counting ``in_queue`` / ``in_key`` more in flight."""
    settings = quotas().settings
    most = principal.limits.max_queued
    if principal.key_id is not None and most is not None and jobs:
        mine = _count(db, KEY_UNFINISHED, key_id=principal.key_id)
        if mine + in_key + jobs > most:
            never = f" This submission alone has {jobs:,} jobs: split it." if jobs > most else ""
            return ApiError("too_many_queued", f"The key may have {most:,} unfinished jobs at once and has "
                            f"{mine + in_key:,}; wait for some to finish.{never}", retry_after=TOO_MANY_QUEUED_RETRY_S)
    cap = settings.max_queued_chat if queue == CHAT_QUEUE else settings.max_queued_batch_items
    waiting = _count(db, WAITING, queue=queue)
    if jobs and waiting + in_queue + jobs > cap:
        kind = "chat jobs" if queue == CHAT_QUEUE else "batch items"
        never = f" This submission alone has {jobs:,}: split it." if jobs > cap else ""
        return ApiError("queue_full", f"The server is full: {waiting + in_queue:,} {kind} are waiting and it takes "
                        f"{cap:,} at most; try again shortly.{never}", retry_after=QUEUE_FULL_RETRY_S.get(queue, 2))
    return None


def check_room(db: Session, queue: str, jobs: int, principal: Principal | None = None) -> None:
    """Raise 429 if the key would hold more than ``max_queued`` unfinished jobs, 503 if the queue is full."""
    refusal = _room(db, queue, jobs, principal or current())
    if refusal is not None:
        raise refusal


def _busy(queue: str) -> ApiError:
    """Build the 503 for a submission that could not get its turn to be admitted."""
    return ApiError("queue_full", "The server is too busy admitting other requests; try again shortly.",
                    retry_after=QUEUE_FULL_RETRY_S.get(queue, 2))


@contextmanager
def _locked(q: Quotas, queue: str) -> Iterator[None]:
    """Hold the admission lock, once every fast admission still in flight has left (see LOCK_NAME)."""
    lock = q.redis.lock(LOCK_NAME, timeout=LOCK_TIMEOUT_S, sleep=LOCK_POLL_S, blocking_timeout=LOCK_WAIT_S)
    deadline = time.monotonic() + LOCK_WAIT_S
    if not lock.acquire():
        raise _busy(queue)
    try:
        while q.pending_script(keys=[IN_FLIGHT]):  # fast admissions that began before the lock: let them commit
            if time.monotonic() > deadline:
                raise _busy(queue)
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        try:
            lock.release()
        except LockError:  # held past its timeout: another request may have entered; say so
            log.warning("the admission lock expired before it was released (held over %d s)", LOCK_TIMEOUT_S)


@contextmanager
def admission(db: Session, queue: str, jobs: int) -> Iterator[None]:
    """Check there is room for ``jobs`` more and let the caller store and commit, exactly within the caps."""
    principal = current()
    q = quotas()
    key = principal.key_id if principal.key_id is not None and principal.limits.max_queued is not None else ""
    member = f"{secrets.token_hex(8)}|{queue}|{key}|{jobs}"
    in_flight = q.enter_script(keys=[LOCK_NAME, IN_FLIGHT], args=[member, LOCK_TIMEOUT_S * 1000, queue, key])
    if in_flight is not None:  # the fast path: no lock; counted by every later submission until it leaves
        try:
            db.commit()  # start a fresh transaction, so the count sees every commit made before registering
            if _room(db, queue, jobs, principal, in_flight[0] - jobs, in_flight[1] - jobs if key else 0) is None:
                yield
                return
        finally:
            q.redis.zrem(IN_FLIGHT, member)
    with _locked(q, queue):  # near a cap (or while another submission is there): the exact, serial path
        db.commit()  # start a fresh transaction, so the count sees every commit made before the lock
        check_room(db, queue, jobs, principal)
        yield


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
