"""Publish one job's stream events in order: tokens, then exactly one ``done`` or ``error``."""

from __future__ import annotations

from typing import Any

from common.bus import TokenBus
from common.schemas import DoneEvent, ErrorEvent, TokenEvent


class EventBuffer:
    """Collect the token events of one decoding step and send them in one Redis round trip."""

    def __init__(self, bus: TokenBus) -> None:
        self.bus = bus
        self.pending: list[tuple[str, dict[str, Any], int | None]] = []

    def add(self, job_id: str, event: dict[str, Any], length: int) -> None:
        self.pending.append((job_id, event, length))

    def flush(self, cancel_check: list[str] | None = None) -> set[str]:
        """Publish what is pending (and read the cancel flags of these jobs in the same round trip)."""
        events, self.pending = self.pending, []
        return self.bus.publish_many(events, cancel_check)


class JobPublisher:
    """Number a job's events after whatever an earlier attempt already published."""

    def __init__(self, bus: TokenBus, job_id: str, attempt: int, buffer: EventBuffer | None = None) -> None:
        self.bus = bus
        self.buffer = buffer  # token events wait here for the step's single round trip
        self.job_id = job_id
        self.seq, text, _ = bus.snapshot(job_id)
        self.length = len(text)  # characters of text after the last event, for resuming followers
        self.closed = False
        if attempt > 1 and self.seq > 0:
            # A retried job starts its text over; followers drop what they showed so far.
            self.length = 0
            self._send({"type": "reset", "seq": self._next(), "attempt": attempt})

    def _next(self) -> int:
        """Return the next sequence number."""
        self.seq += 1
        return self.seq

    def _send(self, event: dict[str, Any]) -> None:
        """Publish an event with its snapshot update; a closing event first flushes the buffered tokens."""
        if self.buffer is not None:
            if event["type"] == "token":
                self.buffer.add(self.job_id, event, self.length)
                return
            self.buffer.flush()
        self.bus.publish(self.job_id, event, self.length)

    def token(self, text: str) -> None:
        """Publish a text delta."""
        if text and not self.closed:
            self.length += len(text)
            self._send(TokenEvent(seq=self._next(), text=text).model_dump())

    def done(self, response: str, status: str, finish_reason: str | None, usage: dict | None,
             timings: dict | None) -> None:
        """Close the stream with the final answer."""
        if not self.closed:
            self.closed = True
            event = DoneEvent(seq=self._next(), response=response, status=status, finish_reason=finish_reason,
                              usage=usage, timings=timings)
            self._send(event.model_dump())

    def error(self, code: str, message: str) -> None:
        """Close the stream with an error."""
        if not self.closed:
            self.closed = True
            self._send(ErrorEvent(seq=self._next(), code=code, message=message).model_dump())
