"""`make run`'s launcher for real: it starts its own Redis, migrates SQLite, runs a Celery worker and
gunicorn, serves the seed's client, restarts a child that dies, and SIGINT stops every process it started.
Also the supervisor it shares with the worker container, and how VLGATE_GPUS becomes one worker per GPU."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from pydantic import ValidationError

from common.config import Settings
from devtools.databases import make_image
from scripts.supervise import Program, Supervisor, describe_workers, gpu_ids, plan_workers, visible_gpus

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 40.0
T = TypeVar("T")


def _free_ports(count: int) -> list[int]:
    """Return distinct TCP ports that nothing listens on right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _listening(port: int) -> bool:
    """Return whether something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    """Return a live, non-zombie process's command line, or '' when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return ""
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def _parents() -> dict[int, int]:
    """Return every process's parent pid."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return parents


def _descendants(root: int) -> dict[int, str]:
    """Return every live descendant of root (children, grandchildren...) with its command line."""
    parents = _parents()
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = _cmdline(pid)
                frontier.append(pid)
    return {pid: cmd for pid, cmd in found.items() if cmd}


def _request(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """Send a GET (or a JSON POST) and return the status and the decoded JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _wait_for(check: Callable[[], T], proc: subprocess.Popen, log: Path, what: str) -> T:
    """Poll check() until it returns something truthy; fail early if run_local exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run_local exited ({proc.returncode}) before {what}:\n{log.read_text()}"
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"no {what} within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-5000:]}")


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, int, int]:
    """Start run_local on free ports with the demo model; its Redis URL points where nothing listens."""
    web_port, redis_port = _free_ports(2)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLGATE_")}
    env.update(VLGATE_MODEL="demo", VLGATE_DATA_DIR=str(tmp_path), VLGATE_DEVICE="cpu", VLGATE_HF_OFFLINE="1",
               VLGATE_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    log = tmp_path / "run_local.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "scripts/run_local.py", "--port", str(web_port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log, web_port, redis_port


def _cleanup(proc: subprocess.Popen, started: dict[int, str]) -> None:
    """Kill whatever a failed test left running."""
    if proc.poll() is None:
        started.update(_descendants(proc.pid))
        proc.kill()
        proc.wait()
    for pid, cmd in started.items():
        if _cmdline(pid) == cmd:  # the same process, not a reused pid
            os.kill(pid, signal.SIGKILL)


# -- VLGATE_GPUS: which workers start ----------------------------------------------------------------------------


def _fake_nvidia_smi(bin_dir: Path, output: str) -> Path:
    """Put an nvidia-smi in bin_dir that prints output for the GPU index query (and fails on anything else)."""
    bin_dir.mkdir(exist_ok=True)
    calls = bin_dir / "calls"
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                   '[ "$*" = "--query-gpu=index --format=csv,noheader" ] || exit 3\n'
                   f"printf '{output}'\n")
    smi.chmod(0o755)
    return calls


def _node(program: Program) -> str:
    """Return the Celery node name a worker program starts with."""
    return program.argv[program.argv.index("-n") + 1]


def test_gpus_all_starts_one_pinned_worker_per_gpu_that_nvidia_smi_lists(tmp_path: Path) -> None:
    calls = _fake_nvidia_smi(tmp_path / "bin", r"0\n1\n")
    env = {"PATH": str(tmp_path / "bin")}
    assert gpu_ids("all", env, dev_dir=tmp_path) == ["0", "1"]
    assert calls.read_text() == "--query-gpu=index --format=csv,noheader\n"

    workers = plan_workers(Settings(gpus="all", worker_id="hosta"), env, cpu_node="local", dev_dir=tmp_path)
    assert [worker.name for worker in workers] == ["worker gpu0", "worker gpu1"]
    for index, worker in enumerate(workers):
        assert worker.env["CUDA_VISIBLE_DEVICES"] == str(index)
        assert worker.env["VLGATE_DEVICE"] == "cuda:0"  # the only device that process sees
        assert worker.env["VLGATE_WORKER_ID"] == f"hosta-gpu{index}"
        assert worker.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # so CUDA's index is nvidia-smi's
        assert _node(worker) == f"gpu{index}@%h"
        assert "worker.celery_app:app" in worker.argv and "solo" in worker.argv and "chat,batch" in worker.argv
    assert describe_workers(workers, "auto") == "2 workers, one per GPU (0, 1)"


def test_gpus_list_pins_exactly_those_devices(tmp_path: Path) -> None:
    calls = _fake_nvidia_smi(tmp_path / "bin", r"0\n1\n2\n3\n")
    env = {"PATH": str(tmp_path / "bin")}
    assert gpu_ids(" 0, 2 ", env) == ["0", "2"]
    workers = plan_workers(Settings(gpus="0,2"), env, cpu_node="local")
    assert [worker.env["CUDA_VISIBLE_DEVICES"] for worker in workers] == ["0", "2"]
    assert [_node(worker) for worker in workers] == ["gpu0@%h", "gpu2@%h"]
    assert len({worker.env["VLGATE_WORKER_ID"] for worker in workers}) == 2
    assert not calls.exists(), "an explicit list needs no detection"


@pytest.mark.parametrize("spec", ["none", "cpu", "CPU"])
def test_gpus_none_is_one_cpu_worker_even_beside_gpus(tmp_path: Path, spec: str) -> None:
    _fake_nvidia_smi(tmp_path / "bin", r"0\n1\n")
    env = {"PATH": str(tmp_path / "bin")}
    assert gpu_ids(spec, env) == []
    (worker,) = plan_workers(Settings(gpus=spec), env, cpu_node="local")
    assert worker.name == "worker" and worker.env == {"VLGATE_DEVICE": "cpu"} and _node(worker) == "local@%h"
    assert describe_workers([worker], "auto") == "one worker on cpu"


def test_no_gpu_found_keeps_one_worker_as_before(tmp_path: Path) -> None:
    empty = {"PATH": str(tmp_path)}  # no nvidia-smi, no CUDA_VISIBLE_DEVICES, no /dev/nvidiaN
    assert gpu_ids("all", empty, dev_dir=tmp_path) == []
    (worker,) = plan_workers(Settings(gpus="all"), empty, cpu_node="local", dev_dir=tmp_path)
    assert worker.env == {} and _node(worker) == "local@%h", "VLGATE_DEVICE decides, as before"
    assert describe_workers([worker], "auto") == "one worker on auto (no GPU found)"
    # An explicit VLGATE_DEVICE=cuda:N without VLGATE_GPUS keeps its one worker on that device.
    (worker,) = plan_workers(Settings(device="cuda:1"), empty, cpu_node="local", dev_dir=tmp_path)
    assert worker.env == {} and describe_workers([worker], "cuda:1") == "one worker on cuda:1"


def test_gpu_detection_with_a_restriction_and_without_nvidia_smi(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "bin", r"0\n1\n2\n3\n")
    # The user's CUDA_VISIBLE_DEVICES wins over what nvidia-smi lists; CUDA stops at an invalid entry.
    restricted = {"PATH": str(tmp_path / "bin"), "CUDA_VISIBLE_DEVICES": "1,3"}
    assert visible_gpus(restricted) == ["1", "3"]
    assert visible_gpus({**restricted, "CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({**restricted, "CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]
    # A container without nvidia-smi: its device nodes keep their host minor numbers, CUDA counts from 0.
    dev = tmp_path / "dev"
    dev.mkdir()
    for node in ("nvidia3", "nvidia5", "nvidiactl", "nvidia-uvm"):
        (dev / node).touch()
    assert visible_gpus({"PATH": str(tmp_path / "nowhere")}, dev_dir=dev) == ["0", "1"]
    # nvidia-smi present but failing (no driver loaded): no GPU rather than a guess from the device nodes.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (broken / "nvidia-smi").chmod(0o755)
    assert visible_gpus({"PATH": str(broken)}, dev_dir=dev) == []


@pytest.mark.parametrize("spec", ["0,x", "0,,1", "-1", "gpu0", ""])
def test_a_malformed_gpus_setting_is_refused(spec: str) -> None:
    with pytest.raises(ValidationError):
        Settings(gpus=spec)
    with pytest.raises(ValueError, match="VLGATE_GPUS"):
        gpu_ids(spec, {})


# -- the supervisor, with stand-in programs -----------------------------------------------------------------------


def _python(code: str) -> list[str]:
    """Return the command that runs a Python snippet."""
    return [sys.executable, "-c", code]


def _poll(supervisor: Supervisor, until: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Run the supervisor's checks until until() holds."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the supervisor did not get there in time"
        supervisor.check()
        time.sleep(0.02)


def test_supervisor_restarts_a_dead_child_with_growing_delay_and_leaves_the_others(
        capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = Supervisor(5.0, backoff_start_s=0.1, backoff_max_s=0.4)
    steady = supervisor.start(Program("steady", _python("import time; time.sleep(60)")))
    broken_gpu = "import sys; print('up', flush=True); sys.exit(75)"
    supervisor.start(Program("worker gpu1", _python(broken_gpu)))
    pids: set[int] = set()

    def restarted_four_times() -> bool:
        """Collect the flaky child's pids."""
        pids.add(supervisor.pids()["worker gpu1"] or 0)
        return len(pids - {0}) >= 5

    try:
        _poll(supervisor, restarted_four_times)
        assert steady.poll() is None and supervisor.pids()["steady"] == steady.pid, "the other child was touched"
    finally:
        supervisor.stop()
    out, err = capsys.readouterr()
    delays = re.findall(r"^vlgate: worker gpu1 exited \(code 75: its GPU stayed broken after a fault\); "
                        r"restarting in ([\d.]+) s$", err, re.M)
    assert delays[:4] == ["0.1", "0.2", "0.4", "0.4"], err
    assert re.search(r"^vlgate: worker gpu1 started again \(pid \d+\)$", err, re.M), err
    assert re.search(r"^worker gpu1 \| up$", out, re.M), out  # each output line says which child wrote it
    assert steady.returncode == -signal.SIGTERM


def test_supervisor_restarts_quickly_again_after_a_stable_run(capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = Supervisor(5.0, backoff_start_s=0.1, backoff_max_s=10.0, stable_s=0.2)
    supervisor.start(Program("web", _python("import time; time.sleep(0.3)")))  # up longer than stable_s
    said: list[str] = []

    def restarted_three_times() -> bool:
        """Collect what the supervisor said."""
        said.append(capsys.readouterr().err)
        return "".join(said).count("restarting") >= 3

    try:
        _poll(supervisor, restarted_three_times)
    finally:
        supervisor.stop()
    assert re.findall(r"restarting in ([\d.]+) s", "".join(said)) == ["0.1", "0.1", "0.1"]


def test_supervisor_stops_tier_by_tier_and_kills_what_ignores_sigterm(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    order = tmp_path / "order"

    def child(name: str, pause_s: float) -> list[str]:
        """A child that, on SIGTERM, waits pause_s and then records that it stopped."""
        return _python(
            "import pathlib, signal, sys, time\n"
            f"def bye(*_):\n    time.sleep({pause_s})\n    open({str(order)!r}, 'a').write({name!r} + ' ')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye)\n"
            f"pathlib.Path({str(tmp_path / name)!r}).touch()\n"
            "time.sleep(60)")

    supervisor = Supervisor(1.0)
    supervisor.start(Program("redis", child("redis", 0), tier=1))
    supervisor.start(Program("web", child("web", 0.3)))
    stubborn = supervisor.start(Program("stubborn", _python(
        "import pathlib, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(tmp_path / 'stubborn')!r}).touch()\ntime.sleep(60)")))
    _poll(supervisor, lambda: all((tmp_path / name).exists() for name in ("redis", "web", "stubborn")))
    supervisor.stop()
    assert order.read_text().split() == ["web", "redis"], "Redis stops only after the processes that use it"
    assert stubborn.returncode == -signal.SIGKILL
    assert "vlgate: stubborn did not stop in time; killing it" in capsys.readouterr().err


# -- make run for real: one instance, shared by the tests below (in this order) -------------------------------------


@dataclass
class LocalRun:
    """A running run_local and every process it was seen to start."""

    proc: subprocess.Popen
    log: Path
    web_port: int
    redis_port: int
    data_dir: Path
    seen: dict[int, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """Return the web's base URL."""
        return f"http://127.0.0.1:{self.web_port}"

    def children(self) -> dict[str, int]:
        """Return run_local's live children by role (redis, worker, web), remembering them for the cleanup."""
        self.seen.update(_descendants(self.proc.pid))
        roles = {"redis-server": "redis", "worker.celery_app:app": "worker", "gunicorn": "web"}
        found = {}
        for pid, ppid in _parents().items():
            command = _cmdline(pid) if ppid == self.proc.pid else ""
            for mark, role in roles.items():
                if mark in command:
                    found[role] = pid
        return found

    def running(self) -> dict[str, int] | None:
        """Return the children once all three run."""
        children = self.children()
        return children if set(children) == {"redis", "worker", "web"} else None

    def ready(self) -> dict[str, int] | None:
        """Return the children once all three run and health lists the current worker with its model loaded."""
        children = self.running()
        if children is None:
            return None
        _status, health = _request(f"{self.base}/api/health", timeout=5)
        live = [w for w in health.get("workers", []) if w["pid"] == children["worker"] and w["loaded"]]
        return children if live else None

    def wait(self, check: Callable[[], T], what: str) -> T:
        """Poll check() until it is truthy, failing early if run_local exits."""
        return _wait_for(check, self.proc, self.log, what)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    """One run_local for the tests below: starting it (and its worker's model) is most of their time."""
    data_dir = tmp_path_factory.mktemp("run-local")
    proc, log, web_port, redis_port = _start(data_dir)
    run = LocalRun(proc, log, web_port, redis_port, data_dir)
    try:
        yield run
    finally:
        _cleanup(proc, run.seen)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_run_local_serves_the_seed_client(local: LocalRun) -> None:
    status, health = local.wait(lambda: _request(f"{local.base}/api/health", timeout=5), "/api/health")
    assert status in (200, 503) and "workers" in health, health

    # The seed's client: one chat call with an image answers 200 with the text in "response".
    image = base64.b64encode(make_image()).decode()
    chat = {"image": image, "prompt": "What colour is this?", "temperature": 0.4, "max_tokens": 8}

    def ask() -> tuple[int, dict] | None:
        """Chat once; None while the worker is still loading (503 model_not_loaded)."""
        reply = _request(f"{local.base}/api/chat", chat)
        return reply if reply[0] == 200 else None

    status, answer = local.wait(ask, "answer from /api/chat")
    assert isinstance(answer["response"], str) and answer["session_id"], answer

    # Its own Redis, the SQLite file under the data dir with the migrations applied.
    assert local.running(), local.seen
    with sqlite3.connect(local.data_dir / "vlgate.db") as db:
        assert db.execute("select version_num from alembic_version").fetchall()
    log = local.log.read_text()
    assert "vlgate is serving on" in log and "workers  one worker on cpu" in log, log[-3000:]
    # No key made and bound to loopback: open, and both the banner and the web's own log say so.
    assert "access   OPEN: no API key exists" in log and "vlgate runs OPEN" in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_redis_it_started_is_restarted(local: LocalRun) -> None:
    before = local.wait(local.ready, "a loaded worker")
    os.kill(before["redis"], signal.SIGKILL)

    def new_redis() -> dict[str, int] | None:
        """Return the children once another Redis answers on the same port."""
        children = local.children()
        if children.get("redis") in (None, before["redis"]):
            return None
        try:
            return children if redis.Redis(port=local.redis_port, socket_timeout=1).ping() else None
        except redis.RedisError:
            return None

    after = local.wait(new_redis, "a new Redis")
    assert (after["web"], after["worker"]) == (before["web"], before["worker"]), "only Redis was restarted"
    assert "vlgate: redis was killed by SIGKILL; restarting in 1 s" in local.log.read_text()
    local.wait(lambda: _request(f"{local.base}/api/health", timeout=5)[1]["redis"]["ok"], "the web back on Redis")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_worker_is_restarted_while_the_web_stays_up(local: LocalRun) -> None:
    # Not local.ready: after the Redis test the worker's status returns only with its next heartbeat.
    before = local.wait(local.running, "all three children")
    os.kill(before["worker"], signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status, health = _request(f"{local.base}/api/health", timeout=5)  # raises if the web went down
        assert status in (200, 503), health
        after = local.ready()
        if after and after["worker"] != before["worker"]:
            break
        assert time.monotonic() < deadline, f"no new worker:\n{local.log.read_text()[-5000:]}"
        time.sleep(0.25)
    assert (after["web"], after["redis"]) == (before["web"], before["redis"]), "only the worker was restarted"
    assert "vlgate: worker was killed by SIGKILL; restarting in 1 s" in local.log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_web_is_restarted_and_the_worker_keeps_running(local: LocalRun) -> None:
    before = local.wait(local.ready, "a loaded worker")
    os.kill(before["web"], signal.SIGKILL)
    after = local.wait(lambda: (ready := local.ready()) and ready["web"] != before["web"] and ready, "a new web")
    assert (after["worker"], after["redis"]) == (before["worker"], before["redis"]), "the worker was stopped"
    assert "vlgate: web was killed by SIGKILL; restarting in 1 s" in local.log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigint_stops_everything(local: LocalRun) -> None:
    local.wait(local.running, "all three children")
    local.proc.send_signal(signal.SIGINT)
    assert local.proc.wait(timeout=STOP_TIMEOUT_S) == 0, local.log.read_text()[-5000:]
    survivors = {pid: cmd for pid, cmd in local.seen.items() if _cmdline(pid) == cmd}
    assert not survivors, f"still running after run_local exited: {survivors}"
    assert not _listening(local.web_port) and not _listening(local.redis_port)
    assert "vlgate: SIGINT: stopping" in local.log.read_text()
