"""Health report and the OpenAPI document."""

from __future__ import annotations

from flask import Response, jsonify

from web.api import bp
from web.auth import current
from web.extensions import services
from web.openapi import openapi_document
from web.services.health import health_report


@bp.get("/health")
def health() -> Response:
    """Report dependencies and workers: 200 when ready to serve, else 503 with the same report."""
    report = health_report(services())
    # Only an admin sees model paths, host names and error texts; everyone else gets the status.
    body = report.model_dump() if current().admin else report.model_dump(include={"status", "model_ready"})
    response = jsonify(body)
    response.status_code = 200 if report.status == "ok" else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI 3.1 document generated from the schemas."""
    return jsonify(openapi_document(services().settings))
