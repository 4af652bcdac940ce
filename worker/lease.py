"""Keep the leases of the jobs a runner holds (generating or being prepared) alive while it works."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from common import jobs

log = logging.getLogger(__name__)


class LeaseKeeper:
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
