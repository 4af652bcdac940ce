"""Run jobs on a worker: claim, rebuild each conversation, generate them together, store each once."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from common import jobs
from common.bus import TokenBus
from common.config import Settings
from common.ids import to_epoch
from common.models import Job, Message, StoredImage
from common.queue import QUEUES
from worker.engine import Engine, GenerationRequest, GenerationResult, Turn
from worker.publisher import EventBuffer, JobPublisher
from worker.sampling import SamplingParams

log = logging.getLogger(__name__)


class JobRunner:
    """Claim jobs (the task's own, then more that wait) and run them as one continuously batched generation."""

    def __init__(self, settings: Settings, engine: Callable[[], Engine | None], db: sessionmaker[Session],
                 bus: TokenBus, worker_id: str, on_busy: Callable[[list[str]], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.bus = bus
        self.worker_id = worker_id
        self.on_busy = on_busy or (lambda _ids: None)
        self.jobs_done = 0
        self._publishers: dict[str, JobPublisher] = {}
        self._buffer = EventBuffer(bus)
        self._models: dict[str, str] = {}

    def run(self, job_id: str) -> str | None:
        """Run the task's job with whatever else waits; return its final status (None if someone else ran it)."""
        engine = self.engine()
        started = time.monotonic()
        with self.db() as db:
            own = jobs.claim(db, job_id, self.worker_id, self.settings.job_lease_s, self.settings.max_attempts)
            # A chat starts with chats only: bulk rows join at the next admission, after its prefill.
            first_batch_rows = 0 if own is not None and own.queue == QUEUES[0] else None
            claimed = ([own] if own else []) + self._claim_more(db, 1 if own else 0, first_batch_rows)
            requests = self._requests(db, claimed, engine)
        if not requests:
            return own.status if own is not None else None
        lease = _LeaseKeeper(self.db, self.worker_id, self.settings.job_lease_s, [r.request_id for r in requests])
        lease.start()
        next_admit = [time.monotonic() + self.settings.admit_interval_s]

        def admit(running: int) -> list[GenerationRequest]:
            """Between steps: bring in waiting jobs (chat first) while there is room and time."""
            now = time.monotonic()
            if now < next_admit[0] or now - started > self.settings.task_budget_s:
                return []
            next_admit[0] = now + self.settings.admit_interval_s
            with self.db() as db:
                fresh = self._requests(db, self._claim_more(db, running, self.settings.admit_batch_rows), engine)
            if fresh:
                lease.add([r.request_id for r in fresh])
                self.on_busy(lease.ids())
            return fresh

        self.on_busy(lease.ids())
        try:
            assert engine is not None
            engine.generate(
                requests,
                on_delta=lambda rid, delta: self._publishers[rid].token(delta),
                on_finish=lambda result: self._finish(result, lease),
                # Once per step: last step's tokens go out and the cancel flags come back in one round trip.
                check_cancelled=lambda ids: self._buffer.flush(ids) | (lease.lost & set(ids)),
                admit=admit,
            )
        except Exception as exc:
            log.exception("generation failed")
            for rid in lease.ids():
                self._store(rid, jobs.Outcome("failed", error_code="generation_failed",
                                              error_message=f"{type(exc).__name__}: {exc}"))
            if _is_cuda_error(exc):
                raise  # the service frees memory and reports the worker unhealthy
            return "failed" if own is not None else None
        finally:
            self._buffer.flush()
            lease.stop()
            self.on_busy([])
        if own is None:
            return None
        with self.db() as db:
            final = jobs.load(db, job_id)
        return final.status if final is not None else None

    def _claim_more(self, db: Session, running: int, batch_rows: int | None = None) -> list[Job]:
        """Claim waiting jobs: chat first, alone (so their prefill is not shared with bulk rows; chats may also
        use the reserve rows); else batch items up to the batch size, at most ``batch_rows`` at a time."""
        cap, lease, attempts = self.settings.max_batch, self.settings.job_lease_s, self.settings.max_attempts
        chat_room = max(0, cap + self.settings.chat_reserve - running)
        chats = jobs.claim_next(db, self.worker_id, lease, attempts, chat_room, QUEUES[:1]) if chat_room else []
        if chats:
            return chats
        room = max(0, cap - running)
        if batch_rows is not None:
            room = min(room, batch_rows)
        return jobs.claim_next(db, self.worker_id, lease, attempts, room, QUEUES[1:]) if room else []

    def _requests(self, db: Session, claimed: list[Job], engine: Engine | None) -> list[GenerationRequest]:
        """Turn claimed jobs into engine requests; a job that cannot run is failed at once."""
        requests = []
        for job in claimed:
            self._publishers[job.id] = JobPublisher(self.bus, job.id, job.attempts, self._buffer)
            if engine is None:
                self._store(job.id, jobs.Outcome("failed", error_code="model_not_loaded",
                                                 error_message="this worker has no model loaded"))
                continue
            self._models[job.id] = engine.info.label
            try:
                requests.append(self._request(db, job))
            except LookupError as exc:
                self._store(job.id, jobs.Outcome("failed", error_code="invalid_request", error_message=str(exc)))
        return requests

    def _finish(self, result: GenerationResult, lease: _LeaseKeeper) -> None:
        """Store one request's outcome as soon as it is done, while the others keep generating."""
        lease.remove(result.request_id)
        self._store(result.request_id, _outcome(result, self._models.get(result.request_id)))

    def _store(self, job_id: str, outcome: jobs.Outcome) -> str | None:
        """Write the outcome once, then close the stream; a job taken from us writes nothing."""
        publisher = self._publishers.pop(job_id, None) or JobPublisher(self.bus, job_id, 1)
        self._models.pop(job_id, None)
        with self.db() as db:
            if not jobs.finish(db, job_id, self.worker_id, outcome):
                log.warning("job %s was taken from this worker before it finished; result dropped", job_id)
                return None
        self.jobs_done += 1
        if outcome.status == "failed":
            publisher.error(outcome.error_code or "generation_failed", outcome.error_message or "generation failed")
        else:
            usage = None
            if outcome.prompt_tokens is not None:
                completion = outcome.completion_tokens or 0
                usage = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": completion,
                         "total_tokens": outcome.prompt_tokens + completion}
            publisher.done(outcome.response, outcome.status, outcome.finish_reason, usage, outcome.timings)
        return outcome.status

    def _request(self, db: Session, job: Job) -> GenerationRequest:
        """Rebuild the job's conversation (a session's turns, or a batch item's single turn) with its images."""
        params = SamplingParams(**{k: v for k, v in (job.params or {}).items() if k in _PARAM_NAMES})
        created = to_epoch(job.created_at)
        if job.session_id is None and job.prompt is not None:
            images = _images(db, list(job.image_ids or []))
            turn = Turn("user", job.prompt, [images[i] for i in job.image_ids or []])
            return GenerationRequest(job.id, [turn], params, enqueued_at=created)
        if job.user_message_id is None or job.session_id is None:
            raise LookupError("the job's conversation was deleted")
        messages = db.execute(
            select(Message)
            .where(Message.session_id == job.session_id, Message.id <= job.user_message_id)
            .order_by(Message.id)
            .options(selectinload(Message.image_links))
        ).scalars().all()
        images = _images(db, [link.image_id for m in messages for link in m.image_links])
        turns = [Turn(m.role, m.text, [images[link.image_id] for link in m.image_links]) for m in messages]
        return GenerationRequest(job.id, turns, params, enqueued_at=created)


_PARAM_NAMES = set(SamplingParams.__dataclass_fields__)


class _LeaseKeeper:
    """Renew the leases of the jobs being generated; note the ones taken away (cancelled or re-claimed)."""

    def __init__(self, db: sessionmaker[Session], worker_id: str, lease_s: float, job_ids: list[str]) -> None:
        self.db, self.worker_id, self.lease_s = db, worker_id, lease_s
        self._held = set(job_ids)
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vlgate-lease", daemon=True)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def add(self, job_ids: list[str]) -> None:
        with self._lock:
            self._held.update(job_ids)

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        """Renew at a third of the lease so one missed renewal does not lose a job."""
        while not self._stop.wait(self.lease_s / 3):
            wanted = self.ids()
            try:
                with self.db() as db:
                    held = jobs.renew_many(db, wanted, self.worker_id, self.lease_s)
            except Exception:  # noqa: BLE001 - a database hiccup; the next renewal may succeed
                log.warning("lease renewal failed", exc_info=True)
                continue
            with self._lock:
                # Jobs finished meanwhile left _held; only the still-wanted ones count as lost.
                self.lost.update((set(wanted) - held) & self._held)


def _outcome(result: GenerationResult, model: str | None) -> jobs.Outcome:
    """Map an engine result onto a stored job outcome."""
    if result.finish_reason == "error":
        return jobs.Outcome("failed", error_code=result.error_code, error_message=result.error_message,
                            prompt_tokens=result.prompt_tokens, model=model)
    status = "cancelled" if result.finish_reason == "cancelled" else "succeeded"
    return jobs.Outcome(status, response=result.text, finish_reason=result.finish_reason,
                        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        timings=result.timings, model=model)


def _images(db: Session, image_ids: list[str]) -> dict[str, Image.Image]:
    """Load stored (already normalised) PNGs by id."""
    if not image_ids:
        return {}
    rows = db.execute(select(StoredImage.id, StoredImage.data).where(StoredImage.id.in_(set(image_ids)))).all()
    found = {image_id: _open(data) for image_id, data in rows}
    missing = set(image_ids) - set(found)
    if missing:
        raise LookupError(f"image(s) {sorted(missing)} are missing")
    return found


def _open(data: bytes) -> Image.Image:
    """Decode a stored PNG."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _is_cuda_error(exc: BaseException) -> bool:
    """Tell whether an exception came from the GPU (the worker must report itself unhealthy)."""
    return "CUDA" in str(exc) or type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError")
