"""Errors that gunicorn answers itself, before the app sees the request, in vlgate's JSON error shape.

A request line longer than gunicorn's limit (8190 bytes) or oversized headers never reach Flask: gunicorn
writes its own HTML page. ``gunicorn.conf.py`` installs :func:`use_json_errors` in every gunicorn worker so
those answers carry ``{"error": {"code", "message"}}`` like every other error.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util

# gunicorn's statuses for requests it refuses itself, mapped to our stable codes.
GUNICORN_CODES = {400: "invalid_request", 403: "forbidden", 414: "uri_too_long", 417: "invalid_request",
                  431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's error answer as JSON (same signature as ``gunicorn.util.write_error``)."""
    code = GUNICORN_CODES.get(status_int, "invalid_request")
    message = {414: "The request URL is too long (the limit is 8190 bytes).",
               431: "The request headers are too large."}.get(status_int) or f"{reason}: {mesg}".rstrip(": ")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


def use_json_errors() -> None:
    """Make this gunicorn worker process answer its own errors in JSON."""
    util.write_error = write_json_error  # gunicorn looks it up through the module at each error
