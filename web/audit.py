"""The audit log: one JSON line per HTTP request, per WebSocket connection and per WebSocket chat turn.

Lines go to ``VLGATE_LOG_DIR/audit.log`` (default ``DATA_DIR/logs``) through the standard logging stack:
the logger ``vlgate.audit.<file>`` (a child of ``vlgate.audit``, which does not propagate, so audit lines
never reach the application log) with a JSON formatter. Fields: event (request, ws_connection, ws_turn),
time (when it ended, ISO UTC), request_id (a turn carries its socket's), key_id, key_prefix, tenant, via
(how the key came: header, cookie, ticket), client, method, path, query, status, error, job_ids, jobs,
batch_id, image_sha256s, prompt_chars, prompt_tokens, completion_tokens (when the answer carries them),
latency_ms; and ``prompts`` (the texts) only with ``VLGATE_AUDIT_PROMPTS=on``.

Never logged: a key, a ticket, the login cookie or any header. Query parameters that carry credentials
(``ticket``, ...) and anything shaped like a key (``vlg_<8 hex>_…``) are replaced by ``[redacted]``.

Services say what a request did with ``note(...)``; a chat turn on a socket is its own scope (``turn()``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from concurrent_log_handler import ConcurrentRotatingFileHandler
from flask import Flask, Response, current_app, g, has_request_context, request
from pythonjsonlogger.json import JsonFormatter

from common.config import Settings
from common.errors import ERROR_STATUS
from common.ids import isoformat, new_id, utcnow
from common.keys import prefix_of
from common.usage import LastUsed
from web.auth import presented_secret
from web.extensions import services

log = logging.getLogger(__name__)

EXTENSION_KEY = "vlgate_audit"
LOGGER = "vlgate.audit"
FILE_NAME = "audit.log"
SECRET_PARAMS = frozenset({"ticket", "key", "api_key", "apikey", "token", "access_token", "secret", "password"})
SECRET_SHAPE = re.compile(r"vlg_[0-9a-fA-F]{8}_[A-Za-z0-9_\-]+")
REDACTED = "[redacted]"
MAX_PATH = 2048
_handlers_lock = threading.Lock()


@dataclass
class Record:
    """What one request (or one chat turn on a socket) did, gathered while it runs."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    error: str | None = None
    job_ids: list[str] = field(default_factory=list)  # made or named (the job a path names is here too)
    jobs: int = 0  # made
    batch_id: str | None = None
    image_sha256s: dict[str, None] = field(default_factory=dict)  # distinct, in order
    prompt_chars: int | None = None
    prompts: dict[str, None] = field(default_factory=dict)  # distinct texts, in order; kept only if audited
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def redact(text: str) -> str:
    """Replace anything shaped like one of our keys."""
    return SECRET_SHAPE.sub(REDACTED, text)


def file_logger(settings: Settings) -> logging.Logger:
    """Return the logger writing this deployment's audit file (one per file per process)."""
    path = (settings.log_path / FILE_NAME).resolve()
    # One child per file, so that apps with different log dirs in one process (tests) keep apart; in a
    # deployment there is one. The parent does not propagate: audit lines never reach the app's log,
    # yet an operator may still attach a handler of their own to ``vlgate.audit``.
    logging.getLogger(LOGGER).propagate = False
    logger = logging.getLogger(f"{LOGGER}.{hashlib.sha256(str(path).encode()).hexdigest()[:12]}")
    with _handlers_lock:
        if not logger.handlers:
            path.parent.mkdir(parents=True, exist_ok=True)
            # gunicorn runs several worker processes appending to this one file. The standard
            # RotatingFileHandler would let each process rotate on its own (renaming the file under the
            # others, losing or interleaving lines); this handler takes an exclusive lock on a lock file
            # beside the log for each write and each rotation, and reopens the file when another process
            # rotated it, so every line lands whole, once, in whichever file is current.
            handler = ConcurrentRotatingFileHandler(str(path), maxBytes=settings.audit_max_bytes,
                                                    backupCount=settings.audit_backups, encoding="utf-8")
            handler.setFormatter(JsonFormatter("{message}", style="{", rename_fields={"message": "event"}))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)  # whatever VLGATE_LOG_LEVEL says of the app's own loggers
    return logger


class Audit:
    """One app's audit log: where it writes, which proxies it believes, and the keys' last-use clock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logger = file_logger(settings)
        self.proxies = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
        self.last_used = LastUsed()

    def trusted(self, address: str) -> bool:
        """Tell whether an address is one of the configured reverse proxies."""
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def client(self, remote: str | None, forwarded: str | None) -> str | None:
        """Return the client's address: the connecting one, or, behind trusted proxies, the first untrusted hop
        of X-Forwarded-For read from the right (anything left of it could be made up by the client)."""
        if remote is None or not self.proxies or not self.trusted(remote):
            return remote
        hops = [hop.strip() for hop in (forwarded or "").split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusted(hop):
                return hop[:64]
        return hops[0][:64] if hops else remote

    def write(self, event: str, record: Record, status: int | None) -> None:
        """Write one line about the current request (or turn)."""
        principal = g.get("principal")
        prefix = principal.prefix if principal is not None else None
        if prefix is None and principal is None:  # refused before it was known: name the key it tried
            secret = presented_secret()
            prefix = prefix_of(secret) if secret else None
        fields: dict[str, Any] = {
            "time": isoformat(utcnow()),
            "request_id": record.request_id,
            "key_id": principal.key_id if principal is not None else None,
            "key_prefix": prefix,
            "tenant": (principal.tenant or None) if principal is not None else None,
            "via": principal.via if principal is not None else None,
            "client": self.client(request.remote_addr, request.headers.get("X-Forwarded-For")),
            "method": "WS" if event == "ws_turn" else request.method,
            "path": redact(request.path)[:MAX_PATH],
            "query": _query(),
            "status": status,
            "error": record.error,
            "job_ids": record.job_ids,
            "jobs": record.jobs,
            "batch_id": record.batch_id,
            "image_sha256s": list(record.image_sha256s),
            "prompt_chars": record.prompt_chars,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "latency_ms": round((time.perf_counter() - record.started) * 1000, 1),
        }
        if self.settings.audit_prompts:
            fields["prompts"] = [redact(text) for text in record.prompts]
        self.logger.info(event, extra=fields)


def _query() -> str | None:
    """Return the query string with every credential replaced (a ``?ticket=`` opens a socket once)."""
    if not request.query_string:
        return None
    pairs = [(redact(name), REDACTED if name.lower() in SECRET_PARAMS else redact(value))
             for name, value in request.args.items(multi=True)]
    return urlencode(pairs)[:MAX_PATH]


def _audit() -> Audit | None:
    return current_app.extensions.get(EXTENSION_KEY) if has_request_context() else None


def note(*, job_ids: Sequence[str] = (), jobs: int = 0, batch_id: str | None = None,
         image_sha256s: Sequence[str] = (), prompt: str | None = None, prompt_tokens: int | None = None,
         completion_tokens: int | None = None, error: str | None = None) -> None:
    """Record what the current request did: the jobs it made (their ids, or a count for a batch's items), its batch,
    images, prompt texts and tokens; lists and counts add up over calls (outside a request: nothing)."""
    record = g.get("audit") if _audit() is not None else None
    if record is None:
        return
    record.job_ids.extend(job_ids)
    record.jobs += jobs + len(job_ids)
    record.batch_id = batch_id or record.batch_id
    record.image_sha256s.update(dict.fromkeys(image_sha256s))
    if prompt is not None:
        record.prompt_chars = (record.prompt_chars or 0) + len(prompt)
        if current_app.extensions[EXTENSION_KEY].settings.audit_prompts:
            record.prompts[prompt] = None
    if prompt_tokens is not None:
        record.prompt_tokens = (record.prompt_tokens or 0) + prompt_tokens
    if completion_tokens is not None:
        record.completion_tokens = (record.completion_tokens or 0) + completion_tokens
    if error is not None:
        record.error, record.status = error, ERROR_STATUS.get(error, 500)


def note_tokens(job: Any) -> None:
    """Record a finished job's token counts (when the answer carries them)."""
    note(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens)


@contextmanager
def turn() -> Iterator[None]:
    """Make a chat turn on a WebSocket its own audit line (status 202 when accepted, else its error's)."""
    audit = _audit()
    outer = g.get("audit") if audit is not None else None
    if audit is None or outer is None:
        yield
        return
    record = g.audit = Record(request_id=outer.request_id, status=202)
    try:
        yield
    except BaseException:
        record.status = 500
        raise
    finally:
        g.audit = outer
        try:
            audit.write("ws_turn", record, record.status)
        except Exception:  # noqa: BLE001 - the audit must never break the socket
            log.warning("could not write an audit line", exc_info=True)


def _start() -> None:
    """Open the request's record (this runs before authentication, so a refused request has one too)."""
    g.audit = Record(request_id=new_id("req"))


def _answered(response: Response) -> Response:
    """Take the status, and the error code from an error body (small JSON), as the request answers."""
    record = g.get("audit")
    if record is not None:
        websocket = type(response).__name__ == "WebSocketResponse"  # flask-sock's, after the socket closed
        record.status = 101 if websocket else response.status_code
        if response.status_code >= 400 and response.is_json and not response.is_streamed:
            body = response.get_json(silent=True)
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict) and isinstance(error.get("code"), str):
                record.error = error["code"]
    return response


def _finished(exc: BaseException | None) -> None:
    """Write the request's line (after a streamed body has ended too) and mark its key used."""
    audit = _audit()
    record = g.pop("audit", None)
    if audit is None:
        return
    try:
        record = record or Record(request_id=new_id("req"))
        if request.view_args:
            if "job_id" in request.view_args and not record.job_ids:
                record.job_ids.append(redact(str(request.view_args["job_id"]))[:64])
            if "batch_id" in request.view_args and not record.batch_id:
                record.batch_id = redact(str(request.view_args["batch_id"]))[:64]
        event = "ws_connection" if record.status == 101 else "request"
        audit.write(event, record, 500 if exc is not None and record.status is None else record.status)
    except Exception:  # noqa: BLE001 - a full disk must not turn answers into errors
        log.warning("could not write an audit line", exc_info=True)
    principal = g.get("principal")
    if principal is not None and principal.key_id is not None:
        try:
            audit.last_used.touch(services().session_factory, principal.key_id)
        except Exception:  # noqa: BLE001 - last_used_at is a convenience
            log.warning("could not record when key %s was last used", principal.key_id, exc_info=True)


def init_app(app: Flask, settings: Settings) -> None:
    """Open the audit log and write a line for every request; register before ``web.auth`` so that a request
    refused there still has its start time."""
    app.extensions[EXTENSION_KEY] = Audit(settings)
    app.before_request(_start)
    app.after_request(_answered)
    app.teardown_request(_finished)
