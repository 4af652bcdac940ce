"""API bodies of keys and access: signing the pages in, WebSocket tickets, who am I, and usage reports."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LoginRequest(BaseModel):
    """``POST /api/auth/login``: the key to sign the pages in with (it becomes an HttpOnly cookie)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)


class KeyPublic(BaseModel):
    """A key as lists show it: its prefix and limits, never its secret."""

    id: str | None
    name: str
    tenant: str
    prefix: str | None
    admin: bool
    rpm: int | None = None
    tpm: int | None = None
    max_queued: int | None = None


class WhoAmI(BaseModel):
    """``GET /api/auth/whoami``: whether keys are required here, and the key this request carries."""

    auth: Literal["open", "required"]
    signed_in: bool
    key: KeyPublic | None = None


class Ticket(BaseModel):
    """``POST /api/auth/ticket``: a one-use ticket for ``/ws/...?ticket=…`` (browsers cannot set headers)."""

    ticket: str
    expires_in: int
