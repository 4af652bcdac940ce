"""``GET /api/usage``: requests, jobs, images and tokens per key per day; a key sees its own, an admin every key."""

from __future__ import annotations

import re
from datetime import date

from flask import Response, jsonify, request

from common.access import UsageCounts, UsageDayPublic, UsageReport
from common.errors import ApiError
from common.usage import UsageQuery, usage_rows
from web.api import bp
from web.auth import current
from web.extensions import get_db

DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _day(name: str) -> date | None:
    """Read an optional ``YYYY-MM-DD`` query parameter."""
    value = request.args.get(name)
    if value is None:
        return None
    try:
        if not DAY.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise ApiError("invalid_request", f"{name}: must be a date written YYYY-MM-DD (UTC)") from None


def _query() -> UsageQuery:
    """Return the rows the caller asked for and may see: its own key's, or for an admin any key's."""
    principal = current()
    since, until = _day("since"), _day("until")
    if since and until and since > until:
        raise ApiError("invalid_request", "since: must not be after until")
    key_id, tenant = request.args.get("key_id"), request.args.get("tenant")
    if principal.admin:
        return UsageQuery(key_id=key_id, tenant=tenant, since=since, until=until)
    if principal.key_id is None:  # not reachable without a key (the gate refuses first); never "every key"
        raise ApiError("missing_api_key", "Send your API key to read its usage.")
    if (key_id is not None and key_id != principal.key_id) or (tenant is not None and tenant != principal.tenant):
        raise ApiError("admin_required", "Only an admin key may read the usage of other keys or tenants.")
    return UsageQuery(key_id=principal.key_id, since=since, until=until)


@bp.get("/usage")
def usage() -> Response:
    """Report use per key per UTC day in a range of days (both ends included)."""
    query = _query()
    days, totals = [], UsageCounts()
    for row, key in usage_rows(get_db(), query):
        counts = UsageCounts(requests=row.requests, jobs=row.jobs, images=row.images, prompt_tokens=row.prompt_tokens,
                             completion_tokens=row.completion_tokens,
                             total_tokens=row.prompt_tokens + row.completion_tokens)
        days.append(UsageDayPublic(day=row.day.isoformat(), key_id=row.key_id, tenant=row.tenant, usage=counts,
                                   key_prefix=key.prefix if key else None, key_name=key.name if key else None))
        for name in UsageCounts.model_fields:
            setattr(totals, name, getattr(totals, name) + getattr(counts, name))
    report = UsageReport(since=query.since.isoformat() if query.since else None,
                         until=query.until.isoformat() if query.until else None, days=days, totals=totals)
    response = jsonify(report.model_dump())
    response.headers["Cache-Control"] = "no-store"
    return response
