"""Run jobs on a worker: claim, read each job's spec, generate them together, store each once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool

import redis
from sqlalchemy.orm import Session, sessionmaker

from common import jobs
from common.affinity import remember
from common.bus import TokenBus
from common.config import Settings
from common.ids import to_epoch
from common.jobspec import JobSpec
from common.models import Job
from common.queue import QUEUES
from worker.choices import ChoiceSet, cache_tenant, requests_for, split_row_id
from worker.engine import Engine, GenerationRequest, GenerationResult
from worker.faults import classify
from worker.lease import LeaseKeeper
from worker.metrics import DecodeSteps, WorkerMetrics
from worker.prepare import Preparer, Ticket, load_images, pool_size, read_spec
from worker.publisher import EventBuffer, JobPublisher

log = logging.getLogger(__name__)

RELEASE_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # seconds between tries to hand jobs back while the database blinks


class JobRunner:
    """Claim jobs (the task's own, then more that wait) and run them as one continuously batched generation."""

    def __init__(self, settings: Settings, engine: Callable[[], Engine | None], db: sessionmaker[Session],
                 bus: TokenBus, worker_id: str, on_busy: Callable[[list[str]], None] | None = None,
                 enqueue: Callable[[str, str], None] | None = None, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self.bus = bus
        self.worker_id = worker_id
        self.on_busy = on_busy or (lambda _ids: None)
        self.enqueue = enqueue or (lambda _job_id, _queue: None)
        self.metrics = metrics or WorkerMetrics()
        self.jobs_done = 0
        self._publishers: dict[str, JobPublisher] = {}
        self._buffer = EventBuffer(bus)
        self._models: dict[str, str] = {}
        self._choices: dict[str, ChoiceSet] = {}
        self._active: set[str] = set()  # claimed by the current run and not yet stored
        self.max_batch = settings.max_batch or 8  # running rows; the service sizes it from the device once loaded
        self._preparer: Preparer | None = None

    def close(self) -> None:
        """Stop the prepare pool."""
        if self._preparer is not None:
            self._preparer.close()
            self._preparer = None

    def run(self, job_id: str) -> str | None:
        """Run the task's job with whatever else waits; return its final status (None if someone else ran it).

        A job fault fails the jobs in flight with their error. A device or infrastructure fault hands them
        back to the queue and is raised for the service to heal the worker or wait for the service.
        """
        engine = self.engine()
        if engine is None:  # no model here: the job stays queued for a worker that has one
            return None
        self._active.clear()
        try:
            return self._run(job_id, engine)
        except Exception as exc:
            held = sorted(self._active)
            kind = classify(exc)
            self.metrics.fault(kind)
            if kind == "job":
                log.exception("generation failed for %s", ", ".join(held) or job_id)
                for held_id in held:
                    self._store(held_id, jobs.Outcome("failed", error_code="generation_failed",
                                                      error_message=f"{type(exc).__name__}: {exc}"))
                return "failed"
            log.warning("%s fault (%s: %s); handing %d job(s) back to the queue", kind, type(exc).__name__, exc,
                        len(held))
            self._release(held, count_attempt=kind == "device")
            raise

    def _run(self, job_id: str, engine: Engine) -> str | None:
        """Claim the job and more, generate them together, and return the job's final status."""
        started = time.monotonic()
        with self.db() as db:
            own = jobs.claim(db, job_id, self.worker_id, self.settings.job_lease_s, self.settings.max_attempts)
            # A chat starts with chats only: bulk rows join at the next admission, after its prefill.
            first_batch_rows = 0 if own is not None and own.queue == QUEUES[0] else None
            claimed = ([own] if own else []) + self._claim_more(db, _rows(own) if own else 0, first_batch_rows)
            # Prepared here, in the decode thread: nothing runs yet, so nothing stalls.
            requests = self._requests(db, claimed, engine)
        if not requests:
            return own.status if own is not None else None
        lease = LeaseKeeper(self.db, self.worker_id, self.settings.job_lease_s, _job_ids(requests))
        lease.start()
        steps = self.metrics.decode_steps()
        steps.admitted(len(requests))
        next_admit = [time.monotonic() + self.settings.admit_interval_s]
        preparing: list[Ticket] = []  # claimed jobs whose prompts the pool is building (they hold rows already)

        def admit(running: int) -> list[GenerationRequest]:
            """Between steps: take the prepared jobs in; claim waiting ones (chat first) while there is room."""
            fresh = self._ready(preparing, lease, engine)
            now = time.monotonic()
            if now >= next_admit[0] and now - started <= self.settings.task_budget_s:
                next_admit[0] = now + self.settings.admit_interval_s
                held = running + len(fresh) + sum(t.rows for t in preparing)  # the cap counts rows in preparation
                with self.db() as db:
                    claimed = self._claim_more(db, held, self.settings.admit_batch_rows)
                    # Started by the first job claimed while rows run; a process pool starts in the background
                    # (seconds, once per worker) and jobs are prepared inline until it is up.
                    pool = self.preparer(engine) if claimed else None
                    if claimed and pool is None:
                        fresh += self._requests(db, claimed, engine)  # inline: the old behaviour
                if claimed:
                    if pool is not None:
                        preparing.extend(self._submit(claimed, pool, engine))
                    lease.add([job.id for job in claimed])
                    self.on_busy(lease.ids())
            while not running and not fresh and preparing:  # nothing runs: waiting stalls no row
                wait([t.future for t in preparing], return_when=FIRST_COMPLETED)
                fresh = self._ready(preparing, lease, engine)
            if fresh:
                steps.admitted(len(fresh))
            return fresh

        self.on_busy(lease.ids())
        try:
            engine.generate(
                requests,
                on_delta=self._delta,
                on_finish=lambda result: self._finish(result, lease),
                check_cancelled=lambda rids: self._cancelled(rids, lease, steps),
                admit=admit,
            )
        finally:
            steps.close()
            lease.stop()
            self.on_busy([])
        self._buffer.flush()
        if own is None:
            return None
        with self.db() as db:
            final = jobs.load(db, job_id)
        return final.status if final is not None else None

    def preparer(self, engine: Engine) -> Preparer | None:
        """Return the prepare pool for this engine, starting it on first use; None: prepare inline (no pool, or
        its processes are still starting)."""
        workers = pool_size(self.settings, engine.info.device)
        if workers <= 0 or not hasattr(engine, "prepare_ahead"):
            return None
        if self._preparer is not None and self._preparer.engine is not engine:
            self.close()  # the engine was replaced: a process pool holds the old one's processor
        if self._preparer is None:
            self._preparer = Preparer(self.settings, self.db, engine, workers)
        return self._preparer if self._preparer.ready() else None

    def _submit(self, claimed: list[Job], pool: Preparer, engine: Engine) -> list[Ticket]:
        """Hand claimed jobs to the pool; a job whose spec cannot be read fails at once."""
        tickets = []
        for job in claimed:
            spec = self._adopt(job, engine)
            if spec is not None:
                tickets.append(pool.submit(job.id, spec, to_epoch(job.created_at), _rows(job), cache_tenant(job)))
        return tickets

    def _ready(self, preparing: list[Ticket], lease: LeaseKeeper, engine: Engine) -> list[GenerationRequest]:
        """Take the jobs whose preparation finished out of the pool; drop those cancelled or failed meanwhile."""
        done = [t for t in preparing if t.future.done()]
        if not done:
            return []
        for ticket in done:
            preparing.remove(ticket)
        # One round trip for their cancel flags: a job cancelled while it was prepared never runs.
        stopped = self._buffer.flush([t.job_id for t in done]) | lease.lost
        fresh = []
        for ticket in done:
            job_id = ticket.job_id
            if job_id not in self._active:
                continue
            if job_id in stopped:
                lease.remove(job_id)
                self._store(job_id, jobs.Outcome("cancelled", finish_reason="cancelled", model=engine.info.label))
                continue
            try:
                fresh.extend(ticket.future.result())
            except LookupError as exc:
                lease.remove(job_id)
                self._store(job_id, jobs.Outcome("failed", error_code="invalid_request", error_message=str(exc)))
            except BrokenProcessPool:  # a pool process died: like a worker lost for this job, it goes back
                log.warning("the prepare pool lost a process while preparing %s; handing it back", job_id)
                lease.remove(job_id)
                self._release([job_id], count_attempt=True)
                if self._preparer is not None:
                    self._preparer.restart(ticket)
        return fresh

    def _release(self, job_ids: list[str], count_attempt: bool) -> None:
        """Put jobs back on the queue (retrying while the database blinks) and wake a worker for each."""
        self._buffer.pending.clear()  # their tokens belong to an attempt that will start over
        for job_id in job_ids:
            self._forget(job_id)
        released: list[tuple[str, str]] = []
        for delay in RELEASE_BACKOFF_S:
            try:
                with self.db() as db:
                    released = jobs.release(db, job_ids, self.worker_id, count_attempt)
                break
            except Exception as exc:  # noqa: BLE001 - if it never works, the leases expire and the reaper acts
                log.warning("could not release %d job(s) yet: %s", len(job_ids), exc)
                time.sleep(delay)
        for job_id, queue in released:
            try:
                self.enqueue(job_id, queue)
            except Exception as exc:  # noqa: BLE001 - the job row is queued: admission or the reaper picks it up
                log.warning("could not re-enqueue job %s: %s", job_id, exc)

    def _forget(self, job_id: str) -> None:
        """Drop what this runner keeps for a job it no longer holds."""
        self._active.discard(job_id)
        self._publishers.pop(job_id, None)
        self._models.pop(job_id, None)
        self._choices.pop(job_id, None)

    def _claim_more(self, db: Session, running: int, batch_rows: int | None = None) -> list[Job]:
        """Claim waiting jobs: chat first, alone (so their prefill is not shared with bulk rows; chats may also
        use the reserve rows); else batch items up to the batch size, at most ``batch_rows`` at a time."""
        cap, lease, attempts = self.max_batch, self.settings.job_lease_s, self.settings.max_attempts
        chat_room = max(0, cap + self.settings.chat_reserve - running)
        chats = jobs.claim_next(db, self.worker_id, lease, attempts, chat_room, QUEUES[:1], _rows) if chat_room else []
        if chats:
            return chats
        room = max(0, cap - running)
        if batch_rows is not None:
            room = min(room, batch_rows)
        return jobs.claim_next(db, self.worker_id, lease, attempts, room, QUEUES[1:], _rows) if room else []

    def _requests(self, db: Session, claimed: list[Job], engine: Engine | None) -> list[GenerationRequest]:
        """Turn claimed jobs into engine requests (one per choice) here; a job that cannot run is failed at once."""
        requests = []
        for job in claimed:
            spec = self._adopt(job, engine)
            if spec is None:
                continue
            try:
                rows = requests_for(job.id, spec, load_images(db, spec.image_ids()), to_epoch(job.created_at),
                                    self.settings.max_job_s, cache_tenant(job))
            except LookupError as exc:
                self._store(job.id, jobs.Outcome("failed", error_code="invalid_request", error_message=str(exc)))
                continue
            requests.extend(rows)
        return requests

    def _adopt(self, job: Job, engine: Engine | None) -> JobSpec | None:
        """Hold a claimed job (its stream, its choices) and read its spec; one that cannot run fails now."""
        self._active.add(job.id)
        self._publishers[job.id] = JobPublisher(self.bus, job.id, self._buffer)
        if engine is None:
            self._store(job.id, jobs.Outcome("failed", error_code="model_not_loaded",
                                             error_message="this worker has no model loaded"))
            return None
        try:
            spec = read_spec(job)
        except LookupError as exc:
            self._store(job.id, jobs.Outcome("failed", error_code="invalid_request", error_message=str(exc)))
            return None
        self._models[job.id] = engine.info.label
        self._choices[job.id] = ChoiceSet(spec.sampling.n, spec.sampling.n > 1 or spec.sampling.logprobs)
        return spec

    def _delta(self, request_id: str, text: str, logprobs: list[dict] | None = None) -> None:
        """Stream one choice's text delta (and its tokens' log-probabilities) on the job's channel."""
        job_id, index = split_row_id(request_id)
        self._publishers[job_id].token(text, index, logprobs)

    def _cancelled(self, request_ids: list[str], lease: LeaseKeeper, steps: DecodeSteps) -> set[str]:
        """Once per step: send the step's tokens, read the jobs' cancel flags (one round trip), map them to rows."""
        job_ids = sorted({split_row_id(rid)[0] for rid in request_ids})
        stopped = self._buffer.flush(job_ids) | (lease.lost & set(job_ids))
        rows = {rid for rid in request_ids if split_row_id(rid)[0] in stopped}
        steps.tick(request_ids, rows)  # after the flush: when the step's tokens reach the streams
        return rows

    def _finish(self, result: GenerationResult, lease: LeaseKeeper) -> None:
        """Store a job's outcome as soon as its last choice is done, while the others keep generating."""
        job_id, index = split_row_id(result.request_id)
        choices = self._choices.get(job_id)
        if choices is None:  # no longer this runner's (handed back, or failed meanwhile)
            return
        self.metrics.row_finished(result)
        if result.kept_prefix:  # the conversation's next turn should come here (common/affinity.py)
            remember(self.bus.redis, result.kept_prefix, self.worker_id)
        if not choices.add(index, result):
            return
        del self._choices[job_id]
        lease.remove(job_id)
        self._store(job_id, choices.outcome(self._models.get(job_id)))

    def _store(self, job_id: str, outcome: jobs.Outcome) -> str | None:
        """Write the outcome once, then close the stream; a job taken from us writes nothing."""
        publisher = self._publishers.get(job_id)
        with self.db() as db:
            if not jobs.finish(db, job_id, self.worker_id, outcome):
                log.warning("job %s was taken from this worker before it finished; result dropped", job_id)
                self._forget(job_id)
                return None
        self._forget(job_id)
        self.jobs_done += 1
        self.metrics.job_finished(outcome.status)
        try:
            publisher = publisher or JobPublisher(self.bus, job_id)
            if outcome.status == "failed":
                publisher.error(outcome.error_code or "generation_failed",
                                outcome.error_message or "generation failed")
            else:
                publisher.done(outcome)
        except redis.RedisError as exc:  # the row is final: followers read it from the database
            log.warning("could not publish the end of job %s: %s", job_id, exc)
        return outcome.status


def _rows(job: Job) -> int:
    """Return how many decode rows a job takes (one per choice)."""
    sampling = (job.spec or {}).get("sampling") or {}
    n = sampling.get("n", 1)
    return n if isinstance(n, int) and n > 0 else 1


def _job_ids(requests: list[GenerationRequest]) -> list[str]:
    """Return the distinct jobs behind engine requests."""
    return sorted({split_row_id(r.request_id)[0] for r in requests})
