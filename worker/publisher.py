"""Publish one job's stream events in order: tokens, then exactly one ``done`` or ``error``."""

from __future__ import annotations

from typing import Any

from common.bus import TokenBus
from common.events import ChoiceOutcome, DoneEvent, ErrorEvent, ResetEvent, TokenEvent
from common.jobs import Outcome
from common.schemas import Usage


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

    def __init__(self, bus: TokenBus, job_id: str, buffer: EventBuffer | None = None) -> None:
        self.bus = bus
        self.buffer = buffer  # token events wait here for the step's single round trip
        self.job_id = job_id
        self.seq, text, _ = bus.snapshot(job_id)
        self.length = len(text)  # characters of text after the last event, for resuming followers
        self.closed = False
        if self.seq > 0:
            # An earlier attempt (a dead worker, a released job) streamed already: this one starts the text
            # over, and followers drop what they showed so far.
            self.length = 0
            self._send(ResetEvent(seq=self._next()).wire())

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

    def token(self, text: str, index: int = 0, logprobs: list[dict[str, Any]] | None = None) -> None:
        """Publish a text delta of choice ``index`` (the snapshot's text is choice 0's)."""
        if (text or logprobs) and not self.closed:
            if index == 0:
                self.length += len(text)
            self._send(TokenEvent(seq=self._next(), text=text, index=index, logprobs=logprobs).wire())

    def done(self, outcome: Outcome) -> None:
        """Close the stream with the final answer."""
        if not self.closed:
            self.closed = True
            choices = [ChoiceOutcome.model_validate(c) for c in outcome.choices] if outcome.choices else None
            event = DoneEvent(seq=self._next(), response=outcome.response, status=outcome.status,
                              finish_reason=outcome.finish_reason, timings=outcome.timings,
                              usage=Usage.of(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens),
                              choices=choices, image_tokens=outcome.image_tokens,
                              truncated_turns=outcome.truncated_turns, cached_tokens=outcome.cached_tokens)
            self._send(event.wire())

    def error(self, code: str, message: str) -> None:
        """Close the stream with an error."""
        if not self.closed:
            self.closed = True
            self._send(ErrorEvent(seq=self._next(), code=code, message=message).wire())
