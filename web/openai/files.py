"""``/v1`` files: their rows, their bytes on disk (written under a temporary name, then renamed), lists, deletion.

A file's bytes are ``Settings.files_path / <id>``. Whatever writes one (an upload, a batch's output) writes
``.<id>.<random>.part`` first and renames it into place when it is complete, so a reader never sees half a file;
the row is committed after the rename, so a listed file always has its bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from common.config import Settings
from common.errors import ApiError
from common.ids import is_id, to_epoch, utcnow
from common.models import StoredFile
from web.auth import owned
from web.openai.batch_protocol import FileDeleted, FileList, FileObject
from web.openai.paging import PageQuery, page

log = logging.getLogger(__name__)

SWEEP_ROWS = 100  # expired files deleted per pass


def file_path(settings: Settings, file_id: str) -> Path:
    """Return where a file's bytes are."""
    return settings.files_path / file_id


def derived_file_id(batch_id: str, role: str) -> str:
    """Return the id of a batch's output or error file: always the same, so a finish done twice makes one file."""
    return "file_" + hashlib.sha256(f"{batch_id}:{role}".encode()).hexdigest()[:24]


@contextlib.contextmanager
def atomic_file(settings: Settings, file_id: str) -> Iterator[IO[bytes]]:
    """Yield a file to write; when the block ends without error it is synced and renamed to the file's path."""
    settings.files_path.mkdir(parents=True, exist_ok=True)
    final = file_path(settings, file_id)
    temporary = final.with_name(f".{file_id}.{secrets.token_hex(4)}.part")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name (and the row) point at them
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def expiry(seconds: int | None) -> datetime | None:
    """Return when a file made now with ``expires_after.seconds`` expires (None: never)."""
    return None if seconds is None else utcnow() + timedelta(seconds=seconds)


def get_file(db: Session, file_id: str, param: str = "file_id") -> StoredFile:
    """Load one of the caller's files that has not expired, or raise 404 ``file_not_found``."""
    row = None
    if is_id("file", file_id):
        row = db.execute(select(StoredFile).where(StoredFile.id == file_id, owned(StoredFile))).scalar_one_or_none()
    if row is None or (row.expires_at is not None and row.expires_at <= utcnow()):
        raise ApiError("file_not_found", f"No such File object: {file_id}", param=param)
    return row


def file_object(row: StoredFile) -> FileObject:
    """Render a file row in OpenAI's shape."""
    return FileObject(id=row.id, bytes=row.size_bytes, created_at=int(to_epoch(row.created_at) or 0),
                      filename=row.filename, purpose=row.purpose,
                      expires_at=int(to_epoch(row.expires_at) or 0) or None)


def list_files(db: Session, query: PageQuery, purpose: str | None) -> FileList:
    """Return one page of the caller's files, newest first unless ``order=asc``."""
    where = [StoredFile.purpose == purpose] if purpose else []
    now = utcnow()
    where.append((StoredFile.expires_at.is_(None)) | (StoredFile.expires_at > now))
    rows, more = page(db, StoredFile, query, "file_not_found", *where)
    data = [file_object(row) for row in rows]
    return FileList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=more)


def open_content(db: Session, settings: Settings, file_id: str) -> tuple[StoredFile, IO[bytes]]:
    """Open a file's bytes for reading (a later delete or rewrite does not disturb an open reader)."""
    row = get_file(db, file_id)
    try:
        return row, open(file_path(settings, row.id), "rb")  # noqa: SIM115 - the response closes it
    except FileNotFoundError as exc:  # its bytes were lost (a data directory restored without them)
        raise ApiError("file_not_found", f"The content of {file_id} is missing on the server.",
                       param="file_id") from exc


def iter_content(handle: IO[bytes], chunk: int = 256 * 1024) -> Iterator[bytes]:
    """Stream an open file in pieces, then close it."""
    with handle:
        while piece := handle.read(chunk):
            yield piece


def delete_file(db: Session, settings: Settings, file_id: str) -> FileDeleted:
    """Delete one of the caller's files: the row, then its bytes."""
    row = get_file(db, file_id)
    db.execute(delete(StoredFile).where(StoredFile.id == row.id))
    db.commit()
    file_path(settings, row.id).unlink(missing_ok=True)
    return FileDeleted(id=row.id)


def sweep_expired(db: Session, settings: Settings) -> int:
    """Delete files whose expiry has passed (rows, then bytes); return how many."""
    ids = db.execute(select(StoredFile.id).where(StoredFile.expires_at <= utcnow()).limit(SWEEP_ROWS)).scalars().all()
    if not ids:
        return 0
    db.execute(delete(StoredFile).where(StoredFile.id.in_(ids)))
    db.commit()
    for file_id in ids:
        file_path(settings, file_id).unlink(missing_ok=True)
    log.info("deleted %d expired files", len(ids))
    return len(ids)
