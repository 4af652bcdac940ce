"""Run one claimed job: rebuild its conversation from the database, generate, store, publish."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from common import jobs
from common.bus import TokenBus
from common.config import Settings
from common.models import Job, Message, MessageImage, StoredImage
from worker.engine import Engine, GenerationRequest, GenerationResult, Turn
from worker.publisher import JobPublisher
from worker.sampling import SamplingParams

log = logging.getLogger(__name__)


class JobRunner:
    """Take jobs by id and carry each through claim, lease renewal, generation and a single result."""

    def __init__(self, settings: Settings, engine: Callable[[], Engine | None], db: sessionmaker[Session],
                 bus: TokenBus, worker_id: str, on_busy: Callable[[list[str]], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.bus = bus
        self.worker_id = worker_id
        self.on_busy = on_busy or (lambda _ids: None)
        self.jobs_done = 0

    def run(self, job_id: str) -> str | None:
        """Claim and run one job; return its final status, or None if another worker owns it."""
        with self.db() as db:
            job = jobs.claim(db, job_id, self.worker_id, self.settings.job_lease_s, self.settings.max_attempts)
            if job is None:
                log.info("job %s is not claimable (done, cancelled or owned elsewhere)", job_id)
                return None
            publisher = JobPublisher(self.bus, job_id, job.attempts)
            engine = self.engine()
            if engine is None:
                return self._store(db, job_id, publisher, jobs.Outcome(
                    "failed", error_code="model_not_loaded", error_message="this worker has no model loaded"))
            try:
                request = self._request(db, job)
            except LookupError as exc:
                return self._store(db, job_id, publisher, jobs.Outcome(
                    "failed", error_code="invalid_request", error_message=str(exc)))
        self.on_busy([job_id])
        lease = _LeaseKeeper(self.db, job_id, self.worker_id, self.settings.job_lease_s)
        lease.start()
        try:
            result = engine.generate(
                [request],
                on_delta=lambda _rid, delta: publisher.token(delta),
                check_cancelled=lambda ids: self.bus.cancelled(ids) | (set(ids) if lease.lost.is_set() else set()),
            )[0]
            outcome = _outcome(result, engine.info.label)
        except Exception as exc:
            log.exception("generation failed for job %s", job_id)
            outcome = jobs.Outcome("failed", error_code="generation_failed",
                                   error_message=f"{type(exc).__name__}: {exc}")
            raise_after = exc
        else:
            raise_after = None
        finally:
            lease.stop()
            self.on_busy([])
        with self.db() as db:
            status = self._store(db, job_id, publisher, outcome)
        if raise_after is not None and _is_cuda_error(raise_after):
            raise raise_after  # the service marks the worker unhealthy
        return status

    def _store(self, db: Session, job_id: str, publisher: JobPublisher, outcome: jobs.Outcome) -> str | None:
        """Write the outcome once, then close the stream; a lost job writes nothing."""
        if not jobs.finish(db, job_id, self.worker_id, outcome):
            log.warning("job %s was taken from this worker before it finished; result dropped", job_id)
            return None
        self.jobs_done += 1
        if outcome.status == "failed":
            publisher.error(outcome.error_code or "generation_failed", outcome.error_message or "generation failed")
        else:
            usage = None
            if outcome.prompt_tokens is not None:
                total = outcome.prompt_tokens + (outcome.completion_tokens or 0)
                usage = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens or 0,
                         "total_tokens": total}
            publisher.done(outcome.response, outcome.status, outcome.finish_reason, usage, outcome.timings)
        return outcome.status

    def _request(self, db: Session, job: Job) -> GenerationRequest:
        """Rebuild the conversation up to the job's user turn, with its images, from the database."""
        if job.user_message_id is None or job.session_id is None:
            raise LookupError("the job's conversation was deleted")
        messages = db.execute(
            select(Message)
            .where(Message.session_id == job.session_id, Message.id <= job.user_message_id)
            .order_by(Message.id)
            .options(selectinload(Message.image_links))
        ).scalars().all()
        image_ids = {link.image_id for m in messages for link in m.image_links}
        blobs = dict(db.execute(select(StoredImage.id, StoredImage.data).where(StoredImage.id.in_(image_ids))).all())
        turns = [Turn(m.role, m.text, [_open(blobs[link.image_id]) for link in m.image_links]) for m in messages]
        params = SamplingParams(**{k: v for k, v in (job.params or {}).items() if k in _PARAM_NAMES})
        return GenerationRequest(job.id, turns, params, enqueued_at=_epoch(job.created_at))


_PARAM_NAMES = set(SamplingParams.__dataclass_fields__)
_ = MessageImage  # imported for the relationship's mapper configuration


class _LeaseKeeper:
    """Renew a job's lease in the background; flag the loss if the job is taken away."""

    def __init__(self, db: sessionmaker[Session], job_id: str, worker_id: str, lease_s: float) -> None:
        self.db, self.job_id, self.worker_id, self.lease_s = db, job_id, worker_id, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        """Renew at a third of the lease so one missed renewal does not lose the job."""
        while not self._stop.wait(self.lease_s / 3):
            try:
                with self.db() as db:
                    if not jobs.renew(db, self.job_id, self.worker_id, self.lease_s):
                        self.lost.set()
                        return
            except Exception:  # noqa: BLE001 - a database hiccup; the next renewal may succeed
                log.warning("lease renewal failed for %s", self.job_id, exc_info=True)


def _outcome(result: GenerationResult, model: str) -> jobs.Outcome:
    """Map an engine result onto a stored job outcome."""
    if result.finish_reason == "error":
        return jobs.Outcome("failed", error_code=result.error_code, error_message=result.error_message,
                            prompt_tokens=result.prompt_tokens, model=model)
    status = "cancelled" if result.finish_reason == "cancelled" else "succeeded"
    return jobs.Outcome(status, response=result.text, finish_reason=result.finish_reason,
                        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        timings=result.timings, model=model)


def _open(data: bytes) -> Image.Image:
    """Decode a stored (already normalised) PNG."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _epoch(value) -> float | None:  # type: ignore[no-untyped-def]
    """Convert a stored naive-UTC datetime to epoch seconds."""
    from datetime import UTC

    return value.replace(tzinfo=UTC).timestamp() if value else None


def _is_cuda_error(exc: BaseException) -> bool:
    """Tell whether an exception came from the GPU (the worker must report itself unhealthy)."""
    return "CUDA" in str(exc) or type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError")
