"""The web's ``/metrics``: refusals counted by reason, live gauges read from Redis and the database, and the
same totals from every gunicorn worker process (prometheus-client's multi-process mode)."""

from __future__ import annotations

from pathlib import Path

import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from devtools import live
from devtools.databases import fresh_database
from tests import webfixtures
from tests.webfixtures import b64, heartbeat, png_bytes, queue_length

db_url, app, client = webfixtures.db_url, webfixtures.app, webfixtures.client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse an exposition into {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def test_refusals_images_and_live_state(app: Flask, client: FlaskClient):
    before = samples(client.get("/metrics").get_data(as_text=True))
    for _ in range(3):
        client.post("/api/jobs", json={"prompt": ""})  # 400 invalid_request
    client.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
    heartbeat(app)
    big = b64(png_bytes((1500, 1000)))
    assert client.post("/api/jobs", json={"prompt": "hi", "image": big}).status_code == 202
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    after = samples(answer.get_data(as_text=True))
    refused = "vlgate_requests_refused_total"
    assert value(after, refused, reason="bad_input", code="invalid_request") - value(
        before, refused, reason="bad_input", code="invalid_request") == 3
    assert value(after, refused, reason="unavailable", code="model_not_loaded") - value(
        before, refused, reason="unavailable", code="model_not_loaded") == 1
    assert value(after, "vlgate_images_downscaled_total") - value(before, "vlgate_images_downscaled_total") == 1
    assert value(after, "vlgate_image_pixels_count") - value(before, "vlgate_image_pixels_count") == 1
    assert value(after, "vlgate_jobs", status="queued") == 1
    assert value(after, "vlgate_queue_depth", queue="chat") == queue_length(app, "chat") == 1
    assert value(after, "vlgate_workers", state="idle") == 1 and value(after, "vlgate_workers_model_loaded") == 1


def test_every_gunicorn_worker_answers_with_every_workers_counts(tmp_path: Path):
    databases = fresh_database("sqlite", tmp_path)
    redis_port, port = live.free_port(), live.free_port()
    redis = live.redis_server(redis_port, tmp_path).start()
    env = live.stack_env(next(databases), f"redis://127.0.0.1:{redis_port}/0", tmp_path)
    web = live.web(port, env, tmp_path, processes=2).start()
    base = f"http://127.0.0.1:{port}"
    try:
        live.wait_for_web(base)
        for _ in range(20):  # spread over both processes by the kernel's accept
            assert requests.post(f"{base}/api/jobs", json={"prompt": ""}, timeout=10).status_code == 400
        scrapes = []
        for _ in range(6):
            scrape = samples(requests.get(f"{base}/metrics", timeout=10).text)
            scrapes.append(value(scrape, "vlgate_requests_refused_total", reason="bad_input", code="invalid_request"))
        assert scrapes == [20.0] * 6, scrapes
        assert len(list(Path(env["VLGATE_DATA_DIR"], "metrics").glob("gunicorn-*/*.db"))) >= 2  # two processes
    finally:
        web.stop()
        redis.stop()
        next(databases, None)
