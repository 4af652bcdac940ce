"""The one error shape, ``{"error": {"code", "message"}}``, and the stable codes it carries."""

from __future__ import annotations

from typing import Any

# code -> HTTP status. Codes are stable strings, documented in docs/api.md.
ERROR_STATUS: dict[str, int] = {
    "invalid_json": 400,
    "invalid_request": 400,
    "invalid_image": 400,
    "unsupported_media_type": 415,
    "image_too_large": 413,
    "payload_too_large": 413,
    "uri_too_long": 414,
    "headers_too_large": 431,
    "not_found": 404,
    "session_not_found": 404,
    "job_not_found": 404,
    "batch_not_found": 404,
    "file_not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "missing_api_key": 401,
    "invalid_api_key": 401,
    "key_revoked": 401,
    "key_expired": 401,
    "admin_required": 403,
    "rate_limit_exceeded": 429,
    "tokens_per_minute_exceeded": 429,
    "too_many_queued": 429,
    "queue_full": 503,
    "model_not_loaded": 503,
    "service_unavailable": 503,
    "context_length_exceeded": 400,
    "model_not_found": 404,
    "invalid_image_url": 400,
    "image_url_timeout": 400,
    "generation_failed": 500,
    "generation_timeout": 504,
    "worker_lost": 500,
    "internal_error": 500,
}


class ApiError(Exception):
    """An error with a stable code that the API reports in the common shape."""

    def __init__(self, code: str, message: str, status: int | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)
        self.param = param  # the request field at fault, for OpenAI's error shape
        self.retry_after = retry_after  # seconds, sent as Retry-After (429 and 503 refusals)

    def body(self) -> dict[str, Any]:
        """Return the JSON body for this error."""
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    """Build the one JSON error shape used by HTTP answers, WebSocket messages and stored jobs."""
    return {"error": {"code": code, "message": message}}


# HTTP status -> OpenAI's error ``type`` (the SDK picks its exception class from the status).
OPENAI_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
    415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    503: "service_unavailable_error",
}


def openai_error_body(code: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """Build the same error in OpenAI's shape, for ``/v1``: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
