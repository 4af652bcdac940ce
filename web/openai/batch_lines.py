"""The lines of a ``/v1`` batch input file: read one at a time, checked as OpenAI checks them, made into job parts.

A line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": <a chat-completion request>}``.
``check_line`` finds what fails the whole batch (OpenAI's ``errors.data[]``: ``line``, ``code``, ``message``,
``param``) without reading any image; ``prepare_line`` then decodes the images, and an image that cannot be used
fails its line alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from pydantic import ValidationError

from common.config import Settings
from common.errors import ApiError
from common.images import ImageError
from common.jobspec import StopSpec
from common.text import parse_json
from web.errors import first_field, validation_message
from web.openai.batch_protocol import BATCH_ENDPOINT, BatchErrorItem
from web.openai.protocol import ChatCompletionRequest
from web.openai.serving import draft_turns, job_parts, parse_request
from web.quotas import estimate_tokens
from web.services.batches import PreparedItem
from web.services.submit import DraftTurn

LINE_KEYS = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID_CHARS = 255
SKIP_BYTES = 1024 * 1024  # how much of an over-long line is read at a time while skipping it


@dataclass
class LineItem(PreparedItem):
    """A prepared line: its turns (with their decoded images); ``name`` is the ``custom_id``."""

    turns: list[DraftTurn] = field(default_factory=list)


@dataclass
class Checked:
    """A line that passed the structural checks: its id and the tokens it may cost (for the quota)."""

    custom_id: str
    tokens: int


class LineProblem(Exception):
    """A line that fails the batch, as one entry of ``errors.data``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def item(self, line: int) -> BatchErrorItem:
        return BatchErrorItem(code=self.code, message=self.message, param=self.param, line=line)


def line_limit(settings: Settings) -> int:
    """Return the longest line accepted: as large as a ``/v1/chat/completions`` body may be."""
    from web import max_body_bytes  # here, not at the top: the web package imports this module while it loads

    return max_body_bytes(settings)


def iter_lines(handle: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (1-based line number, bytes) for each non-blank line, holding one line at a time; an over-long line
    is skipped to its end and yielded as None."""
    number = 0
    while raw := handle.readline(max_line_bytes + 1):
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := handle.readline(SKIP_BYTES)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        elif raw.strip():
            yield number, raw


def _envelope(raw: bytes | None, max_line_bytes: int) -> tuple[str, dict[str, Any]]:
    """Check a line's envelope; return its custom_id and body."""
    if raw is None:
        raise LineProblem("line_too_long", f"This line is longer than {max_line_bytes:,} bytes, the largest request "
                                           "this server accepts.")
    try:
        value = parse_json(raw)
    except ApiError as exc:
        raise LineProblem("invalid_json_line", f"This line is not parseable as valid JSON: {exc.message}") from exc
    if not isinstance(value, dict):
        raise LineProblem("invalid_json_line", "This line is not a JSON object.")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineProblem("missing_custom_id", "This line has no custom_id (a non-empty string).", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise LineProblem("invalid_custom_id", f"The custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters.",
                          "custom_id")
    for key in value:
        if key not in LINE_KEYS:
            raise LineProblem("invalid_request", f"Unknown key {key!r}; a line has custom_id, method, url and body.",
                              key)
    if value.get("method") != "POST":
        raise LineProblem("invalid_method", "The method must be POST.", "method")
    if value.get("url") != BATCH_ENDPOINT:
        raise LineProblem("url_mismatch", f"The url must be {BATCH_ENDPOINT}, the batch's endpoint.", "url")
    body = value.get("body")
    if not isinstance(body, dict):
        raise LineProblem("invalid_request", "The body must be a JSON object (a chat-completion request).", "body")
    return custom_id, body


def _request(body: dict[str, Any], settings: Settings) -> tuple[ChatCompletionRequest, list[DraftTurn], StopSpec]:
    """Validate a line's body as a chat-completion request, images unread; return it, its turns and stop."""
    try:
        request = parse_request(body, settings)
    except ValidationError as exc:
        field_name = first_field(exc)
        raise LineProblem("invalid_request", validation_message(exc, prefix="body"),
                          f"body.{field_name}" if field_name else "body") from exc
    except ApiError as exc:  # the model is not the one served
        raise LineProblem("model_mismatch", f"{exc.message} Every line must name it.", "body.model") from exc
    if request.stream:
        raise LineProblem("invalid_request", "stream: a batch line cannot be streamed.", "body.stream")
    try:
        _, stop = job_parts(request, settings)
        turns = draft_turns(request.messages, settings, decode=False)
    except ApiError as exc:
        raise LineProblem("invalid_request", exc.message, f"body.{exc.param}" if exc.param else "body") from exc
    return request, turns, stop


def check_line(raw: bytes | None, settings: Settings, seen: set[bytes], max_line_bytes: int) -> Checked:
    """Check a line's shape without reading its images; raise LineProblem for what fails the batch."""
    custom_id, body = _envelope(raw, max_line_bytes)
    request, turns, stop = _request(body, settings)
    digest = hashlib.blake2b(custom_id.encode(), digest_size=16).digest()  # 16 bytes a line, however long the id
    if digest in seen:
        raise LineProblem("duplicate_custom_id", f"The custom_id {custom_id!r} is used by an earlier line; each "
                                                 "must be unique.", "custom_id")
    seen.add(digest)
    images = sum(1 for m in request.messages if isinstance(m.content, list) for p in m.content
                 if getattr(p, "type", "") == "image_url")
    tokens = estimate_tokens(sum(len(t.text) for t in turns), images, stop.max_tokens, request.n)
    return Checked(custom_id=custom_id, tokens=tokens)


def prepare_line(raw: bytes | None, settings: Settings, max_line_bytes: int) -> LineItem:
    """Make a checked line into an item with its images decoded; an image that cannot be used fails it alone."""
    custom_id, body = _envelope(raw, max_line_bytes)
    request = parse_request(body, settings)
    sampling, stop = job_parts(request, settings)
    item = LineItem(prompt="", sampling=sampling, stop=stop, name=custom_id)
    try:
        item.turns = draft_turns(request.messages, settings)
    except (ApiError, ImageError) as exc:
        item.error = ImageError(exc.code, exc.message, getattr(exc, "status", 400))
        item.turns = draft_turns(request.messages, settings, decode=False)
    item.images = [image for turn in item.turns for image in turn.images]
    item.prompt = next((t.text for t in reversed(item.turns) if t.role == "user"), "")
    return item
