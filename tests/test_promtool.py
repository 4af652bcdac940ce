"""The web's and a worker's ``/metrics`` pass ``promtool check metrics``, Prometheus's own parser and linter,
after real jobs have filled their counters and histograms."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from devtools import live
from devtools.databases import fresh_database, make_image

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed; scripts/ensure_services.sh "
                                                       "installs Debian's prometheus package, which ships it")

# The one lint problem accepted, and only on these names: the worker exposes vLLM's engine metrics under vLLM's
# own names (``vllm:num_requests_running``, ...) so that vLLM's dashboards and alerts work unchanged. promtool
# reserves colons for recording rules; vLLM made that choice and scrapers accept the names.
ACCEPTED = ("vllm:", "metric names should not contain ':'")


def check(exposition: str) -> list[str]:
    """Run ``promtool check metrics`` on an exposition; return its lint problems not accepted, failing on others."""
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=30)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    # Exit 0: clean; 3: lint problems only, one "<metric> <problem>" line each; anything else (1: the text did
    # not parse) fails the test whatever it printed.
    assert done.returncode in (0, 3), f"promtool exit {done.returncode}: {lines[:20]}"
    assert (done.returncode == 3) == bool(lines), f"promtool exit {done.returncode}: {lines[:20]}"
    prefix, problem = ACCEPTED
    return [line for line in lines if not (line.startswith(prefix) and line.endswith(problem))]


@pytest.mark.slow
def test_web_and_worker_expositions_pass_promtool(tmp_path: Path, data_dir: Path):
    databases = fresh_database("sqlite", tmp_path)
    redis_port, port, metrics_port = live.free_port(), live.free_port(), live.free_port()
    env = live.stack_env(next(databases), f"redis://127.0.0.1:{redis_port}/0", data_dir,
                         VLGATE_METRICS_PORT=str(metrics_port))
    base = f"http://127.0.0.1:{port}"
    services = [live.redis_server(redis_port, tmp_path), live.web(port, env, tmp_path, processes=2),
                live.worker("promtool-w1", env, tmp_path)]
    try:
        for service in services:
            service.start()
        live.wait_for_web(base)
        live.wait_for_worker(base, "promtool-w1", timeout=120)
        image = base64.b64encode(make_image((96, 64))).decode()
        for _ in range(2):  # fill the engine histograms and the web's image histograms
            answer = requests.post(f"{base}/api/chat", json={"prompt": "Describe this picture.", "image": image,
                                                             "max_tokens": 4, "wait": 60}, timeout=90)
            assert answer.status_code == 200, answer.text[:300]
        assert requests.post(f"{base}/api/jobs", json={"prompt": ""}, timeout=10).status_code == 400  # a refusal
        web = requests.get(f"{base}/metrics", timeout=10)
        worker = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert web.status_code == worker.status_code == 200
        # The scrapes hold what the jobs recorded, so the check below linted real series, not empty families.
        assert 'vlgate_requests_refused_total{code="invalid_request",reason="bad_input"} 1.0' in web.text
        assert "vlgate_image_bytes_count 2.0" in web.text
        assert 'vllm:request_success_total{finished_reason="length",model_name="demo"} 2.0' in worker.text
        assert check(web.text) == []
        assert check(worker.text) == []
    except Exception:
        print("\n".join(f"--- {s.name}\n{s.log()}" for s in services))
        raise
    finally:
        for service in reversed(services):
            service.stop()
        next(databases, None)


def test_check_keeps_every_problem_but_vllms_colons_and_fails_on_unparsable_text():
    exposition = ("# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                  "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1.0\n"
                  "# TYPE vlgate:jobs counter\nvlgate:jobs 2.0\n")
    problems = check(exposition)
    assert not any(line.startswith("vllm:") for line in problems)
    assert any(line.startswith("vlgate:jobs") and line.endswith("should not contain ':'") for line in problems)
    assert any("no help text" in line for line in problems) and any("_total" in line for line in problems)
    with pytest.raises(AssertionError, match="promtool exit 1"):
        check("vlgate_jobs{status= 1\n")
