"""Text a request carries, checked before anything is stored: bounded JSON nesting, no NUL, valid Unicode.

Postgres cannot store NUL in text and no database can encode a lone surrogate: both would fail at commit,
after validation, as a 500. Refusing them up front makes them the client's 400.
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import ApiError

MAX_DEPTH = 64  # far deeper than any request body here; a deeper one is an attack on parsers downstream


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON text and check it is safe to store: bounded nesting, no NUL, no lone surrogates (else 400)."""
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise ApiError("invalid_json", f"The JSON is nested too deeply (the limit is {MAX_DEPTH} levels).") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_json", f"The body is not valid JSON: {exc}.") from exc
    check_text(value)
    return value


def check_text(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH, and strings no database can store (NUL, lone surrogates)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError("invalid_json", f"The JSON is nested too deeply (the limit is {MAX_DEPTH} levels).")
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in node.items())
            stack.extend((k, path or "(key)", depth + 1) for k in node)
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}" if path else str(i), depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str):
            check_string(node, path or "body")


def check_string(text: str, field: str) -> None:
    """Refuse a string with a NUL character or a lone surrogate (neither can be stored or encoded)."""
    if "\x00" in text:
        raise ApiError("invalid_request", f"{field}: must not contain NUL characters", param=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError("invalid_request", f"{field}: contains an unpaired surrogate (\\u{ord(text[exc.start]):04x}); "
                                          "send valid Unicode", param=field) from exc


