"""Keep vlgate's processes running: one worker per GPU, each restarted with backoff when it dies.

`make run` (scripts/run_local.py) supervises Redis, the workers and the web with it; the worker container
runs `python scripts/supervise.py` (docker/worker.sh) to hold one worker per GPU it sees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click

if not __package__:  # run as a file (`python scripts/supervise.py`): make common/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.queue import EXIT_DEVICE_FAULT  # noqa: E402 - after the path fix above

if TYPE_CHECKING:
    from common.config import Settings

ROOT = Path(__file__).resolve().parents[1]
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a process that stayed up this long was healthy: its next restart waits BACKOFF_START_S again
POLL_S = 0.25
NVIDIA_SMI_TIMEOUT_S = 10.0
EXIT_REASONS = {EXIT_DEVICE_FAULT: "its GPU stayed broken after a fault"}
CPU_SPECS = ("none", "cpu")


class Shutdown(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM to unwind into the ordered stop."""


@dataclass
class Program:
    """One supervised command: what to run, the environment it adds, and when it stops."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    tier: int = 0  # lower tiers stop first: the web and the workers before the Redis they use


@dataclass
class _Run:
    """A program's current process and its restart backoff."""

    program: Program
    delay_s: float
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # set while the process is dead and waiting for its restart


def say(message: str) -> None:
    """Print one supervisor line on stderr."""
    click.echo(f"vlgate: {message}", err=True)


def _load_prctl() -> Callable[..., int] | None:
    """Return libc's prctl on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """Have the kernel SIGTERM this child if the supervisor itself is killed (kill -9) without cleaning up."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _describe(returncode: int) -> str:
    """Say how a child ended: its exit code (with what it means to vlgate) or the signal that killed it."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    reason = EXIT_REASONS.get(returncode)
    return f"exited (code {returncode}{': ' + reason if reason else ''})"


class Supervisor:
    """Start programs, restart each one that dies after a growing delay, and stop them all in tiers."""

    def __init__(self, stop_timeout_s: float, cwd: Path = ROOT, backoff_start_s: float = BACKOFF_START_S,
                 backoff_max_s: float = BACKOFF_MAX_S, stable_s: float = STABLE_S) -> None:
        self.stop_timeout_s = stop_timeout_s
        self.cwd = cwd
        self.backoff_start_s, self.backoff_max_s, self.stable_s = backoff_start_s, backoff_max_s, stable_s
        self.stopping = False
        self.force = False  # a second signal while stopping: kill instead of waiting
        self._runs: list[_Run] = []
        self._pumps: list[threading.Thread] = []
        self._out_lock = threading.Lock()
        self._width = 0
        self._launching = False
        self._pending: str | None = None  # a signal that arrived while a child was being started

    def handle_signals(self) -> None:
        """Turn the first SIGINT or SIGTERM into Shutdown in the main thread; a second one hurries the stop."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        """Unwind now, or right after the child being started is registered (so that it is stopped too)."""
        if self.stopping:
            self.force = True
            return
        self.stopping = True
        if self._launching:
            self._pending = signal.Signals(signum).name
            return
        raise Shutdown(signal.Signals(signum).name)

    def start(self, program: Program) -> subprocess.Popen:
        """Start a program now and keep it running until stop()."""
        run = _Run(program, self.backoff_start_s)
        self._runs.append(run)
        self._width = max(self._width, len(program.name))
        self._launch(run)
        assert run.proc is not None
        return run.proc

    def check(self) -> None:
        """Notice children that died and restart those whose delay has passed; the others keep running."""
        now = time.monotonic()
        for run in self._runs:
            if self.stopping:
                return
            assert run.proc is not None
            if run.restart_at is None and run.proc.poll() is not None:
                if now - run.started_at >= self.stable_s:
                    run.delay_s = self.backoff_start_s
                run.restart_at = now + run.delay_s
                say(f"{run.program.name} {_describe(run.proc.returncode)}; restarting in {run.delay_s:g} s")
                run.delay_s = min(run.delay_s * 2, self.backoff_max_s)
            elif run.restart_at is not None and now >= run.restart_at:
                self._launch(run)
                say(f"{run.program.name} started again (pid {run.proc.pid})")

    def pids(self) -> dict[str, int | None]:
        """Return each program's current pid, None while it waits for its restart."""
        return {run.program.name: run.proc.pid if run.proc is not None and run.restart_at is None else None
                for run in self._runs}

    def run_forever(self) -> None:
        """Check the children until a signal raises Shutdown."""
        while True:
            self.check()
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop every child, tier by tier: SIGTERM, wait up to stop_timeout_s, then SIGKILL."""
        self.stopping = True
        for tier in sorted({run.program.tier for run in self._runs}):
            running = [(run.program.name, run.proc) for run in self._runs
                       if run.program.tier == tier and run.proc is not None and run.proc.poll() is None]
            for _name, proc in running:
                proc.terminate()
            deadline = time.monotonic() + self.stop_timeout_s
            while any(proc.poll() is None for _name, proc in running):
                if self.force or time.monotonic() > deadline:
                    for name, proc in running:
                        if proc.poll() is None:
                            say(f"{name} did not stop in time; killing it")
                            proc.kill()
                            proc.wait()
                    break
                time.sleep(0.1)
        for pump in self._pumps:
            pump.join(timeout=1.0)  # let the children's last lines (their shutdown messages) through

    def _launch(self, run: _Run) -> None:
        """Start a run's process in its own process group, its output prefixed with its name."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **run.program.env}
        with self._deferred_signals():
            # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which then stops
            # the children in order (web and workers before the Redis they use).
            proc = subprocess.Popen(run.program.argv, cwd=self.cwd, env=env, process_group=0,
                                    preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            run.proc, run.started_at, run.restart_at = proc, time.monotonic(), None
            assert proc.stdout is not None
            pump = threading.Thread(target=self._pump, args=(run.program.name, proc.stdout), daemon=True,
                                    name=f"output of {run.program.name}")
            self._pumps = [thread for thread in self._pumps if thread.is_alive()] + [pump]
            pump.start()

    @contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """Hold a Shutdown back until the child being started is registered and drained, so that stop() finds it."""
        self._launching = True
        try:
            yield
        finally:
            self._launching = False
        if self._pending:
            name, self._pending = self._pending, None
            raise Shutdown(name)

    def _pump(self, name: str, stream: IO[bytes]) -> None:
        """Copy a child's output lines to stdout behind its name (several workers share one terminal or log).

        JSON log lines (VLGATE_LOG_FORMAT=json) pass unchanged: a log shipper must be able to parse them,
        and each already names its worker.
        """
        for line in iter(stream.readline, b""):
            with self._out_lock:
                try:
                    prefix = b"" if line.startswith(b"{") else f"{name:<{self._width}} | ".encode()
                    sys.stdout.buffer.write(prefix + line)
                    sys.stdout.buffer.flush()
                except (OSError, ValueError):
                    pass  # nobody reads our output any more: keep draining so that the child never blocks
        stream.close()


def visible_gpus(env: Mapping[str, str], dev_dir: Path = Path("/dev")) -> list[str]:
    """List the CUDA devices this host or container shows, without importing torch (which takes seconds)."""
    restricted = env.get("CUDA_VISIBLE_DEVICES")
    if restricted is not None:
        # The user's own restriction wins over what nvidia-smi lists. CUDA reads the list up to the first
        # invalid entry: an empty value or -1 hides every GPU.
        ids = []
        for part in (part.strip() for part in restricted.split(",")):
            if not part or part.startswith("-"):
                break
            ids.append(part)
        return ids
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        # A container without the driver's utilities still has one device node per GPU it was given;
        # CUDA numbers them from 0 whatever their host minor numbers.
        count = sum(1 for node in dev_dir.glob("nvidia*") if re.fullmatch(r"nvidia\d+", node.name))
        return [str(index) for index in range(count)]
    try:
        result = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=NVIDIA_SMI_TIMEOUT_S, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as exc:
        say(f"nvidia-smi did not answer ({exc}); no GPU is used")
        return []
    if result.returncode != 0:
        say(f"nvidia-smi failed ({(result.stderr or result.stdout).strip() or result.returncode}); no GPU is used")
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def gpu_ids(spec: str, env: Mapping[str, str], dev_dir: Path = Path("/dev")) -> list[str]:
    """Return the GPUs VLGATE_GPUS names: 'all' = every visible one, '0,2' = those, 'none' or 'cpu' = none."""
    spec = spec.strip().lower()
    if spec in CPU_SPECS:
        return []
    if spec == "all":
        return visible_gpus(env, dev_dir)
    ids = [part.strip() for part in spec.split(",")]
    if not all(part.isdigit() for part in ids):
        raise ValueError(f"VLGATE_GPUS must be 'all', 'none', 'cpu' or GPU indices like '0,1', not {spec!r}")
    return list(dict.fromkeys(ids))


def worker_argv(node: str, loglevel: str = "INFO") -> list[str]:
    """Return the command of one Celery worker: the solo pool runs tasks in the process that holds the model."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "--pool", "solo",
            "--concurrency", "1", "-Q", "chat,batch", "-n", node, "--loglevel", loglevel]


def plan_workers(settings: Settings, env: Mapping[str, str], cpu_node: str, loglevel: str = "INFO",
                 dev_dir: Path = Path("/dev")) -> list[Program]:
    """Plan one worker per GPU, each pinned to its device as cuda:0; one worker on VLGATE_DEVICE without GPUs."""
    single = worker_argv(f"{cpu_node}@%h", loglevel)
    if settings.device == "cpu" or settings.gpus.strip().lower() in CPU_SPECS:
        return [Program("worker", single, {"VLGATE_DEVICE": "cpu"})]
    if settings.device.startswith("cuda:") and "gpus" not in settings.model_fields_set:
        return [Program("worker", single)]  # an explicit device and no VLGATE_GPUS: that device only, as before
    gpus = gpu_ids(settings.gpus, env, dev_dir)
    if not gpus:
        return [Program("worker", single)]  # VLGATE_DEVICE decides, as before VLGATE_GPUS existed
    prefix = settings.worker_id or socket.gethostname()
    # nvidia-smi numbers GPUs by PCI bus; CUDA's default order (fastest first) may differ on mixed hosts.
    order = env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    programs = []
    for position, gpu in enumerate(gpus):
        label = f"gpu{gpu if gpu.isdigit() else position}"  # a GPU UUID would make an unreadable name
        pinned = {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": order, "VLGATE_DEVICE": "cuda:0",
                  "VLGATE_WORKER_ID": f"{prefix}-{label}"}
        programs.append(Program(f"worker {label}", worker_argv(f"{label}@%h", loglevel), pinned))
    return programs


def describe_workers(programs: list[Program], device: str) -> str:
    """Say in a few words where the planned workers run."""
    gpus = [program.env["CUDA_VISIBLE_DEVICES"] for program in programs if "CUDA_VISIBLE_DEVICES" in program.env]
    if not gpus:
        device = programs[0].env.get("VLGATE_DEVICE", device)
        return f"one worker on {device}" + (" (no GPU found)" if device == "auto" else "")
    return f"{len(gpus)} worker{'s' if len(gpus) > 1 else ''}, one per GPU ({', '.join(gpus)})"


def refuse_unsafe(settings: Settings) -> None:
    """Stop here, with the reason, rather than restart workers that refuse to start (common/deployment.py)."""
    from common.deployment import UnsafeDeployment, check_deployment

    try:
        check_deployment(settings)
    except UnsafeDeployment as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--stop-timeout", type=float, default=290.0, show_default=True,
              help="Seconds a worker may take to finish its generation after SIGTERM before it is killed.")
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
def main(stop_timeout: float, loglevel: str) -> None:
    """Run one Celery worker per GPU this machine shows (VLGATE_GPUS), restarting any that dies."""
    from common.config import Settings

    settings = Settings()
    refuse_unsafe(settings)
    programs = plan_workers(settings, os.environ, cpu_node="worker", loglevel=loglevel)
    say(f"starting {describe_workers(programs, settings.device)}")
    supervisor = Supervisor(stop_timeout)
    supervisor.handle_signals()
    try:
        for program in programs:
            supervisor.start(program)
        supervisor.run_forever()
    except Shutdown as stop:
        say(f"{stop}: stopping the workers")
    finally:
        supervisor.stop()


if __name__ == "__main__":
    main()
