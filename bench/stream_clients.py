"""Cheap asyncio clients for bench.streams: thousands of waiting WebSocket followers, SSE streams and
POST /api/chat waiters on one event loop, each recording when it was served, its token relay latencies and
when it got its ``done``.

Token texts carry the publisher's clock (``STAMP`` + epoch seconds), so relay latency is publish -> client
on one host. Plain sockets (HTTP/1.0, so bodies are not chunked) and wsproto keep a client at a few kB.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection, Ping, RejectConnection, Request, TextMessage

STAMP = "@"  # a token's text is "@<epoch seconds>;"
RETRIES = 5


@dataclass
class Result:
    """What one client saw."""

    kind: str
    started: float = 0.0
    served_at: float | None = None  # the web began answering it (a frame, a chunk, or a response)
    done_at: float | None = None
    tokens: int = 0
    error: str | None = None
    retries: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (received at, publish -> received)

    def token(self, text: str) -> None:
        """Count a token and its relay latency (a catch-up holding several stamps counts its newest)."""
        now = time.time()
        self.tokens += 1
        self.served_at = self.served_at or now
        stamps = [s for s in text.split(";") if s.startswith(STAMP)]
        if len(stamps) == 1:
            self.latencies.append((now, now - float(stamps[0][1:])))


def stamp() -> str:
    """Return one token's text: the publisher's clock."""
    return f"{STAMP}{time.time():.6f};"


async def _post(host: str, port: int, path: str, body: dict[str, Any], result: Result
                ) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an HTTP/1.0 POST and read its status line and headers; a 429 or 503 is retried after its
    Retry-After, as the openai SDK does (``RETRIES`` times)."""
    data = json.dumps(body).encode()
    for attempt in range(RETRIES + 1):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST {path} HTTP/1.0\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        retry_after = 1.0
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "retry-after":
                retry_after = float(value.strip())
        if status not in (429, 503) or attempt == RETRIES:
            return status, reader, writer
        result.retries += 1
        await _close(writer)
        await asyncio.sleep(retry_after)
    raise AssertionError("unreachable")


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a client socket, ignoring a peer that already went."""
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def sse_client(host: str, port: int, result: Result, prompt: str) -> None:
    """Stream one /v1/chat/completions (stream=true) until ``[DONE]``."""
    body = {"model": "demo", "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}]}
    status, reader, writer = await _post(host, port, "/v1/chat/completions", body, result)
    try:
        if status != 200:
            result.error = f"http {status}"
            return
        while line := await reader.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                result.done_at = time.time()
                return
            result.served_at = result.served_at or time.time()
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"].get("code") or "error"
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    result.token(choice["delta"]["content"])
        result.error = result.error or "closed before [DONE]"
    finally:
        await _close(writer)


async def chat_client(host: str, port: int, result: Result, prompt: str) -> None:
    """POST /api/chat and wait for its answer."""
    status, reader, writer = await _post(host, port, "/api/chat", {"prompt": prompt, "max_tokens": 64}, result)
    try:
        await reader.read()
        if status == 200:
            result.served_at = result.served_at or time.time()
            result.done_at = time.time()
        else:
            result.error = f"http {status}"
    finally:
        await _close(writer)


async def ws_client(host: str, port: int, result: Result, job_id: str) -> None:
    """Follow /ws/jobs/<id> until its ``done`` (or ``error``) frame."""
    reader, writer = await asyncio.open_connection(host, port)
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host=f"{host}:{port}", target=f"/ws/jobs/{job_id}")))
    text = ""  # a frame may arrive in pieces
    try:
        while data := await reader.read(65536):
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, RejectConnection):
                    result.error = f"rejected {event.status_code}"
                    return
                if isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    result.error = result.error or "closed before done"
                    return
                elif isinstance(event, TextMessage):
                    text += event.data
                    if not event.message_finished:
                        continue
                    frame, text = json.loads(text), ""
                    if frame["type"] == "token":
                        result.token(frame["text"])
                    elif frame["type"] in ("done", "error"):
                        result.done_at = time.time()
                        result.served_at = result.served_at or result.done_at
                        result.error = frame.get("code") if frame["type"] == "error" else None
                        return
        result.error = result.error or "closed before done"
    finally:
        await _close(writer)


async def run_client(kind: str, host: str, port: int, result: Result, target: str) -> None:
    """Run one client of ``kind`` (ws: target is a job id; sse/chat: target is the prompt), noting failures."""
    result.started = time.time()
    client = {"ws": ws_client, "sse": sse_client, "chat": chat_client}[kind]
    try:
        await client(host, port, result, target)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
