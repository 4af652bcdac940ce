"""configure_logging: JSON lines with the extra fields, readable text, no duplicate handlers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest

from common.config import Settings
from common.logs import HANDLER_NAME, OWN_LOGGERS, configure_logging
from common.queue import make_celery


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger and vlgate's loggers back as they were (pytest's own handlers included)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    own = {name: logging.getLogger(name).level for name in OWN_LOGGERS}
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, own_level in own.items():
        logging.getLogger(name).setLevel(own_level)


def _ours() -> list[logging.Handler]:
    """Return the root handlers configure_logging installed."""
    return [handler for handler in logging.getLogger().handlers if handler.get_name() == HANDLER_NAME]


def test_json_lines_carry_the_standard_and_extra_fields() -> None:
    out = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=out)
    log = logging.getLogger("worker.runner")
    log.info("claimed %s", "job-1", extra={"job_id": "job-1", "worker_id": "gpu0@host"})
    logging.getLogger("web.services.submit").warning("queue full", extra={"queue": "chat", "depth": 12})
    try:
        raise RuntimeError("device lost")
    except RuntimeError:
        log.exception("generation failed", extra={"job_id": "job-2"})

    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    first = records[0]
    assert first["level"] == "INFO" and first["logger"] == "worker.runner"
    assert first["message"] == "claimed job-1"  # %-arguments are applied, not left as a template
    assert (first["job_id"], first["worker_id"]) == ("job-1", "gpu0@host")
    assert datetime.fromisoformat(first["timestamp"]).utcoffset() is not None  # ISO 8601 with its zone
    assert (records[1]["level"], records[1]["queue"], records[1]["depth"]) == ("WARNING", "chat", 12)
    failed = records[2]
    assert failed["level"] == "ERROR" and failed["job_id"] == "job-2"
    assert "RuntimeError: device lost" in failed["exc_info"]  # the traceback stays inside the one line


def test_a_worker_process_names_itself_on_every_json_line() -> None:
    out = io.StringIO()
    configure_logging(Settings(log_format="json", worker_id="host-gpu1"), stream=out)
    logging.getLogger("celery.worker").info("ready")
    logging.getLogger("worker.reaper").info("re-queued", extra={"worker_id": "host-gpu0", "job_id": "job-3"})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["worker_id"] == "host-gpu1"
    assert second["worker_id"] == "host-gpu0"  # a record about another worker says so


def test_text_mode_is_readable_and_not_json() -> None:
    out = io.StringIO()
    configure_logging(Settings(log_format="text"), stream=out)
    logging.getLogger("web.services.jobs").info("job %s finished", "job-1", extra={"job_id": "job-1"})
    (line,) = out.getvalue().splitlines()
    assert "INFO web.services.jobs: job job-1 finished" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_calling_again_replaces_the_handler_instead_of_adding_one() -> None:
    first, second = io.StringIO(), io.StringIO()
    before = len(logging.getLogger().handlers)
    configure_logging(Settings(log_format="text"), stream=first)
    configure_logging(Settings(log_format="json"), stream=second)
    configure_logging(Settings(log_format="json"), stream=second)
    assert len(_ours()) == 1
    assert len(logging.getLogger().handlers) == before + 1
    logging.getLogger("worker.service").info("once")
    assert first.getvalue() == ""  # the replaced handler no longer writes
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


def test_level_applies_to_vlgate_loggers_not_to_every_library() -> None:
    out = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="debug"), stream=out)
    logging.getLogger("worker.engine").debug("step")
    logging.getLogger("urllib3.connectionpool").debug("a library's chatter")
    assert [json.loads(line)["logger"] for line in out.getvalue().splitlines()] == ["worker.engine"]

    out = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="WARNING"), stream=out)
    logging.getLogger("worker.engine").info("quiet now")
    logging.getLogger("celery.worker").info("quiet too")
    logging.getLogger("worker.engine").warning("still heard")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["still heard"]


def test_the_celery_worker_keeps_the_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured at worker_init, before Celery sets up logging: Celery must neither wipe nor double it."""
    for name in ("_MP_FORK_LOGLEVEL_", "_MP_FORK_LOGFILE_", "_MP_FORK_LOGFORMAT_"):
        monkeypatch.setenv(name, "")  # Celery writes these; monkeypatch puts them back afterwards
    out = io.StringIO()
    settings = Settings(log_format="json")
    handler = configure_logging(settings, stream=out)
    before = list(logging.getLogger().handlers)
    make_celery(settings).log.setup_logging_subsystem(loglevel="INFO")
    assert logging.getLogger().handlers == before and handler in before
    logging.getLogger("celery.worker").info("ready")
    assert [json.loads(line)["logger"] for line in out.getvalue().splitlines()] == ["celery.worker"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging(Settings(log_level="LOUD"), stream=io.StringIO())
