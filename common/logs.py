"""Process-wide logging: readable text or one JSON object per line (``VLGATE_LOG_FORMAT``).

Both formats go through the standard logging stack: one handler on the root logger, so records from
vlgate's modules, Celery and the libraries propagate to it; fields passed with ``extra=`` (``job_id``,
``worker_id``, ...) become keys of the JSON object.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from common.config import Settings

HANDLER_NAME = "vlgate"  # marks the handler this module installs, so that a second call replaces it
OWN_LOGGERS = ("common", "web", "worker", "scripts", "vlgate", "vlgate_cli")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields every JSON line starts with; renamed to the keys log shippers expect.
JSON_FIELDS = "{levelname}{name}{message}"
JSON_RENAMES = {"levelname": "level", "name": "logger"}


def make_formatter(settings: Settings) -> logging.Formatter:
    """Return the formatter of settings.log_format: 'text' or 'json'."""
    if settings.log_format == "json":
        # A worker process started per GPU has its id in VLGATE_WORKER_ID: every line it writes names it, so
        # lines from several workers can be told apart without a prefix. An extra= worker_id still wins.
        static = {"worker_id": settings.worker_id} if settings.worker_id else None
        # timestamp=True adds "timestamp": ISO 8601 in UTC, from the record's creation time.
        return JsonFormatter(JSON_FIELDS, style="{", rename_fields=JSON_RENAMES, static_fields=static,
                             timestamp=True)
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to one stream (default: stderr) in the configured format; safe to call again."""
    level = logging.getLevelNamesMapping().get(settings.log_level.upper())
    if level is None:
        raise ValueError(f"unknown log level {settings.log_level!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)  # a second call replaces the handler (new format or stream) instead of adding one
        handler.close()
    # The process's real stderr, not sys.stderr: a Celery worker replaces sys.stderr with a proxy that logs
    # what is written to it (a record would loop back into this handler), and pytest's capsys closes its
    # replacement after each test. Writing to file descriptor 2 is what both expect to capture.
    handler = logging.StreamHandler(stream if stream is not None else sys.__stderr__ or sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(make_formatter(settings))
    root.addHandler(handler)
    # VLGATE_LOG_LEVEL is the level of vlgate's own loggers; the libraries stay at INFO even when ours
    # say DEBUG (or follow ours up to WARNING and above).
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    root.setLevel(max(level, logging.INFO))
    return handler
