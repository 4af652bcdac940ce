"""A batch's results in input order, as JSON, JSON Lines or CSV, streamed row by row from the database."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker

from common.models import Job
from common.schemas import BatchItemResult, BatchResults, ErrorDetail, Usage

RESULT_FORMATS = {"json": "application/json", "jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
CSV_HEADER = ("index", "name", "job_id", "status", "response", "finish_reason", "error_code", "error_message",
              "prompt_tokens", "completion_tokens", "total_tokens")
CSV_BOM = "\ufeff"  # Excel reads a CSV without it in the machine's ANSI code page, garbling Chinese
YIELD_PER = 500  # rows fetched per round trip (a server-side cursor on Postgres)
ROWS_PER_CHUNK = 100  # rows per piece of the streamed body


def _result(row: Row[Any]) -> BatchItemResult:
    """Render one item's row."""
    usage = Usage.of(row.prompt_tokens, row.completion_tokens)
    error = ErrorDetail(code=row.error_code, message=row.error_message or row.error_code) if row.error_code else None
    return BatchItemResult(index=row.batch_index, job_id=row.id, name=row.item_name, status=row.status,
                           response=row.response, finish_reason=row.finish_reason, error=error, usage=usage)


def iter_results(factory: sessionmaker[Session], batch_id: str) -> Iterator[BatchItemResult]:
    """Yield a batch's items in input order, reading a few hundred rows at a time in a session of its own."""
    columns = (Job.batch_index, Job.id, Job.item_name, Job.status, Job.response, Job.finish_reason,
               Job.error_code, Job.error_message, Job.prompt_tokens, Job.completion_tokens)
    query = (select(*columns).where(Job.batch_id == batch_id).order_by(Job.batch_index)
             .execution_options(yield_per=YIELD_PER))
    with factory() as db:
        for row in db.execute(query):
            yield _result(row)


def batch_results(factory: sessionmaker[Session], batch_id: str, status: str) -> BatchResults:
    """Return every result in one object (for the answers that wait for a whole batch)."""
    return BatchResults(batch_id=batch_id, status=status, results=list(iter_results(factory, batch_id)))  # type: ignore[arg-type]


def _dumps(value: Any) -> str:
    """Encode JSON compactly, keeping non-ASCII text readable."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json(results: Iterator[BatchItemResult], batch_id: str, status: str) -> Iterator[str]:
    """Stream the ``BatchResults`` object without building it."""
    yield _dumps({"batch_id": batch_id, "status": status})[:-1] + ',"results":['
    chunk: list[str] = []
    for n, item in enumerate(results):
        chunk.append(("," if n else "") + _dumps(item.model_dump()))
        if len(chunk) >= ROWS_PER_CHUNK:
            yield "".join(chunk)
            chunk.clear()
    yield "".join(chunk) + "]}"


def _jsonl(results: Iterator[BatchItemResult]) -> Iterator[str]:
    """Stream one ``BatchItemResult`` per line."""
    chunk: list[str] = []
    for item in results:
        chunk.append(_dumps(item.model_dump()) + "\n")
        if len(chunk) >= ROWS_PER_CHUNK:
            yield "".join(chunk)
            chunk.clear()
    yield "".join(chunk)


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Defuse a text cell a spreadsheet would run as a formula (OWASP: prefix it with a single quote)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _csv_row(item: BatchItemResult) -> tuple[Any, ...]:
    """Flatten an item into the CSV columns (empty cells for what it lacks); text cells are defused."""
    usage = item.usage
    row = (item.index, item.name or "", item.job_id, item.status, item.response or "", item.finish_reason or "",
           item.error.code if item.error else "", item.error.message if item.error else "",
           usage.prompt_tokens if usage else "", usage.completion_tokens if usage else "",
           usage.total_tokens if usage else "")
    return tuple(_cell(value) for value in row)


def _csv(results: Iterator[BatchItemResult]) -> Iterator[str]:
    """Stream RFC 4180 CSV (quoted newlines and quotes, UTF-8 with a BOM) with a header row."""
    buffer = io.StringIO()
    buffer.write(CSV_BOM)
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for n, item in enumerate(results, start=1):
        writer.writerow(_csv_row(item))
        if n % ROWS_PER_CHUNK == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def render_results(factory: sessionmaker[Session], batch_id: str, status: str, fmt: str) -> Iterator[bytes]:
    """Stream a batch's results in a format of ``RESULT_FORMATS``."""
    results = iter_results(factory, batch_id)
    if fmt == "csv":
        pieces = _csv(results)
    elif fmt == "jsonl":
        pieces = _jsonl(results)
    else:
        pieces = _json(results, batch_id, status)
    for piece in pieces:
        if piece:
            yield piece.encode("utf-8")
