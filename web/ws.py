"""WebSockets: ``/ws/chat`` (many turns on one socket) and ``/ws/jobs/<id>?after=<seq>`` (follow any job)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import threading
import weakref
from typing import Any

from flask import Blueprint, Flask, request
from flask_sock import Sock

from common import jobs
from common.errors import ApiError, error_body
from common.ids import is_id
from common.text import parse_json
from web import audit
from web.auth import recheck, visible
from web.errors import error_parts
from web.extensions import Services, services
from web.metrics import FOLLOWERS
from web.services.jobs import cancel_job
from web.services.stream import StreamHub
from web.services.submit import submit_chat

log = logging.getLogger(__name__)
ERROR_LINGER_S = 2.0  # how long a socket refused with an error stays open for the client to read it

bp = Blueprint("ws", __name__)
sock = Sock()
# How long one loop turn waits for Redis before it looks at the client's messages again (without a doorbell).
POLL_S = 0.02
# The longest a relay loop sleeps when neither Redis nor the client says anything (quiet followers check the
# database every couple of seconds: web/services/stream.py).
WAIT_S = 1.0


class Doorbell:
    """simple_websocket's "a message arrived" event that also rings an eventfd, so that one relay loop can sleep
    on the client and on Redis at once: no polling, whether it runs in a thread or a greenlet."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed when the socket's reader (which rings it) is gone with the socket: never while it can ring.
        weakref.finalize(self, os.close, self._fd)

    def set(self) -> None:
        """Mark a message (or the close) and wake the relay loop."""
        self._event.set()
        try:
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:  # the counter is full: the loop is woken anyway
            pass

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def fileno(self) -> int:
        return self._fd

    def silence(self) -> None:
        """Reset the eventfd (call before reading the messages it announced)."""
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass


def redis_socket(pubsub: Any) -> Any:
    """Return the socket of a subscription's connection, or None when it has none (not connected yet)."""
    return getattr(getattr(pubsub, "connection", None), "_sock", None)


def error_event(code: str, message: str, job_id: str | None = None) -> dict[str, Any]:
    """Build a WebSocket error frame: the stream's ``error`` event carrying the common error shape."""
    event: dict[str, Any] = {"type": "error", "code": code, "message": message, **error_body(code, message)}
    if job_id:
        event["job_id"] = job_id
    return event


class Connection:
    """One client socket: its followed jobs and the messages it sends."""

    def __init__(self, ws: Any, svc: Services) -> None:
        self.ws = ws
        self.svc = svc
        self.hub = StreamHub(svc.bus, svc.session_factory, self.send)
        self.cancel_on_close: set[str] = set()  # turns whose client asked to cancel them when it leaves

    def send(self, event: dict[str, Any]) -> None:
        """Send one JSON frame."""
        self.ws.send(json.dumps(event, ensure_ascii=False))

    def handle(self, raw: str | bytes) -> None:
        """Act on one client message: a chat turn or a cancel."""
        try:
            message = parse_json(raw)
        except ApiError as exc:
            self.send(error_event(exc.code, exc.message))
            return
        kind = message.pop("type", None) if isinstance(message, dict) else None
        if kind == "chat":
            with audit.turn():  # each turn is its own audit line
                self.chat(message)
        elif kind == "cancel":
            self.cancel(str(message.get("job_id", "")))
        elif kind == "ping":
            self.send({"type": "pong"})
        else:
            self.send(error_event("invalid_request", "type: must be 'chat', 'cancel' or 'ping'."))

    def chat(self, body: dict[str, Any]) -> None:
        """Submit a turn exactly like POST /api/jobs, then stream its answer.

        ``cancel_on_disconnect`` (default false) cancels the turn if the socket closes before it ends;
        by default the answer is finished and lands in the session, where a reload finds it.
        """
        leave_cancels = body.pop("cancel_on_disconnect", False)
        if not isinstance(leave_cancels, bool):
            audit.note(error="invalid_request")
            self.send(error_event("invalid_request", "cancel_on_disconnect: must be true or false"))
            return
        try:
            recheck()  # a key revoked since the socket opened is refused from its next turn on
            with self.svc.session_factory() as db:
                submitted = submit_chat(db, self.svc, body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error frame; the socket lives on
            code, message = error_parts(exc)
            audit.note(error=code)
            self.send(error_event(code, message))
            return
        job = submitted.job
        self.send({"type": "accepted", "job_id": job.id, "session_id": job.session_id})
        if leave_cancels:
            self.cancel_on_close.add(job.id)
        self.hub.follow(job.id)

    def cancel(self, job_id: str) -> None:
        """Cancel a job; its stream ends with a ``done`` whose status is cancelled."""
        try:
            recheck()
            with self.svc.session_factory() as db:
                cancel_job(db, self.svc.bus, job_id)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            self.send(error_event(*error_parts(exc), job_id=job_id))

    def sleep(self, bell: Doorbell) -> None:
        """Wait until Redis has something for this socket, the client sends something, or WAIT_S passes."""
        poller = select.poll()  # not select(): it cannot watch a descriptor above 1023
        poller.register(bell, select.POLLIN)
        sock = redis_socket(self.hub.pubsub)
        if sock is not None and self.hub.followers:
            if self.hub.pubsub.connection.can_read(timeout=0):  # already read into redis-py's buffer
                return
            poller.register(sock, select.POLLIN)
        poller.poll(WAIT_S * 1000)

    def serve(self, until_idle: bool) -> None:
        """Relay events and read client messages until the client leaves (or, if asked, nothing is followed)."""
        FOLLOWERS.labels("websocket").inc()
        bell = getattr(self.ws, "event", None)
        bell = bell if isinstance(bell, Doorbell) else None
        try:
            while not (until_idle and not self.hub.followers):
                if bell is not None:
                    bell.silence()
                self.hub.pump(0 if bell is not None else POLL_S)
                raw = self.ws.receive(timeout=0)
                while raw is not None:
                    self.handle(raw)
                    raw = self.ws.receive(timeout=0)
                if bell is not None:
                    self.sleep(bell)
        finally:
            FOLLOWERS.labels("websocket").dec()
            self.hub.close()
            for job_id in self.cancel_on_close & set(self.hub.followers):  # asked for, and not finished
                try:
                    with self.svc.session_factory() as db:
                        cancel_job(db, self.svc.bus, job_id)
                except Exception:  # noqa: BLE001 - nobody to tell; the job ends by its own limits
                    log.warning("could not cancel job %s after its socket closed", job_id, exc_info=True)


@sock.route("/ws/chat", bp=bp)
def chat_socket(ws: Any) -> None:
    """Carry many chat turns on one socket."""
    Connection(ws, services()).serve(until_idle=False)


@sock.route("/ws/jobs/<job_id>", bp=bp)
def job_socket(ws: Any, job_id: str) -> None:
    """Follow one job from any point, then close."""
    svc = services()
    connection = Connection(ws, svc)
    after = request.args.get("after", default=0, type=int) or 0
    with svc.session_factory() as db:
        job = jobs.load(db, job_id) if is_id("job", job_id) else None
        exists = job is not None and visible(job)  # another tenant's job does not exist here
    if not exists:
        connection.send(error_event("job_not_found", f"Job {job_id} does not exist.", job_id))
        # Close a moment later (or when the client does): a client that reads the handshake answer, the error
        # and the close in one recv() can lose the error (simple-websocket's client does, under load).
        with contextlib.suppress(Exception):
            ws.receive(timeout=ERROR_LINGER_S)
        return
    connection.hub.follow(job_id, after)
    connection.serve(until_idle=True)


def init_app(app: Flask) -> None:
    """Register the WebSocket routes (each open socket holds one gunicorn thread or greenlet: gunicorn.conf.py)."""
    # A message larger than any valid request body is refused (the socket closes with 1009) before it is held.
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"ping_interval": 25, "max_message_size": app.config[
        "MAX_CONTENT_LENGTH"], "event_class": Doorbell})
    sock.init_app(app)
    app.register_blueprint(bp)

