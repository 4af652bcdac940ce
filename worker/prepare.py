"""Build claimed jobs' prompts off the decode loop: stored images decoded, chat template, processor."""

from __future__ import annotations

import io
import logging
import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.config import Settings
from common.jobspec import JobSpec
from common.models import Job, StoredImage
from worker.choices import requests_for
from worker.engine import Engine, GenerationRequest
from worker.prompts import PromptBuilder

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """A claimed job whose prompt is being built: the rows it will take and the requests it will become."""

    job_id: str
    rows: int
    future: Future[list[GenerationRequest]]
    pool: int = 0  # which pool took it (a broken pool is replaced once, not once per job it held)


def pool_size(settings: Settings, device: str) -> int:
    """Return how many pool workers prepare jobs (0: inline). On the CPU the decode loop's torch threads already
    use every core, so a pool only spreads the same work over more steps (measured by bench.prepare)."""
    if settings.prepare_workers is not None:
        return settings.prepare_workers
    return 1 if device.startswith("cuda") else 0


class Preparer:
    """A small pool (threads or processes) that turns claimed jobs into engine requests with their prompts built."""

    def __init__(self, settings: Settings, db: sessionmaker[Session], engine: Engine, workers: int = 1) -> None:
        self.settings, self.db, self.engine, self.workers = settings, db, engine, workers
        self.kind = settings.prepare_kind
        self._warming: list[Future[None]] = []
        self._failed = False
        self._pool = self._start()
        self._generation = 0

    def ready(self) -> bool:
        """Tell whether the pool can take jobs (a process pool is still starting: until then jobs are prepared
        inline, so a worker serves from the first second)."""
        if not all(f.done() for f in self._warming):
            return False
        failed = next((f.exception() for f in self._warming if f.exception() is not None), None)
        if failed is not None and not self._failed:
            self._failed = True
            log.error("the prepare pool's processes did not start (%s: %s); preparing inline", type(failed).__name__,
                      failed)
        return not self._failed

    def submit(self, job_id: str, spec: JobSpec, created_at: float | None, rows: int,
               tenant: str | None = None) -> Ticket:
        """Queue one job's preparation; its future yields the requests, or raises LookupError if it cannot run.
        ``tenant``: a chat's, whose conversation cache it may use (worker/choices.py ``requests_for``)."""
        args = (job_id, spec, created_at, self.settings.max_job_s, tenant)
        try:
            future = self._submit(args)
        except BrokenProcessPool:  # a pool process died while it held no job: no ticket saw it, so replace it now
            log.warning("the prepare pool broke between jobs; starting a fresh one")
            self._replace()
            future = self._submit(args)
        return Ticket(job_id, rows, future, self._generation)

    def _submit(self, args: tuple) -> Future:
        if self.kind == "process":
            return self._pool.submit(_prepare_in_child, *args)
        return self._pool.submit(prepare_job, self.db, self.engine, *args)

    def restart(self, ticket: Ticket) -> None:
        """Replace the pool that broke under this ticket (a pool process died): later jobs get a fresh one."""
        if ticket.pool == self._generation:  # else replaced already
            self._replace()

    def _replace(self) -> None:
        """Drop the broken pool and start a fresh one (a new generation)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._start()
        self._generation += 1

    def close(self) -> None:
        """Stop the pool; preparations still queued are dropped (their jobs were handed back or failed)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> Executor:
        workers = max(1, self.workers)
        if self.kind == "thread":
            return ThreadPoolExecutor(workers, thread_name_prefix="vlgate-prepare")
        # spawn, not fork: forking a process whose torch threads are running can deadlock the child.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child,
                                   initargs=(_url(self.db), self.engine.prompts))
        # Start the processes now (each imports torch and runs the processor once), not on the first job.
        self._warming = [pool.submit(_warm) for _ in range(workers)]
        return pool


def prepare_job(db: sessionmaker[Session], builder: Any, job_id: str, spec: JobSpec, created_at: float | None,
                max_job_s: float | None, tenant: str | None = None) -> list[GenerationRequest]:
    """Load a job's images, build one request per choice, and prepare its prompt once for all of them."""
    with db() as session:
        images = load_images(session, spec.image_ids())
    requests = requests_for(job_id, spec, images, created_at, max_job_s, tenant)
    prepared = builder.prepare_ahead(requests[0])  # every choice sees the same turns
    for request in requests:
        request.prepared = prepared
    return requests


def read_spec(job: Job) -> JobSpec:
    """Read the job's contract; a missing or unreadable one is the job's own failure, not the worker's."""
    if not job.spec:
        raise LookupError("the job has no spec (stored by an older version and its conversation is gone)")
    try:
        return JobSpec.model_validate(job.spec)
    except ValidationError as exc:
        raise LookupError(f"the job's spec is not one this worker understands: {exc}") from exc


def load_images(db: Session, image_ids: list[str]) -> dict[str, Image.Image]:
    """Load stored (already normalised) PNGs by id; a missing one is the job's failure (LookupError)."""
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


_child: tuple[sessionmaker[Session], PromptBuilder] | None = None  # a pool process's database and prompt builder


def _url(db: sessionmaker[Session]) -> str:
    """Return the URL of the database these sessions use (a pool process opens its own connection to it)."""
    return db.kw["bind"].url.render_as_string(hide_password=False)


def _start_child(url: str, prompts: PromptBuilder) -> None:
    """Set up a pool process: one torch thread (the decode loop owns the cores), its own database connection."""
    import torch

    from common.db import make_engine, make_session_factory

    global _child
    torch.set_num_threads(1)
    _child = (make_session_factory(make_engine(url)), prompts)


def _prepare_in_child(job_id: str, spec: JobSpec, created_at: float | None,
                      max_job_s: float | None, tenant: str | None = None) -> list[GenerationRequest]:
    """Prepare a job in a pool process."""
    assert _child is not None, "the pool process was not initialised"
    db, builder = _child
    return prepare_job(db, builder, job_id, spec, created_at, max_job_s, tenant)


def _warm() -> None:
    """Run the processor once in a fresh pool process, so that the first job does not pay for its first call."""
    assert _child is not None, "the pool process was not initialised"
    from worker.generation import GenerationRequest, Turn

    _child[1].prepare_ahead(GenerationRequest("warm#0", [Turn("user", "hi", [Image.new("RGB", (64, 64))])]))
