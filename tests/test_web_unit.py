"""Web pieces that need no database rows: error shapes, messages, the OpenAPI document, import hygiene."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from common.schemas import ChatRequest, WorkerStatus
from devtools.databases import migrate
from tests.webfixtures import DEAD_REDIS_URL, make_settings
from web import create_app, max_body_bytes
from web.errors import validation_message
from web.openapi import openapi_document
from web.services.workers import not_loaded_reason

ROOT = Path(__file__).resolve().parent.parent
API_PREFIXES = ("/api/", "/v1/")


def documented_routes(app: Flask) -> dict[str, set[str]]:
    """Derive the JSON API's paths and methods from the app's own routes (never a hand-written list)."""
    paths: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(API_PREFIXES):
            path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
            paths.setdefault(path, set()).update(m.lower() for m in rule.methods or () if m not in ("HEAD", "OPTIONS"))
    return paths


@pytest.fixture
def offline_app(tmp_path: Path) -> Flask:
    """An app whose Redis is unreachable, on an empty migrated database (read only to find whether keys exist)."""
    url = f"sqlite:///{tmp_path / 'offline.db'}"
    migrate(url)
    app = create_app(make_settings(url, tmp_path, redis_url=DEAD_REDIS_URL))
    app.testing = True
    return app


def _message(body: dict[str, Any]) -> str:
    context = {"max_tokens_limit": 2048, "max_prompt_chars": 100, "max_images": 2}
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body, context=context)
    return validation_message(info.value)


def test_validation_messages_name_the_fields() -> None:
    assert _message({"prompt": "hi", "temperature": 5}) == "temperature: Input should be less than or equal to 2"
    assert _message({"prompt": "hi", "foo": 1}) == "foo: unknown field (extra inputs are not permitted)"
    assert _message({}) == "prompt: Field required"
    assert _message({"prompt": " "}) == "prompt: must not be empty"
    assert _message({"prompt": "hi", "max_tokens": 99999}) == "max_tokens: must be at most 2048"
    assert _message({"prompt": "x" * 101}) == "prompt: is 101 characters; the limit is 100"
    assert _message({"prompt": "hi", "images": ["a", "b", "c"]}) == "images: 3 images given; the limit is 2"
    both = _message({"prompt": "", "top_k": -1})
    assert both.startswith("top_k: ") and "prompt: must not be empty" in both


def _worker(**fields: Any) -> WorkerStatus:
    base = {"worker_id": "gpu0", "hostname": "h", "pid": 1, "state": "idle", "model": "m", "started_at": 0.0,
            "last_heartbeat": 0.0}
    return WorkerStatus(**{**base, **fields})


def test_not_loaded_reasons_come_from_the_heartbeats() -> None:
    assert not_loaded_reason([]) == "no worker is running"
    assert not_loaded_reason([_worker(state="loading")]) == "worker gpu0 is loading the model m"
    reason = not_loaded_reason([_worker(state="error", error="CUDA error"), _worker(worker_id="gpu1", state="loading")])
    assert reason == "worker gpu0: CUDA error; worker gpu1 is loading the model m"


def test_the_body_limit_lets_a_too_large_image_reach_the_image_check(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path)
    assert max_body_bytes(settings) > 15 * 1024 * 1024 * 4 // 3 + 1024


def test_unexpected_errors_are_500_without_details(offline_app: Flask) -> None:
    @offline_app.get("/api/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    @offline_app.get("/api/db-down")
    def db_down() -> None:
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    client = offline_app.test_client()
    response = client.get("/api/boom")
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    response = client.get("/api/db-down")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "service_unavailable"


def test_redis_down_health_is_a_report_not_an_error(offline_app: Flask) -> None:
    response = offline_app.test_client().get("/api/health")
    assert response.status_code == 503
    report = response.get_json()
    assert "error" in report["redis"] and report["redis"]["ok"] is False and report["status"] == "down"


def _refs(node: Any) -> list[str]:
    """Collect every $ref in a JSON document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_document_covers_every_endpoint_and_resolves(offline_app: Flask) -> None:
    response = offline_app.test_client().get("/api/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc == json.loads(json.dumps(openapi_document()))
    assert doc["openapi"].startswith("3.1")
    assert {path: set(ops) for path, ops in doc["paths"].items()} == documented_routes(offline_app)
    assert "/v1/chat/completions" in doc["paths"]
    schemas = doc["components"]["schemas"]
    refs = _refs(doc)
    assert refs and all(ref.startswith("#/components/schemas/") for ref in refs)
    assert all(ref.rsplit("/", 1)[1] in schemas for ref in refs)
    assert {"ChatRequest", "ChatResponse", "JobAccepted", "JobPublic", "SessionPublic", "HealthPublic",
            "ErrorResponse"} <= set(schemas)
    chat = doc["paths"]["/api/chat"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatRequest"}
    assert "temperature" in schemas["ChatRequest"]["properties"]
    assert chat["responses"]["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_openapi_document_is_valid_openapi_31() -> None:
    """Validate with openapi-spec-validator, from this interpreter or the base one it was built from."""
    doc = json.dumps(openapi_document())
    check = "import json, sys; from openapi_spec_validator import validate; validate(json.load(sys.stdin))"
    for python in (sys.executable, getattr(sys, "_base_executable", sys.executable)):
        probe = subprocess.run([python, "-c", "import openapi_spec_validator"], capture_output=True)
        if probe.returncode == 0:
            result = subprocess.run([python, "-c", check], input=doc, text=True, capture_output=True, timeout=60)
            assert result.returncode == 0, result.stderr[-2000:]
            return
    pytest.skip("openapi-spec-validator is not installed")


def test_the_web_process_never_imports_torch_or_the_worker(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        import web
        from common.config import Settings
        app = web.create_app(Settings(database_url="sqlite:///{tmp_path / 'x.db'}", data_dir="{tmp_path}"))
        app.test_client().get("/api/openapi.json")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "worker"))
        assert not heavy, heavy
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
