"""Each web process's batch keeper: a thread that moves ``/v1`` batches along their lifecycle.

Every ``batch_keeper_interval_s`` (and at once when a batch is created here) it
- validates ``validating`` batches that no live process holds (a small pool of threads; ``batch_validation``),
- expires ``in_progress`` batches whose completion window passed (their unfinished lines are cancelled),
- moves ``in_progress`` batches whose lines are all final to ``finalizing``,
- finishes ``finalizing`` and ``cancelling`` batches once nothing of them runs (``batch_output``),
- deletes files whose expiry passed.

Why here and not in the workers' reaper: validation needs ``/v1``'s request model and image pipeline, which live
in the web (workers import only ``common/``), and it is I/O, not GPU work. Every step is a conditional UPDATE, and
validating or finishing holds a lease on the batch (``lease_token``, ``lease_expires_at``): any number of web
processes (gunicorn workers, replicas) run keepers side by side, and when one dies mid-validation or mid-finish,
another takes the batch over once the lease lapses. Started in every gunicorn worker by ``gunicorn.conf.py``.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from flask import Flask, current_app
from redis.exceptions import RedisError
from sqlalchemy import exists, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from common.ids import utcnow
from common.models import Job, OpenAIBatch
from web.extensions import Services
from web.openai.batch_output import finish
from web.openai.batch_validation import Lease, LeaseLost, validate
from web.openai.files import sweep_expired
from web.services.batches import cancel_batch

log = logging.getLogger(__name__)

EXTENSION_KEY = "vlgate_batch_keeper"
SCAN_ROWS = 200  # batches looked at per step and pass (oldest first)


def claim(db: Session, batch_id: str, status: str, lease_s: float, count_attempt: bool = False) -> str | None:
    """Take a batch in ``status`` that no live process holds; return the claim's token, or None."""
    now = utcnow()
    token = secrets.token_hex(8)
    values: dict[str, object] = {"lease_token": token, "lease_expires_at": now + timedelta(seconds=lease_s)}
    if count_attempt:
        values["attempts"] = OpenAIBatch.attempts + 1
    moved = db.execute(update(OpenAIBatch).where(
        OpenAIBatch.id == batch_id, OpenAIBatch.status == status,
        or_(OpenAIBatch.lease_expires_at.is_(None), OpenAIBatch.lease_expires_at < now)).values(**values))
    db.commit()
    return token if moved.rowcount == 1 else None


def unfinished(db: Session, batch_id: str) -> bool:
    """Tell whether any line of the batch is still queued or running."""
    return bool(db.scalar(select(exists().where(Job.batch_id == batch_id, Job.status.in_(("queued", "running"))))))


class BatchKeeper:
    """One web process's keeper thread and its pool of validators."""

    def __init__(self, app: Flask, inline: bool = False) -> None:
        self.app = app
        self.services: Services = app.extensions["vlgate"]
        self.settings = self.services.settings
        self.inline = inline  # tests: validate in the calling thread
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=self.settings.batch_validators, thread_name_prefix="batch-validate")
        self.validating: set[str] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the keeper in a daemon thread (it dies with the process; what it held is taken over)."""
        self.thread = threading.Thread(target=self._run, name="batch-keeper", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread and the validators (tests)."""
        self.stopping.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tick()
            except (SQLAlchemyError, RedisError) as exc:  # a blip: look again at the next interval
                log.warning("the batch keeper could not reach the database or Redis: %s", exc)
            except Exception:  # a bug: say where, and keep the keeper alive
                log.exception("the batch keeper's pass failed")
            self.wake.wait(self.settings.batch_keeper_interval_s)
            self.wake.clear()

    def tick(self) -> None:
        """Do one pass of every step."""
        with self.app.app_context(), self.services.session_factory() as db:
            sweep_expired(db, self.settings)
            self._expire(db)
            self._settle(db)
            self._finish_ready(db)
            self._start_validations(db)

    def _ids(self, db: Session, *where: object) -> list[str]:
        query = select(OpenAIBatch.id).where(*where).order_by(OpenAIBatch.created_at).limit(SCAN_ROWS)
        return list(db.execute(query).scalars())

    def _expire(self, db: Session) -> None:
        """End the windows that passed: cancel what has not run; the batch finishes as ``expired``."""
        now = utcnow()
        for batch_id in self._ids(db, OpenAIBatch.status == "in_progress", OpenAIBatch.expires_at <= now):
            running = (OpenAIBatch.id == batch_id, OpenAIBatch.status == "in_progress")
            moved = db.execute(update(OpenAIBatch).where(*running).values(status="finalizing", finalizing_at=now,
                                                                          expired_at=now))
            db.commit()
            if moved.rowcount == 1:
                cancel_batch(db, self.services.bus, batch_id)
                log.info("batch %s expired", batch_id)

    def _settle(self, db: Session) -> None:
        """Move batches whose lines are all final to ``finalizing``."""
        for batch_id in self._ids(db, OpenAIBatch.status == "in_progress"):
            if not unfinished(db, batch_id):
                db.execute(update(OpenAIBatch).where(OpenAIBatch.id == batch_id, OpenAIBatch.status == "in_progress")
                           .values(status="finalizing", finalizing_at=utcnow()))
                db.commit()

    def _finish_ready(self, db: Session) -> None:
        """Finish the finalizing and cancelling batches of which nothing runs any more."""
        now = utcnow()
        free = or_(OpenAIBatch.lease_expires_at.is_(None), OpenAIBatch.lease_expires_at < now)
        rows = db.execute(select(OpenAIBatch).where(OpenAIBatch.status.in_(("finalizing", "cancelling")), free)
                          .order_by(OpenAIBatch.created_at).limit(SCAN_ROWS)
                          .execution_options(populate_existing=True)).scalars().all()
        for row in rows:
            if row.in_progress_at is not None:
                if row.status == "cancelling" or row.expired_at is not None:
                    cancel_batch(db, self.services.bus, row.id)  # again: a line its dead worker left is re-queued
                if unfinished(db, row.id):
                    continue
            token = claim(db, row.id, row.status, self.settings.batch_lease_s)
            if token is not None and finish(db, self.settings, row, token):
                log.info("batch %s finished", row.id)

    def _start_validations(self, db: Session) -> None:
        """Hand validating batches that no process holds to the validators."""
        now = utcnow()
        free = or_(OpenAIBatch.lease_expires_at.is_(None), OpenAIBatch.lease_expires_at < now)
        for batch_id in self._ids(db, OpenAIBatch.status == "validating", free):
            with self.lock:
                if batch_id in self.validating or len(self.validating) >= self.settings.batch_validators:
                    continue
                self.validating.add(batch_id)
            if self.inline:
                self._validate(batch_id)
            else:
                self.pool.submit(self._validate, batch_id)

    def _validate(self, batch_id: str) -> None:
        """Claim a batch and validate it (in a validator thread)."""
        try:
            with self.app.app_context(), self.services.session_factory() as db:
                token = claim(db, batch_id, "validating", self.settings.batch_lease_s, count_attempt=True)
                if token is None:
                    return
                row = db.get(OpenAIBatch, batch_id, populate_existing=True)
                lease = Lease(db, batch_id, token, self.settings.batch_lease_s)
                try:
                    validate(self.app, db, row, lease)
                except LeaseLost:  # cancelled meanwhile: give it to the keeper's finish at once
                    lease.release()
        except Exception:  # left to its lease: another pass (here or elsewhere) tries again when it lapses
            log.exception("validating batch %s failed", batch_id)
        finally:
            with self.lock:
                self.validating.discard(batch_id)
            self.wake.set()


def start_keeper(app: Flask) -> BatchKeeper:
    """Start this process's keeper for the app (once)."""
    keeper = app.extensions.get(EXTENSION_KEY)
    if keeper is None:
        keeper = app.extensions[EXTENSION_KEY] = BatchKeeper(app)
        keeper.start()
    return keeper


def nudge() -> None:
    """Tell this process's keeper to look now (a batch was just created)."""
    keeper = current_app.extensions.get(EXTENSION_KEY)
    if keeper is not None:
        keeper.wake.set()
