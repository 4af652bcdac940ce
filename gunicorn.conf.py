"""gunicorn settings shared by every launch (gunicorn reads this file from the working directory)."""

from __future__ import annotations

import os
import shutil
from typing import Any

# How one web process serves (docs/streams.md; measured side by side by ``python -m bench.streams``). Every open
# stream or waiting request holds a thread for its whole life: a WebSocket (plus simple-websocket's reader
# thread), a /v1 SSE stream, a POST /api/chat that waits. 1,100 threads hold 1,000 of them with room left for
# ordinary requests (32 held 32; the 33rd waited in the accept queue); threads start only when needed, and memory
# stays bounded by this count. gevent
# relays more tokens per CPU second at 1,000 streams, but any CPU work in a request (image normalisation, batch
# validation) freezes every stream meanwhile; it needs that work moved to native threads first (docs/streams.md).
# Launches pass only the bind, the process count and timeouts; GUNICORN_CMD_ARGS overrides these.
worker_class = "gthread"
threads = 1100
worker_connections = 2000  # client connections per process: the streams plus idle keep-alive ones


def on_starting(server: Any) -> None:
    """Give this server's workers one fresh prometheus-client multi-process directory (web/metrics.py).

    It is set before any worker starts (prometheus-client picks its storage when first imported) and is
    per server, so two servers on one data directory never mix their counts; directories left by servers
    that are gone are removed.
    """
    from common.config import get_settings

    root = get_settings().metrics_path
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("gunicorn-*"):
        if not _alive(int(old.name.rsplit("-", 1)[1])):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / f"gunicorn-{os.getpid()}"
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mine)


def when_ready(server: Any) -> None:
    """Tell the app which addresses it listens on (keys become required on any that is not loopback).

    Runs in the master before the first worker is forked; workers inherit the variable and read it through
    the settings (``VLGATE_BIND_HOSTS``).
    """
    hosts = []
    for address in server.cfg.bind:
        if address.startswith("unix:"):
            hosts.append("localhost")  # a Unix socket is reachable only on this machine
        elif address.startswith("fd://"):
            hosts.append("0.0.0.0")  # a socket handed over by a supervisor: assume it is public
        else:
            hosts.append(address.rsplit(":", 1)[0] if ":" in address else address)
    os.environ["VLGATE_BIND_HOSTS"] = ",".join(hosts)


def post_worker_init(worker: Any) -> None:
    """Answer the errors gunicorn gives itself (URL too long, headers too large) in vlgate's JSON shape, and start
    this worker's keeper of /v1 batches (web/openai/batch_keeper.py)."""
    from flask import Flask

    from web.openai.batch_keeper import start_keeper
    from web.server import use_json_errors

    use_json_errors()
    if isinstance(getattr(worker, "wsgi", None), Flask):
        start_keeper(worker.wsgi)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the shared metrics."""
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)


def _alive(pid: int) -> bool:
    """Tell whether a process exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

