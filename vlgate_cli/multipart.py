"""A streaming ``multipart/form-data`` body: text fields first, then files read from disk piece by piece."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

READ_BYTES = 256 * 1024
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
    ".gif": "image/gif",
}


@dataclass(frozen=True)
class FilePart:
    """One file to upload: its item name (the part's filename), where it is, and its size when listed."""

    name: str
    path: Path
    size: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.path.suffix.lower(), "application/octet-stream")


def _quote(value: str) -> str:
    """Quote a header parameter the way Werkzeug reads it back (backslash escapes; no raw line breaks)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return escaped.replace("\r", "%0D").replace("\n", "%0A")


class MultipartBody:
    """An iterable request body of known length.

    Passed as ``data=`` to requests, it is sent with a ``Content-Length`` and streamed: only one read
    buffer of one file is in memory at a time, however many files the batch has.
    """

    def __init__(self, fields: list[tuple[str, str]], files: list[FilePart], file_field: str = "files",
                 on_bytes: Callable[[int], object] | None = None) -> None:
        self.boundary = f"vlgate-{secrets.token_hex(16)}"
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self.fields = fields
        self.files = files
        self.file_field = file_field
        self.on_bytes = on_bytes
        self.length = sum(len(head) + len(value.encode()) + 2 for head, value in self._field_heads()) + sum(
            len(self._file_head(part)) + part.size + 2 for part in files
        ) + len(self._closing())

    def _field_heads(self) -> Iterator[tuple[bytes, str]]:
        for name, value in self.fields:
            head = f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            yield head.encode(), value

    def _file_head(self, part: FilePart) -> bytes:
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{_quote(self.file_field)}"; filename="{_quote(part.name)}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n"
        ).encode()

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for head, value in self._field_heads():
            yield self._count(head + value.encode() + b"\r\n")
        for part in self.files:
            yield self._count(self._file_head(part))
            left = part.size
            with part.path.open("rb") as handle:
                while left > 0:
                    block = handle.read(min(READ_BYTES, left))
                    if not block:
                        # The Content-Length is already promised: a file that shrank cannot be sent honestly.
                        raise OSError(f"{part.path} changed size while it was being uploaded")
                    left -= len(block)
                    yield self._count(block)
            yield self._count(b"\r\n")
        yield self._count(self._closing())

    def _count(self, block: bytes) -> bytes:
        if self.on_bytes is not None:
            self.on_bytes(len(block))
        return block
