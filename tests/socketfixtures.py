"""WebSocket client helpers shared by the stream and auth tests: read frames, collect a stream, close."""

from __future__ import annotations

import json

from simple_websocket import Client, ConnectionClosed


def receive(ws: Client, timeout: float = 60) -> dict:
    """Read one JSON frame or fail after `timeout` seconds."""
    raw = ws.receive(timeout=timeout)
    assert raw is not None, "no frame within the timeout"
    return json.loads(raw)


def read_stream(ws: Client, tokens: list[dict] | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """Collect token events until the final event (or until `limit` tokens); return (tokens, final)."""
    tokens = [] if tokens is None else tokens
    while True:
        event = receive(ws)
        if event["type"] == "token":
            tokens.append(event)
            if limit is not None and len(tokens) >= limit:
                return tokens, {}
        elif event["type"] in ("done", "error"):
            return tokens, event
        elif event["type"] == "reset":
            tokens.clear()


def close(*sockets: Client) -> None:
    """Close sockets the server may already have closed."""
    for ws in sockets:
        try:
            ws.close()
        except ConnectionClosed:
            pass
