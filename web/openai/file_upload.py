"""``POST /v1/files``: a multipart body (``file``, ``purpose``, ``expires_after[...]``) streamed to disk.

The file's bytes go from the socket to a temporary file in 64 KiB pieces (Werkzeug's ``request.files`` would
spool the whole body first), renamed into place once complete; only then is the row committed. The text
fields may come before or after the file: they are checked once the body has been read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

from pydantic import ValidationError
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from common.config import Settings
from common.errors import ApiError
from common.ids import new_id, utcnow
from common.models import StoredFile
from common.text import check_string
from web.auth import owner
from web.errors import validation_message
from web.openai.batch_protocol import UPLOAD_PURPOSES, ExpiresAfter
from web.openai.files import atomic_file, expiry
from web.services.upload import CHUNK_BYTES, HEADER_BYTES, drain

TEXT_FIELDS = ("purpose", "expires_after[anchor]", "expires_after[seconds]")
TEXT_BYTES = 1024  # a text field is a word or a number
MIB = 1024 * 1024


def body_limit(settings: Settings) -> int:
    """Return the largest multipart body a file of the largest size may arrive in (its fields and framing too)."""
    return settings.max_file_bytes + MIB


@dataclass
class _Received:
    """What the body carried: its text fields, and the file's name and size (its bytes are on disk)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


def _text(name: str, raw: bytearray) -> str:
    """Decode a text field and check it can be stored."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_request", f"{name}: the text is not valid UTF-8.", param=name) from exc
    check_string(value, name)
    return value


def _read(stream: IO[bytes], settings: Settings) -> bytes:
    """Read the next piece of the body, turning the size limit into our error."""
    try:
        return stream.read(CHUNK_BYTES)
    except RequestEntityTooLarge as exc:
        raise _too_large(settings) from exc


def _too_large(settings: Settings) -> ApiError:
    return ApiError("payload_too_large", f"file: larger than {settings.max_file_bytes:,} bytes, the largest file "
                                         "this server accepts (VLGATE_MAX_FILE_BYTES).", param="file")


def _receive(stream: IO[bytes], boundary: bytes, sink: IO[bytes], settings: Settings) -> _Received:
    """Read the whole body: the file part's bytes into ``sink``, the text fields into memory."""
    decoder = MultipartDecoder(boundary, max_form_memory_size=HEADER_BYTES)
    got = _Received()
    name: str | None = None
    text = bytearray()
    while True:
        try:
            event = decoder.next_event()
        except ValueError as exc:
            raise ApiError("invalid_request", f"The multipart body is malformed: {exc}.") from exc
        if isinstance(event, NeedData):
            chunk = _read(stream, settings)
            try:
                decoder.receive_data(chunk or None)
            except RequestEntityTooLarge as exc:
                raise ApiError("invalid_request", "The multipart body is malformed: no boundary or end of part "
                                                  "headers within 1 MiB.") from exc
            if not chunk and name is not None:
                raise ApiError("invalid_request", "The multipart body ended in the middle of a part.")
        elif isinstance(event, Epilogue):
            return got
        elif isinstance(event, Field | File):
            name, text = event.name, bytearray()
            if name in got.fields or (name == "file" and got.filename is not None):
                raise ApiError("invalid_request", f"{name}: given more than once", param=name)
            if name == "file":
                got.filename = (event.filename if isinstance(event, File) else None) or "upload.jsonl"
            elif name not in TEXT_FIELDS:
                raise ApiError("invalid_request", f"{name}: unknown field (send file, purpose and expires_after)",
                               param=name)
        elif isinstance(event, Data) and name is not None:
            if name == "file":
                got.size += len(event.data)
                if got.size > settings.max_file_bytes:
                    raise _too_large(settings)
                sink.write(event.data)
            else:
                text += event.data
                if len(text) > TEXT_BYTES:
                    raise ApiError("invalid_request", f"{name}: longer than {TEXT_BYTES} bytes", param=name)
            if not event.more_data:
                if name != "file":
                    got.fields[name] = _text(name, text)
                name = None


def _expires_after(fields: dict[str, str]) -> int | None:
    """Read ``expires_after[anchor]`` and ``expires_after[seconds]`` (both or neither); return the seconds."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor is None or seconds is None:
        raise ApiError("invalid_request", "expires_after: give both anchor and seconds", param="expires_after")
    number = int(seconds) if seconds.isascii() and seconds.isdigit() and len(seconds) < 10 else -1
    try:
        return ExpiresAfter.model_validate({"anchor": anchor, "seconds": number}).seconds
    except ValidationError as exc:
        raise ApiError("invalid_request", validation_message(exc, prefix="expires_after"),
                       param="expires_after") from exc


def _filename(name: str) -> str:
    """Make a client's file name storable (it is only a label): no NUL, valid UTF-8, at most 255 characters."""
    return name.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")[:255]


def store_upload(db: Session, settings: Settings, stream: IO[bytes], boundary: bytes) -> StoredFile:
    """Receive an uploaded file onto disk, check its fields, and record it; a refused upload leaves nothing."""
    file_id = new_id("file")
    try:
        with atomic_file(settings, file_id) as sink:
            got = _receive(stream, boundary, sink, settings)
            if got.filename is None:
                raise ApiError("invalid_request", "file: missing (send the file as a multipart part named file)",
                               param="file")
            purpose = got.fields.get("purpose")
            if purpose not in UPLOAD_PURPOSES:
                said = "missing" if purpose is None else f"{purpose!r} is not supported"
                raise ApiError("invalid_request", f"purpose: {said}; upload batch input files with purpose 'batch'",
                               param="purpose")
            seconds = _expires_after(got.fields)
    except ApiError as exc:
        if exc.code != "payload_too_large":
            drain(stream)
        raise
    row = StoredFile(id=file_id, purpose=purpose, filename=_filename(got.filename), size_bytes=got.size,
                     created_at=utcnow(), expires_at=expiry(seconds), **owner())
    try:
        db.add(row)
        db.commit()
    except BaseException:
        db.rollback()
        (settings.files_path / file_id).unlink(missing_ok=True)
        raise
    return row
