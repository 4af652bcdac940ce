"""Cursor paging of ``/v1`` lists as OpenAI does it: ``after`` (an object's id), ``limit``, ``order``; ``has_more``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import request
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from common.errors import ApiError
from web.auth import owned

MAX_AFTER_CHARS = 64


@dataclass(frozen=True)
class PageQuery:
    """Which page: the objects after ``after`` (exclusive), at most ``limit`` of them, newest first or oldest."""

    after: str | None
    limit: int
    order: str = "desc"


def page_query(default_limit: int, max_limit: int) -> PageQuery:
    """Read ``?after=&limit=&order=``; a bad value is a 400 naming it (other parameters are the caller's)."""
    raw = request.args.get("limit")
    limit = default_limit
    if raw is not None:
        limit = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 else 0
        if not 1 <= limit <= max_limit:
            raise ApiError("invalid_request", f"limit: must be a whole number from 1 to {max_limit}", param="limit")
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError("invalid_request", "order: must be 'asc' or 'desc'", param="order")
    after = request.args.get("after")
    if after is not None and not 0 < len(after) <= MAX_AFTER_CHARS:
        raise ApiError("invalid_request", f"after: must be an object id (1 to {MAX_AFTER_CHARS} characters)",
                       param="after")
    return PageQuery(after=after, limit=limit, order=order)


def page(db: Session, model: Any, query: PageQuery, missing_code: str, *where: Any) -> tuple[list[Any], bool]:
    """Return one page of the caller's ``model`` rows by (created_at, id), and whether more follow."""
    statement = select(model).where(owned(model), *where)
    if query.after is not None:
        anchor = db.execute(select(model.created_at, model.id).where(model.id == query.after, owned(model))).first()
        if anchor is None:
            raise ApiError(missing_code, f"after: no object {query.after} (was it deleted?)", param="after")
        created, ident = anchor
        if query.order == "desc":
            statement = statement.where(or_(model.created_at < created, and_(model.created_at == created,
                                                                               model.id < ident)))
        else:
            statement = statement.where(or_(model.created_at > created, and_(model.created_at == created,
                                                                               model.id > ident)))
    if query.order == "desc":
        statement = statement.order_by(model.created_at.desc(), model.id.desc())
    else:
        statement = statement.order_by(model.created_at.asc(), model.id.asc())
    rows = list(db.execute(statement.limit(query.limit + 1)).scalars())
    return rows[:query.limit], len(rows) > query.limit
