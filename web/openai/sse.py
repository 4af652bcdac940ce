"""Relay a job's stream events to an OpenAI client as Server-Sent Events of ``chat.completion.chunk``.

The relay is the same follower the WebSockets use (subscribe, catch up from the snapshot, then only
newer events), so nothing is lost or doubled. A client that leaves cancels its job: the worker stops
it within one decoding step.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

from pydantic import TypeAdapter

from common.errors import ERROR_STATUS, openai_error_body
from common.events import DoneEvent, ErrorEvent, ResetEvent, StreamEvent, TokenEvent
from common.models import Job
from web.extensions import Services
from web.metrics import FOLLOWERS
from web.openai.protocol import ChatCompletionChunk, ChunkChoice, Delta
from web.openai.serving import CompletionIds, completion_usage, finish_reason, logprobs_of
from web.services.jobs import cancel_job
from web.services.stream import StreamHub

log = logging.getLogger(__name__)

# How long one loop turn waits for Redis before it checks on the client (a token wakes it at once; only a
# client that left is noticed this late). Short polls cost a wake-up each: 1,000 streams at 0.02 s took a core.
POLL_S = 0.25
EVENTS: TypeAdapter[Any] = TypeAdapter(StreamEvent)


def sse(data: dict[str, Any] | str) -> str:
    """Frame one SSE ``data:`` line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def client_gone(sock: socket.socket | None) -> bool:
    """Tell whether the client closed its connection (readable with nothing to read), without blocking."""
    if sock is None:
        return False
    try:
        poller = select.poll()  # not select(): it cannot watch a descriptor above 1023 (a busy server has them)
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class CompletionStream:
    """One streamed completion: chunks for every choice, the usage chunk if asked for, then ``[DONE]``."""

    def __init__(self, services: Services, n: int, include_usage: bool, sock: socket.socket | None) -> None:
        self.services = services
        self.n = n
        self.include_usage = include_usage
        self.sock = sock
        self.job_id = ""
        self.ids = CompletionIds(id="", created=0, model="")
        self.pending: list[dict[str, Any]] = []
        self.hub = StreamHub(services.bus, services.session_factory, self.pending.append)
        self.sent_text = False
        self.finished = False
        self.closed = False

    def follow(self, job: Job) -> None:
        """Subscribe to the job's events; call it before the job is enqueued, so nothing is published unheard."""
        self.job_id, self.ids = job.id, CompletionIds.of(job, self.services.settings)
        self.hub.follow(job.id)

    def chunk(self, choices: list[ChunkChoice], **extra: Any) -> str:
        """Frame one ``chat.completion.chunk`` (every chunk repeats the completion's id and creation time)."""
        body = ChatCompletionChunk(id=self.ids.id, created=self.ids.created, model=self.ids.model, choices=choices,
                                   **extra)
        return sse(body.model_dump(exclude_none=True))

    def __iter__(self) -> Iterator[str]:
        """Yield the SSE frames until the job's stream ends or the client leaves (then cancel the job)."""
        keepalive = self.services.settings.sse_keepalive_s
        FOLLOWERS.labels("sse").inc()
        try:
            for i in range(self.n):  # one choice per chunk, as OpenAI streams several choices
                yield self.chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            quiet_since = time.monotonic()
            while True:
                while self.pending:
                    quiet_since = time.monotonic()
                    yield from self._frames(EVENTS.validate_python(self.pending.pop(0)))
                    if self.finished:
                        return
                if client_gone(self.sock):
                    log.info("SSE client of job %s left; cancelling it", self.job_id)
                    return
                self.hub.pump(POLL_S)
                if not self.pending and time.monotonic() - quiet_since >= keepalive:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
        finally:
            FOLLOWERS.labels("sse").dec()
            self.close()

    def close(self) -> None:
        """Drop the subscription; a job whose stream did not end is cancelled (its client is gone)."""
        if self.closed:
            return
        self.closed = True
        self.hub.close()
        if self.job_id and not self.finished:
            self._cancel()

    def _frames(self, event: TokenEvent | DoneEvent | ErrorEvent | ResetEvent) -> Iterator[str]:
        """Turn one job event into SSE frames."""
        if isinstance(event, TokenEvent):
            self.sent_text = self.sent_text or bool(event.text)
            yield self.chunk([ChunkChoice(index=event.index, delta=Delta(content=event.text),
                                          logprobs=logprobs_of(event.logprobs))])
        elif isinstance(event, ResetEvent):
            if self.sent_text:  # a retried attempt cannot take back text the client already has
                yield from self._error("worker_lost", "The worker generating this answer was lost and the job was "
                                                      f"restarted; follow it at /api/jobs/{self.job_id}.")
        elif isinstance(event, ErrorEvent):
            yield from self._error(event.code, event.message)
        else:
            reasons = {c.index: c.finish_reason for c in event.choices or []} or {0: event.finish_reason}
            if event.status == "cancelled":
                reasons = dict.fromkeys(range(self.n), "cancelled")
            for i in range(self.n):
                yield self.chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=finish_reason(reasons.get(i)))])
            if self.include_usage and event.usage is not None:
                usage = completion_usage(event.usage.prompt_tokens, event.usage.completion_tokens, event.image_tokens,
                                         event.cached_tokens)
                yield self.chunk([], usage=usage)
            yield sse("[DONE]")
            self.finished = True

    def _error(self, code: str, message: str) -> Iterator[str]:
        """Send the error in OpenAI's shape (the SDK raises it), then end the stream."""
        yield sse(openai_error_body(code, message, ERROR_STATUS.get(code, 500)))
        yield sse("[DONE]")
        self.finished = True

    def _cancel(self) -> None:
        """Cancel the job of a client that left before its end (vLLM keeps generating; we do not)."""
        try:
            with self.services.session_factory() as db:
                cancel_job(db, self.services.bus, self.job_id)
        except Exception:  # noqa: BLE001 - the job still ends by max_tokens; nothing else to do here
            log.warning("could not cancel job %s after its client left", self.job_id, exc_info=True)
