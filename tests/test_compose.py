"""docker-compose.yml, Dockerfile and the entrypoint scripts, checked by parsing (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from common.config import Settings
from scripts.supervise import worker_argv

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = "/app"  # the Dockerfile's WORKDIR: where the repository lies inside the image
SCRIPTS = sorted([*ROOT.glob("docker/*.sh"), *ROOT.glob("scripts/*.sh")])
# Services that run someone else's image; the monitoring and flower profiles are the optional ones.
THIRD_PARTY = {"redis": None, "postgres": None, "prometheus": "monitoring", "grafana": "monitoring",
               "flower": "flower"}


# What an operator puts in .env: the secrets compose requires (${VAR:?message}) and nothing else.
OPERATOR_ENV = {"POSTGRES_PASSWORD": "n0t-the-default-Pw", "VLGATE_ADMIN_KEY": "vlg_0a1b2c3d_" + "k" * 43}
REQUIRED = re.compile(r"\$\{(\w+):?\?([^}]*)\}")


class MissingVariable(Exception):
    """Compose would refuse the file: a required variable is not set (its message is compose's)."""


def _interpolate(value: Any, host: dict[str, str]) -> Any:
    """Resolve compose's ${VAR:-default} / ${VAR-default} / ${VAR} / ${VAR:?error} as on a host that sets only
    `host`; a required variable it lacks raises MissingVariable, as `docker compose` stops with that error."""
    if isinstance(value, str):
        def required(match: re.Match[str]) -> str:
            if not host.get(match[1]):
                raise MissingVariable(f"{match[1]}: {match[2]}")
            return host[match[1]]
        value = REQUIRED.sub(required, value)
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: host.get(m[1]) or m[2] or "", value)
    if isinstance(value, list):
        return [_interpolate(item, host) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item, host) for key, item in value.items()}
    return value


def _load(host: dict[str, str]) -> dict[str, Any]:
    return _interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), host)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file with YAML anchors merged, the required secrets set, other variables at their defaults."""
    return _load(OPERATOR_ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services by name."""
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str | None]:
    """Return a service's environment as a dict, whichever of compose's two forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: None if value is None else str(value) for key, value in env.items()}


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Return a service's NVIDIA device reservations."""
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [device for device in devices if device.get("driver") == "nvidia"]


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the services that reserve a GPU."""
    return {name: service for name, service in services.items() if _gpu_devices(service)}


def _app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return the services that run the vlgate image (everything but the third-party ones)."""
    return {name: service for name, service in services.items() if name not in THIRD_PARTY}


def _script(command: list[str] | str) -> Path:
    """Map a container command running /app/docker/x.sh to that script in the repository."""
    first = command[0] if isinstance(command, list) else command.split()[0]
    assert first.startswith(f"{APP_DIR}/docker/"), f"{command} does not run an entrypoint script"
    return ROOT / first.removeprefix(f"{APP_DIR}/")


def _seconds(duration: str) -> float:
    """Parse a compose duration like '5m', '1m30s' or '40s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _named_volumes(service: dict[str, Any], declared: dict[str, Any]) -> dict[str, str]:
    """Return a service's named-volume mounts as {volume: container path}."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = (volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"]))
        if not source.startswith((".", "/", "~")):
            assert source in declared, f"volume {source} is used but not declared"
            mounts[source] = target
    return mounts


def test_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "postgres", "migrate", "web"} <= set(services)
    assert _workers(services), "no worker reserves a GPU"


def test_redis_persists_queued_tasks(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert _named_volumes(redis, compose["volumes"]).get("redis-data") == "/data"


def test_postgres_has_healthcheck_and_credentials(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    env = _env(postgres)
    assert env["POSTGRES_USER"] and env["POSTGRES_PASSWORD"] and env["POSTGRES_DB"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any("/var/lib/postgresql/data" in str(volume) for volume in postgres["volumes"])


def test_compose_refuses_to_start_without_the_database_password_and_the_admin_key() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for name in OPERATOR_ENV:
        # Every use of a secret requires it: no default value anywhere (the old default password was 'vlgate').
        uses = re.findall(rf"\$\{{{name}([^}}]*)\}}", text)
        assert uses and all(re.fullmatch(r":\?.+", use) for use in uses), f"{name} must be ${{{name}:?message}}: {uses}"
        with pytest.raises(MissingVariable, match=name):
            _load({key: value for key, value in OPERATOR_ENV.items() if key != name})
    assert _load(OPERATOR_ENV)  # both set: compose has what it needs


def test_app_services_run_in_production_and_require_keys(services: dict[str, dict[str, Any]]) -> None:
    from common.deployment import check_deployment

    for name, service in _app_services(services).items():
        env = _env(service)
        settings = Settings(environment=env["VLGATE_ENVIRONMENT"], auth=env["VLGATE_AUTH"],
                            database_url=env["VLGATE_DATABASE_URL"])
        assert (settings.environment, settings.auth) == ("production", "required"), name
        check_deployment(settings)  # the operator's password passes
    # Only the web makes the bootstrap admin key; the workers never see it.
    assert _env(services["web"])["VLGATE_ADMIN_KEY"] == OPERATOR_ENV["VLGATE_ADMIN_KEY"]
    assert all("VLGATE_ADMIN_KEY" not in _env(service) for name, service in _app_services(services).items()
               if name != "web")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s+VLGATE_ENVIRONMENT=production\b", dockerfile, re.M), "the image runs as production"


def test_production_refuses_the_compose_files_old_default_password() -> None:
    from common.deployment import UnsafeDeployment, check_deployment

    web = _env(_load({**OPERATOR_ENV, "POSTGRES_PASSWORD": "vlgate"})["services"]["web"])
    assert urlsplit(web["VLGATE_DATABASE_URL"]).password == "vlgate"
    with pytest.raises(UnsafeDeployment, match="well-known default password"):
        check_deployment(Settings(environment=web["VLGATE_ENVIRONMENT"], database_url=web["VLGATE_DATABASE_URL"]))


def test_migrate_runs_once_after_postgres(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert _script(migrate["command"]).name == "migrate.sh"


def test_web(services: dict[str, dict[str, Any]]) -> None:
    web = services["web"]
    assert any(str(port).split(":")[-1] == "8501" for port in web["ports"])
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert web["depends_on"]["redis"]["condition"] == "service_healthy"
    probe = " ".join(web["healthcheck"]["test"])
    assert "localhost:8501/api/health" in probe and "urllib" in probe
    assert _script(web["command"]).name == "web.sh"


def test_one_worker_service_holds_every_gpu(services: dict[str, dict[str, Any]]) -> None:
    workers = _workers(services)
    # `docker compose up` on any host: one service, no profile to turn on, every GPU reserved.
    default = {name: worker for name, worker in workers.items() if not worker.get("profiles")}
    assert list(default) == ["worker"], f"one worker service instead of one per GPU: {sorted(workers)}"
    for name, worker in workers.items():
        (device,) = _gpu_devices(worker)
        assert "gpu" in device["capabilities"], name
        assert ("count" in device) != ("device_ids" in device), f"{name}: compose takes count or device_ids"
        env = _env(worker)
        # The supervisor pins each worker process to one GPU (cuda:0 inside it); a fixed device or
        # CUDA_VISIBLE_DEVICES here would put every process on the same card.
        assert env.get("VLGATE_DEVICE") in (None, "auto"), name
        assert "CUDA_VISIBLE_DEVICES" not in env, name
        assert "VLGATE_WORKER_ID" not in env, f"{name}: ids come from the container's host name and the GPU"
        assert _script(worker["command"]).name == "worker.sh"
        assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    worker = default["worker"]
    assert _gpu_devices(worker)[0]["count"] == "all"
    assert _env(worker)["VLGATE_GPUS"] == "all"
    Settings(gpus=_env(worker)["VLGATE_GPUS"])  # a value the workers accept
    assert re.search(r"device_ids: \[\"0\", \"1\"\]", (ROOT / "docker-compose.yml").read_text()), \
        "the file shows how to pin the worker service to some GPUs"


def test_worker_stop_lets_generations_finish_within_the_grace_period(services: dict[str, dict[str, Any]]) -> None:
    script = (ROOT / "docker/worker.sh").read_text()
    stop = re.search(r"--stop-timeout \"\$\{WORKER_STOP_TIMEOUT_S:-(\d+)\}\"", script)
    assert stop, "worker.sh gives the supervisor a stop timeout"
    for name, worker in _workers(services).items():
        grace = _seconds(worker["stop_grace_period"])
        assert grace >= 60, f"{name}: let a generation finish on shutdown"
        # The supervisor kills stragglers itself before Docker's SIGKILL ends the container.
        assert int(stop[1]) < grace, f"{name}: supervisor stop timeout {stop[1]} s exceeds the grace {grace} s"


def test_named_volumes_for_models_data_and_logs(services: dict[str, dict[str, Any]], compose: dict[str, Any]) -> None:
    declared = compose["volumes"]
    assert {"models", "data", "logs"} <= set(declared)
    for name, worker in _workers(services).items():
        mounts = _named_volumes(worker, declared)
        env = _env(worker)
        assert mounts.get("models") == env["HF_HOME"], f"{name}: the model cache must be the volume"
        assert mounts.get("data") == env["VLGATE_DATA_DIR"], name
        assert "logs" in mounts, name
    used = {volume for service in services.values() for volume in _named_volumes(service, declared)}
    assert used == set(declared), f"declared but unused: {set(declared) - used}"


def test_app_services_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    apps = _app_services(services)
    assert {(service.get("image"), repr(service.get("build"))) for service in apps.values()} == {
        (apps["web"]["image"], repr(apps["web"]["build"]))}
    build = apps["web"]["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()


def test_app_environment_points_at_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    postgres_env = _env(services["postgres"])
    for name, service in _app_services(services).items():
        env = _env(service)
        database = urlsplit(env["VLGATE_DATABASE_URL"])
        assert database.scheme == "postgresql+psycopg" and database.hostname == "postgres", name
        assert (database.username, database.password, database.path) == (
            postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], "/" + postgres_env["POSTGRES_DB"]), name
        redis = urlsplit(env["VLGATE_REDIS_URL"])
        assert redis.scheme == "redis" and redis.hostname == "redis", name
        assert env["VLGATE_MODEL"] == "Qwen/Qwen3-VL-4B-Instruct", name
        assert env["VLGATE_DEMO_FALLBACK"] == "0", f"{name}: production never serves the demo model silently"


def test_entrypoint_scripts_exist_and_are_executable(services: dict[str, dict[str, Any]]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {APP_DIR}$", dockerfile, re.M)
    cmd = re.search(r"^CMD \[\"([^\"]+)\"", dockerfile, re.M)
    commands = [service["command"] for service in _app_services(services).values()] + [[cmd.group(1)]]
    for command in commands:
        script = _script(command)
        assert script.is_file() and script.stat().st_mode & 0o111, f"{script} is missing or not executable"


def test_dockerfile_installs_pinned_torch_before_the_requirements() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][0]] == "FROM python:3.11-slim"
    pinned = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned, "requirements.txt pins torch"
    torch = [i for i, line in enumerate(lines) if re.match(rf"RUN pip install .*torch=={re.escape(pinned[1])}\b", line)]
    requirements = [i for i, line in enumerate(lines) if re.match(r"RUN pip install .*-r requirements\.txt", line)]
    assert torch and requirements and torch[0] < requirements[0]
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), "the image runs as a non-root user"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "data", ".git"} <= ignored


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_shell_scripts_parse(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_entrypoints_run_the_agreed_servers() -> None:
    web = (ROOT / "docker/web.sh").read_text()
    assert re.search(r"^exec gunicorn -w .*", web, re.M) and '"web:create_app()"' in web  # gunicorn.conf.py: the rest
    worker = (ROOT / "docker/worker.sh").read_text()
    assert re.search(r"^exec python scripts/supervise\.py\b", worker, re.M)
    assert (ROOT / "scripts/supervise.py").is_file() and "scripts" not in (ROOT / ".dockerignore").read_text().split()
    # What the supervisor runs per GPU: the solo pool (the model stays in the process that loaded it).
    argv = " ".join(worker_argv("gpu0@%h"))
    assert "-m celery -A worker.celery_app:app worker --pool solo --concurrency 1 -Q chat,batch -n gpu0@%h" in argv
    assert "alembic upgrade head" in (ROOT / "docker/migrate.sh").read_text()


# --- optional profiles: monitoring (Prometheus, Grafana) and flower; docs/metrics.md ---------------------------

def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's bind mounts of repository files as {container path: path in the repository}."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source.removeprefix("./")
    return mounts


def _host_port(service: dict[str, Any], container_port: int) -> tuple[str, int]:
    """Return the (address, host port) a container port is published on."""
    for port in service.get("ports", []):
        *address, host, inner = str(port).split(":")
        if int(inner) == container_port:
            return (address[0] if address else "0.0.0.0"), int(host)
    raise AssertionError(f"port {container_port} is not published")


def _documented_metrics() -> set[str]:
    """Return the metric names docs/metrics.md lists as exposed (engine and gateway tables)."""
    text = (ROOT / "docs/metrics.md").read_text()
    exposed = text.split("## Engine metrics", 1)[1].split("### vLLM metrics vlgate does not have", 1)[0]
    exposed += text.split("## Gateway metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `((?:vllm:|vlgate_)\w+)`", exposed, re.M))


def _expr_metrics(expr: str) -> set[str]:
    """Return the metric names a PromQL expression reads, histogram series folded to their histogram."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\b(?:vllm:|vlgate_)\w+", expr)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The Grafana dashboard the monitoring profile provisions."""
    return json.loads((ROOT / "docs/grafana-dashboard.json").read_text())


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    """Prometheus's scrape configuration."""
    return yaml.safe_load((ROOT / "docker/prometheus.yml").read_text())


def test_optional_profiles_leave_the_default_stack_alone(services: dict[str, dict[str, Any]]) -> None:
    profiled = {name: service["profiles"] for name, service in services.items() if service.get("profiles")}
    assert profiled == {name: [profile] for name, profile in THIRD_PARTY.items() if profile}
    for name, profile in THIRD_PARTY.items():
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", image), f"{name}: pin a version, not {image}"
        if profile:
            # Dashboards, metrics and Flower are for the operator: published on the loopback address only.
            for port in services[name]["ports"]:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"


def test_app_services_take_the_observability_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _app_services(services).items():
        assert Settings(log_format=_env(service)["VLGATE_LOG_FORMAT"]).log_format == "text", name
    assert Settings(metrics_port=_env(services["worker"])["VLGATE_METRICS_PORT"]).metrics_port == 9400


def test_prometheus_mounts_its_config_and_scrapes_web_and_every_worker(
        services: dict[str, dict[str, Any]], compose: dict[str, Any], prometheus_config: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    config_path = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert _mounts(prometheus)[config_path] == "docker/prometheus.yml"
    assert _named_volumes(prometheus, compose["volumes"])["prometheus-data"] == "/prometheus"

    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    targets = {name: [target for group in job["static_configs"] for target in group["targets"]]
               for name, job in jobs.items()}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())
    web_port = Settings().web_port
    assert any(str(port).split(":")[-1] == str(web_port) for port in services["web"]["ports"])
    assert targets["vlgate-web"] == [f"web:{web_port}"]
    # One target per worker process: the first on VLGATE_METRICS_PORT, the next ones on the following ports.
    first = int(_env(services["worker"])["VLGATE_METRICS_PORT"])
    assert targets["vlgate-worker"] == [f"worker:{port}" for port in range(first, first + 8)]
    hosts = {target.split(":")[0] for group in targets.values() for target in group}
    assert hosts <= set(services), f"scrape targets that are not compose services: {hosts - set(services)}"


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "/-/ready" in " ".join(services["prometheus"]["healthcheck"]["test"])
    mounts = _mounts(grafana)
    for source in mounts.values():
        assert (ROOT / source).exists(), f"grafana mounts {source}, which is missing"

    (datasources,) = [target for target in mounts if target.endswith("/provisioning/datasources")]
    (source,) = yaml.safe_load((ROOT / mounts[datasources] / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and _host_port(services["prometheus"], url.port)

    (providers,) = [target for target in mounts if target.endswith("/provisioning/dashboards")]
    (provider,) = yaml.safe_load((ROOT / mounts[providers] / "vlgate.yml").read_text())["providers"]
    dashboards_dir = provider["options"]["path"]
    dashboards = [source for target, source in mounts.items() if target.startswith(dashboards_dir + "/")]
    assert dashboards == ["docs/grafana-dashboard.json"]
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[home] == "docs/grafana-dashboard.json"


def test_dashboard_loads_and_every_panel_reads_a_documented_metric(dashboard: dict[str, Any]) -> None:
    documented = _documented_metrics()
    assert {"vllm:time_to_first_token_seconds", "vlgate_queue_depth"} <= documented  # the parse found the tables
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"] and dashboard.get("id") is None
    (source,) = [var for var in dashboard["templating"]["list"] if var["name"] == "DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")

    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    covered: set[str] = set()
    for panel in panels:
        title = panel["title"]
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and grid["x"] + grid["w"] <= 24, title
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        assert panel["targets"], f"{title} has no query"
        read: set[str] = set()
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
            assert target["expr"].count("(") == target["expr"].count(")"), f"{title}: {target['expr']}"
            read |= _expr_metrics(target["expr"])
        assert read, f"{title} reads no vlgate or vLLM metric"
        assert read <= documented, f"{title} reads metrics docs/metrics.md does not list: {read - documented}"
        covered |= read
    # The panels the dashboard is for.
    assert {"vlgate_queue_depth", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds", "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
            "vlgate_requests_refused_total", "vlgate_worker_up", "vlgate_jobs"} <= covered
    for occupied in range(len(panels)):  # no two panels overlap
        a = panels[occupied]["gridPos"]
        for other in panels[occupied + 1:]:
            b = other["gridPos"]
            assert (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or a["y"] + a["h"] <= b["y"]
                    or b["y"] + b["h"] <= a["y"]), f"{panels[occupied]['title']} overlaps {other['title']}"


def test_flower_watches_the_same_broker(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:")
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    broker = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--broker="))
    assert broker == _env(services["web"])["VLGATE_REDIS_URL"] == _env(services["worker"])["VLGATE_REDIS_URL"]
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _host_port(flower, 5555) == ("127.0.0.1", 5555)
    assert _env(flower)["FLOWER_BASIC_AUTH"] is None, "credentials come from the host, never from this file"
