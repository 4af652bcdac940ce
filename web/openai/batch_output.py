"""Finish a ``/v1`` batch: write its output and error files from its items, then end it in one transaction.

Succeeded lines go to the output file as ``{"id", "custom_id", "response": {"status_code": 200, "request_id",
"body": <chat.completion>}, "error": null}``; a line that failed when it ran goes to the error file with the
OpenAI error as its 4xx/5xx ``response``; a line that never finished (the batch was cancelled or expired) goes
there with ``"error": {"code": "batch_cancelled" | "batch_expired"}``. Both files have ids derived from the batch
and are written under a temporary name, then renamed: a finish done twice (its process died before the commit)
writes the same files again, and a reader never sees half of one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ERROR_STATUS, openai_error_body
from common.ids import utcnow
from common.models import Job, OpenAIBatch, StoredFile
from web.openai.batch_protocol import LineError, LineResponse, OutputLine
from web.openai.batch_validation import delete_leftovers
from web.openai.files import atomic_file, derived_file_id, expiry
from web.openai.serving import completion

YIELD_PER = 500  # item rows read per round trip
NEVER_RAN = {
    "expired": LineError(code="batch_expired", message="This request could not be executed before the completion "
                                                       "window expired."),
    "cancelled": LineError(code="batch_cancelled", message="This request was not executed: the batch was cancelled."),
    "completed": LineError(code="request_cancelled", message="This request was cancelled on its own (as a job)."),
}


@dataclass
class Written:
    """What the files hold: lines and bytes of each, and the tokens the items used."""

    output_lines: int = 0
    error_lines: int = 0
    output_bytes: int = 0
    error_bytes: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def terminal_status(row: OpenAIBatch) -> str:
    """Return how a finishing batch ends: expired, cancelled or completed."""
    if row.expired_at is not None:
        return "expired"
    return "cancelled" if row.status == "cancelling" else "completed"


def _line(job: Job, settings: Settings, ending: str) -> tuple[bool, OutputLine]:
    """Render one item; return whether it belongs in the output file (else the error file) and its line."""
    line_id = "batch_req_" + job.id.removeprefix("job_")
    if job.status == "succeeded":
        body = completion(job, settings).model_dump(mode="json")
        return True, OutputLine(id=line_id, custom_id=job.item_name,
                                response=LineResponse(status_code=200, request_id=job.id, body=body))
    if job.status == "failed":
        code = job.error_code or "generation_failed"
        status = ERROR_STATUS.get(code, 500)
        body = openai_error_body(code, job.error_message or code, status)
        return False, OutputLine(id=line_id, custom_id=job.item_name,
                                 response=LineResponse(status_code=status, request_id=job.id, body=body))
    return False, OutputLine(id=line_id, custom_id=job.item_name, error=NEVER_RAN[ending])


def _write(handle: IO[bytes], line: OutputLine) -> int:
    data = (json.dumps(line.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    handle.write(data)
    return len(data)


def write_files(db: Session, settings: Settings, row: OpenAIBatch, ending: str) -> Written:
    """Write the batch's output and error files from its items in input order (a few hundred rows at a time)."""
    written = Written()
    query = select(Job).where(Job.batch_id == row.id).order_by(Job.batch_index).execution_options(yield_per=YIELD_PER)
    with atomic_file(settings, derived_file_id(row.id, "output")) as out, \
            atomic_file(settings, derived_file_id(row.id, "error")) as err:
        for job in db.execute(query).scalars():
            ok, line = _line(job, settings, ending)
            if ok:
                written.output_lines += 1
                written.output_bytes += _write(out, line)
            else:
                written.error_lines += 1
                written.error_bytes += _write(err, line)
            db.expunge(job)  # keep the session's identity map as small as one round trip
    tokens = db.execute(select(func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens))
                        .where(Job.batch_id == row.id)).one()
    written.input_tokens, written.output_tokens = int(tokens[0] or 0), int(tokens[1] or 0)
    return written


def _file_row(row: OpenAIBatch, role: str, size: int, settings: Settings) -> StoredFile:
    return StoredFile(id=derived_file_id(row.id, role), tenant=row.tenant, key_id=row.key_id, purpose="batch_output",
                      filename=f"{row.id}_{role}.jsonl", size_bytes=size, created_at=utcnow(),
                      expires_at=expiry(row.output_expires_s))


def finish(db: Session, settings: Settings, row: OpenAIBatch, token: str) -> bool:
    """Write a claimed, settled batch's files and end it; return False if the claim was lost meanwhile."""
    ending = terminal_status(row)
    now = utcnow()
    values: dict[str, Any] = {"status": ending, f"{ending}_at": now, "lease_token": None, "lease_expires_at": None}
    if row.in_progress_at is None:  # cancelled while validating: nothing was enqueued, nothing ran
        delete_leftovers(db, row.id)
    else:
        written = write_files(db, settings, row, ending)
        values.update(completed=written.output_lines, failed=written.error_lines, input_tokens=written.input_tokens,
                      output_tokens=written.output_tokens)
        for role, lines, size in (("output", written.output_lines, written.output_bytes),
                                  ("error", written.error_lines, written.error_bytes)):
            file_id = derived_file_id(row.id, role)
            db.execute(delete(StoredFile).where(StoredFile.id == file_id))
            if lines:
                db.add(_file_row(row, role, size, settings))
                values[f"{role}_file_id"] = file_id
            else:  # OpenAI leaves the id empty when there is nothing to say
                (settings.files_path / file_id).unlink(missing_ok=True)
    moved = db.execute(update(OpenAIBatch).where(OpenAIBatch.id == row.id, OpenAIBatch.lease_token == token)
                       .values(**values))
    if moved.rowcount != 1:
        db.rollback()
        return False
    db.commit()
    return True
