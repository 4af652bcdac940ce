"""Bulk upload: read a multipart body part by part, so thousands of images never sit in memory at once.

The text fields (``prompt`` and the generation parameters) come first, then any number of file
parts, one image each: item name = the part's filename, item order = part order. Each image is
received (at most ``MAX_IMAGE_BYTES`` of it is kept), normalised and handed to the batch writer,
which stores a few megabytes of items per transaction and forgets them. Werkzeug's
``request.files`` is not used: it would spool the whole body before the first item is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from common.config import Settings
from common.errors import ApiError
from common.images import IMAGE_TOO_LARGE, ImageError, normalize_image
from common.params import GenerationParams
from common.queue import BATCH_QUEUE
from common.schemas import BatchItemCreate
from common.text import check_string
from web.extensions import Services
from web.quotas import charge, check_room, estimate_tokens
from web.services.batches import BatchWriter, PreparedItem
from web.services.submit import validation_context
from web.services.workers import require_model

GIB = 1024**3
MIB = 1024**2
UPLOAD_MAX_BYTES = 20 * GIB  # the whole multipart body (the JSON body limit is far smaller)
CHUNK_BYTES = 64 * 1024
HEADER_BYTES = MIB  # what the decoder may buffer while looking for the end of a part's headers
DRAIN_BYTES = 64 * MIB  # read this much of a refused upload so the client can see the error
FORM_FIELDS = ("prompt", *GenerationParams.model_fields)
REPEATABLE = {"stop": 4}  # `stop` may be given up to 4 times, one string each


@dataclass(frozen=True)
class TextPart:
    name: str
    value: str


@dataclass(frozen=True)
class FilePart:
    filename: str
    data: bytes | None  # None: larger than the limit (its size is known, its bytes were dropped)
    size: int


def iter_parts(stream: IO[bytes], boundary: bytes, *, max_file_bytes: int,
               max_text_bytes: int) -> Iterator[TextPart | FilePart]:
    """Yield the body's parts in order, each complete, holding at most one part's bytes."""
    decoder = MultipartDecoder(boundary, max_form_memory_size=HEADER_BYTES)
    part: Field | File | None = None
    received = bytearray()
    size = 0
    while True:
        try:
            event = decoder.next_event()
        except ValueError as exc:
            raise ApiError("invalid_request", f"The multipart body is malformed: {exc}.") from exc
        if isinstance(event, NeedData):
            chunk = _read(stream)
            try:
                decoder.receive_data(chunk or None)
            except RequestEntityTooLarge as exc:  # no boundary, or no end of a part's headers, in 1 MiB
                raise ApiError("invalid_request", "The multipart body is malformed: no boundary or end of part "
                                                  "headers within 1 MiB.") from exc
        elif isinstance(event, Epilogue):
            return
        elif isinstance(event, Field | File):
            part, received, size = event, bytearray(), 0
        elif isinstance(event, Data) and part is not None:
            size += len(event.data)
            limit = max_file_bytes if isinstance(part, File) else max_text_bytes
            if size <= limit:
                received += event.data
            elif isinstance(part, Field):
                raise ApiError("invalid_request", f"{part.name}: the text field is larger than {limit:,} bytes.")
            else:
                received.clear()  # too large: keep reading past it, keep none of it
            if not event.more_data:
                if isinstance(part, File):
                    yield FilePart(filename=part.filename, data=bytes(received) if size <= limit else None, size=size)
                else:
                    yield TextPart(name=part.name, value=_text(part.name, received))
                part, received = None, bytearray()


def _read(stream: IO[bytes]) -> bytes:
    """Read the next chunk of the body, turning the size limit into our error."""
    try:
        return stream.read(CHUNK_BYTES)
    except RequestEntityTooLarge as exc:
        raise ApiError("payload_too_large", f"The upload is larger than {UPLOAD_MAX_BYTES // GIB} GiB.") from exc


def _text(name: str, raw: bytearray) -> str:
    """Decode a text field (browsers send UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_request", f"{name}: the text is not valid UTF-8.") from exc


def drain(stream: IO[bytes]) -> None:
    """Read what is left of a refused body (up to a limit), so the client is not cut off mid-send."""
    left = DRAIN_BYTES
    try:
        while left > 0 and (chunk := stream.read(min(CHUNK_BYTES, left))):
            left -= len(chunk)
    except (HTTPException, OSError):
        pass


def _add_field(fields: dict[str, Any], part: TextPart) -> None:
    """Collect a text field; empty optional fields (an untouched form input) count as absent."""
    check_string(part.value, part.name)
    if part.name not in FORM_FIELDS:
        raise ApiError("invalid_request", f"{part.name}: unknown field (extra inputs are not permitted)")
    if part.name != "prompt" and part.value == "":
        return
    if part.name in REPEATABLE:
        values = fields.setdefault(part.name, [])
        if len(values) == REPEATABLE[part.name]:
            raise ApiError("invalid_request", f"{part.name}: at most {REPEATABLE[part.name]} values")
        values.append(part.value)
    elif part.name in fields:
        raise ApiError("invalid_request", f"{part.name}: given more than once")
    else:
        fields[part.name] = part.value


def parse_form(fields: dict[str, Any], settings: Settings) -> BatchItemCreate:
    """Validate the shared prompt and parameters (form strings are parsed as numbers where needed)."""
    return BatchItemCreate.model_validate(fields, context=validation_context(settings))


def _storable(name: str) -> str:
    """Make a file name storable anywhere (a NUL or an undecodable byte becomes U+FFFD): it is only a label."""
    return name.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def prepare_file(part: FilePart, form: BatchItemCreate, settings: Settings) -> PreparedItem:
    """Normalise an uploaded image; a bad or oversized one fails its item alone."""
    sampling, stop = form.job_parts(settings.default_temperature, settings.default_max_tokens)
    item = PreparedItem(prompt=form.prompt, sampling=sampling, stop=stop, name=_storable(part.filename)[:255] or None)
    if part.data is None:
        item.error = ImageError(IMAGE_TOO_LARGE, f"The file is {part.size:,} bytes; the limit is "
                                                 f"{settings.max_image_bytes:,} bytes.", 413)
        return item
    try:
        item.images = [normalize_image(part.data, max_bytes=settings.max_image_bytes,
                                       max_pixels=settings.max_image_pixels)]
    except ImageError as exc:
        item.error = exc
    return item


def create_upload_batch(db: Session, services: Services, stream: IO[bytes], boundary: bytes) -> str:
    """Store a multipart upload as a batch while it streams in, then enqueue its items; return the batch id."""
    settings = services.settings
    fields: dict[str, Any] = {}
    writer: BatchWriter | None = None
    form: BatchItemCreate | None = None
    try:
        for part in iter_parts(stream, boundary, max_file_bytes=settings.max_image_bytes,
                               max_text_bytes=settings.max_prompt_chars * 4 + 1024):
            if isinstance(part, TextPart):
                if writer is not None:
                    raise ApiError("invalid_request", f"{part.name}: text fields must come before the first file; "
                                                      "send prompt and the parameters first.")
                _add_field(fields, part)
                continue
            if writer is None:  # the first file: the text fields are complete
                form = parse_form(fields, settings)
                charge(requests=1, tokens=0)  # the tokens once the items are counted, at the end
                require_model(services.bus, settings.model_wait_s)
                check_room(db, BATCH_QUEUE, 1)  # no room at all: say so before the files are read
                shown = form.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
                writer = BatchWriter(db, services.celery, source="upload", params=shown)
            if form is not None and (part.filename or part.size):  # an empty file input sends an empty part
                writer.add(prepare_file(part, form, settings))
        if writer is None:
            parse_form(fields, settings)  # a missing prompt is the first thing to say
        if writer is None or writer.total == 0:
            raise ApiError("invalid_request", "files: the upload has no image files; send them after the text fields.")
        writer.flush()
        per_item = estimate_tokens(len(form.prompt), 1, form.max_tokens or settings.default_max_tokens) if form else 0
        charge(requests=0, tokens=per_item * len(writer.queued_ids))
        writer.admit()  # the caps, now that the count is known; a refusal deletes what was written
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if not (isinstance(exc, ApiError) and exc.code == "payload_too_large"):
            drain(stream)
        raise
    writer.enqueue()
    return writer.batch_id
