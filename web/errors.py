"""Turn every failure into the one JSON error shape; never an HTML error page or a traceback."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, current_app, has_request_context, jsonify, request
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from common.errors import ERROR_STATUS, ApiError, error_body, openai_error_body
from common.images import ImageError
from web.metrics import count_refusal

log = logging.getLogger(__name__)

# Werkzeug's HTTP errors, by status, mapped to our stable codes.
HTTP_CODES: dict[int, str] = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


OPENAI_PREFIX = "/v1/"


def error_response(code: str, message: str, status: int | None = None, param: str | None = None) -> Response:
    """Build the JSON answer for an error with its HTTP status, in the shape of the API the path belongs to.

    ``/api`` answers ``{"error": {"code", "message"}}``; ``/v1`` answers OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``. The code and message are the same in both.
    """
    status = status if status is not None else ERROR_STATUS.get(code, 500)
    count_refusal(status, code)
    openai = has_request_context() and request.path.startswith(OPENAI_PREFIX)
    response = jsonify(openai_error_body(code, message, status, param) if openai else error_body(code, message))
    response.status_code = status
    return response


def first_field(exc: ValidationError) -> str | None:
    """Return the dotted name of the first field a validation error names, if any."""
    for err in exc.errors(include_url=False, include_input=False):
        if err["loc"]:
            return ".".join(str(part) for part in err["loc"])
        head = err["msg"].removeprefix("Value error, ").split(":", 1)[0]
        if head.replace("_", "").replace(".", "").isalnum():
            return head
    return None


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """Describe pydantic errors as ``field: problem`` pairs a client can act on.

    ``prefix`` places the fields inside a larger body, e.g. ``items.3`` for one item of a batch.
    """
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in (*([prefix] if prefix else []), *err["loc"]))
        if err["type"] == "extra_forbidden":
            problem = "unknown field (extra inputs are not permitted)"
        else:
            problem = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a model-level validator already names its field in the message
            parts.append(f"{prefix}.{problem}" if prefix else problem)
        else:
            parts.append(f"{field}: {problem}")
    return "; ".join(parts) or "the request body is invalid"


def _api_error(exc: ApiError) -> Response:
    """Answer an error the code raised on purpose (a refusal that passes says when to retry)."""
    response = error_response(exc.code, exc.message, exc.status, exc.param)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="vlgate"'
    return response


def _image_error(exc: ImageError) -> Response:
    """Answer a refused image with its own code and status (400 or 413)."""
    return error_response(exc.code, exc.message, exc.status)


def _validation_error(exc: ValidationError) -> Response:
    """Answer a body that does not match its schema, naming the fields."""
    return error_response("invalid_request", validation_message(exc), 400, first_field(exc))


def _http_error(exc: HTTPException) -> Response:
    """Answer Werkzeug's HTTP errors (404, 405, 413, ...) in the JSON shape."""
    status = exc.code or 500
    code = HTTP_CODES.get(status) or ("internal_error" if status >= 500 else "invalid_request")
    response = error_response(code, _http_message(exc), status)
    # Keep headers such as Allow (405) that the exception carries; the body is ours.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _http_message(exc: HTTPException) -> str:
    """Say what went wrong in terms of this request rather than Werkzeug's generic prose."""
    if isinstance(exc, NotFound) and request.routing_exception is exc:
        return f"There is no endpoint at {request.path}."
    if isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(m for m in exc.valid_methods or () if m not in ("HEAD", "OPTIONS"))
        return f"{request.method} is not allowed on {request.path}; use {allowed}."
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config.get("MAX_CONTENT_LENGTH") or 0
        return f"The request body is larger than the {limit // (1024 * 1024)} MiB limit."
    return exc.description or exc.name


def _unavailable(exc: Exception) -> Response:
    """Answer 503 when Redis or the database cannot be reached, so clients retry."""
    log.warning("a backing service is unavailable: %s", exc)
    what = "Redis" if isinstance(exc, redis.RedisError | BrokerError) else "The database"
    return error_response("service_unavailable", f"{what} is unavailable; try again shortly.", 503)


def _database_error(exc: DBAPIError) -> Response:
    """Tell a lost database connection (503) from a bug in a query (500)."""
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        return _unavailable(exc)
    return _internal_error(exc)


def _internal_error(exc: Exception) -> Response:
    """Log anything unexpected and answer 500 without leaking details."""
    log.exception("unhandled error", exc_info=exc)
    return error_response("internal_error", "An internal error occurred; it has been logged.", 500)


def error_parts(exc: Exception) -> tuple[str, str]:
    """Return (code, message) for an exception, for channels without an HTTP status (WebSockets)."""
    if isinstance(exc, ApiError | ImageError):
        return exc.code, exc.message
    if isinstance(exc, ValidationError):
        return "invalid_request", validation_message(exc)
    if isinstance(exc, redis.RedisError | BrokerError | OperationalError):
        log.warning("a backing service is unavailable: %s", exc)
        return "service_unavailable", "A backing service is unavailable; try again shortly."
    log.exception("unhandled error", exc_info=exc)
    return "internal_error", "An internal error occurred; it has been logged."


def init_app(app: Flask) -> None:
    """Register the error handlers; Flask picks the most specific one for each exception."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ImageError, _image_error)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(redis.ConnectionError, _unavailable)
    app.register_error_handler(redis.TimeoutError, _unavailable)
    app.register_error_handler(BrokerError, _unavailable)
    app.register_error_handler(DBAPIError, _database_error)
    app.register_error_handler(Exception, _internal_error)
