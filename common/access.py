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


class UsageCounts(BaseModel):
    """What was used: accepted requests, the jobs and images they stored, and the tokens the jobs spent."""

    requests: int = 0
    jobs: int = 0
    images: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class UsageDayPublic(BaseModel):
    """One key's use on one UTC day (requests, jobs and images on the day they came; tokens on the day each
    job finished). ``key_id`` is ``-`` for the open gateway."""

    day: str = Field(description="YYYY-MM-DD (UTC)")
    key_id: str
    key_prefix: str | None = None
    key_name: str | None = None
    tenant: str
    usage: UsageCounts


class UsageReport(BaseModel):
    """``GET /api/usage``: the caller's key's days (an admin's: every key's), oldest first, and their sum."""

    since: str | None = None
    until: str | None = None
    days: list[UsageDayPublic]
    totals: UsageCounts
