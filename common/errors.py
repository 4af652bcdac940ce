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
    "not_found": 404,
    "session_not_found": 404,
    "job_not_found": 404,
    "batch_not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "model_not_loaded": 503,
    "service_unavailable": 503,
    "context_length_exceeded": 400,
    "generation_failed": 500,
    "worker_lost": 500,
    "internal_error": 500,
}


class ApiError(Exception):
    """An error with a stable code that the API reports in the common shape."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)

    def body(self) -> dict[str, Any]:
        """Return the JSON body for this error."""
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    """Build the one JSON error shape used by HTTP answers, WebSocket messages and stored jobs."""
    return {"error": {"code": code, "message": message}}
