"""The HTTP side: one small client for vlgate's batch API, and the errors a user can act on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import click
import requests

from vlgate_cli.multipart import MultipartBody

# Uploading is streamed, but the server answers only once it has stored every image of the chunk.
UPLOAD_TIMEOUT = (10.0, 600.0)
TIMEOUT = (10.0, 60.0)


class CliError(click.ClickException):
    """A failure reported as ``Error: message`` with a chosen exit code (2: the run could not proceed)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unreachable(CliError):
    """The server did not answer at all."""


class ApiFailure(CliError):
    """The server answered with an error body ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}", exit_code=2)
        self.status = status
        self.code = code
        self.body = body


class Client:
    """Calls the batch API of one vlgate server, with an API key if one is given."""

    def __init__(self, server: str, api_key: str | None = None) -> None:
        self.base = server.rstrip("/")
        self.http = requests.Session()
        key = (api_key or "").strip()
        self.has_key = bool(key)
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"  # what every OpenAI client sends too

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", TIMEOUT)
        try:
            response = self.http.request(method, self.base + path, **kwargs)
        except requests.ConnectionError as exc:
            raise Unreachable(f"cannot reach the vlgate server at {self.base} ({_short(exc)}); "
                              "is it running? (--server or VLGATE_URL sets the address)") from exc
        except requests.Timeout as exc:
            raise Unreachable(f"the vlgate server at {self.base} did not answer in time ({_short(exc)})") from exc
        if response.status_code >= 400:
            failure = _failure(response)
            if failure.status == 401 and not self.has_key:
                failure.message += " (give the key with --api-key or the VLGATE_API_KEY environment variable)"
            raise failure
        return response

    def health(self) -> dict[str, Any]:
        """Return ``/api/health`` (a 503 there still carries the report)."""
        try:
            return self._call("GET", "/api/health").json()
        except ApiFailure as failure:
            if failure.status == 503 and failure.body and "status" in failure.body:
                return failure.body  # degraded or down: the report says why (in detail to admin keys only)
            raise

    def create_batch(self, body: MultipartBody) -> dict[str, Any]:
        """Upload one multipart batch; return the BatchPublic the server answers with."""
        return self._call("POST", "/api/batches", data=body, headers={"Content-Type": body.content_type},
                          timeout=UPLOAD_TIMEOUT).json()

    def batch(self, batch_id: str) -> dict[str, Any]:
        """Return a batch's progress (BatchPublic)."""
        return self._call("GET", f"/api/batches/{batch_id}").json()

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """Yield a batch's items in input order, read line by line from the JSONL results."""
        response = self._call("GET", f"/api/batches/{batch_id}/results", params={"format": "jsonl"}, stream=True)
        with response:
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def raw_results(self, batch_id: str, fmt: str) -> requests.Response:
        """Return the streaming results response in ``fmt`` (json, jsonl or csv)."""
        return self._call("GET", f"/api/batches/{batch_id}/results", params={"format": fmt}, stream=True)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel what has not run yet; return the batch."""
        return self._call("DELETE", f"/api/batches/{batch_id}").json()


def _failure(response: requests.Response) -> ApiFailure:
    """Turn an error answer into an ApiFailure carrying the server's own code and message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = " ".join(response.text.split())[:200] or response.reason
        return ApiFailure(response.status_code, "http_error", text)
    error = body.get("error")
    if isinstance(error, dict):
        return ApiFailure(response.status_code, str(error.get("code")), str(error.get("message")), body)
    return ApiFailure(response.status_code, "http_error", json.dumps(body)[:200], body)


def _short(exc: Exception) -> str:
    """Return the last, most specific line of a requests/urllib3 exception."""
    text = str(exc)
    return text.rsplit(": ", 1)[-1].rstrip(")'\"") if len(text) > 120 else text
