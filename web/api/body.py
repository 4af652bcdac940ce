"""Read a request's JSON body strictly: the right content type, valid JSON, the expected type."""

from __future__ import annotations

from typing import Any

from flask import request

from common.errors import ApiError
from common.text import parse_json

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}
def json_value() -> Any:
    """Return the request body as any JSON value, or raise 415/400 with a stable code."""
    if not request.is_json:
        got = request.mimetype or "no content type"
        raise ApiError("unsupported_media_type", f"Send the body as application/json (got {got}).")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    return parse_json(raw)


def describe_json_type(value: Any) -> str:
    """Name a JSON value's type for an error message ("an array", "null", ...)."""
    return JSON_TYPES.get(type(value), "that")


def json_object() -> dict[str, Any]:
    """Return the request body as a JSON object, or raise 415/400 with a stable code."""
    body = json_value()
    if not isinstance(body, dict):
        raise ApiError("invalid_request", f"The body must be a JSON object, not {describe_json_type(body)}.")
    return body
