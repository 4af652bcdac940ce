"""Who is calling: an API key (a header, the pages' login cookie, or a one-use WebSocket ticket), or nobody
while the gateway runs open; and the tenant scope every row lookup applies.

Modes (docs/security.md): keys are required when ``VLGATE_AUTH=required``, when the web listens on any
address that is not loopback, or as soon as one key exists; otherwise the gateway is open and every
caller acts as the local administrator of the ``default`` tenant.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from flask import Flask, current_app, g, has_request_context, request
from sqlalchemy import ColumnElement, true
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from common.config import Settings
from common.errors import ApiError
from common.ids import isoformat, utcnow
from common.keys import KeyLimits, any_key, ensure_key, find_key
from common.models import DEFAULT_TENANT, ApiKey

log = logging.getLogger(__name__)

EXTENSION_KEY = "vlgate_auth"
COOKIE = "vlgate_session"
SESSION_PREFIX = "vlgate:auth:session:"  # + sha256(cookie token) -> key id
TICKET_PREFIX = "vlgate:auth:ticket:"  # + sha256(ticket) -> key id, used once
# Reachable without a key; a key, if sent, still identifies the caller (an admin sees the detailed health).
PUBLIC_ENDPOINTS = frozenset({"static", "main.index", "batch_page.batch_page", "api.health", "api.openapi",
                              "metrics.metrics", "api.login", "api.logout", "api.whoami"})


@dataclass(frozen=True)
class Principal:
    """The caller a request acts for."""

    tenant: str
    admin: bool
    key_id: str | None = None
    name: str = "open"
    prefix: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)
    via: str = "none"  # how it was proven: none, header, cookie, ticket


OPEN = Principal(tenant=DEFAULT_TENANT, admin=True)  # everyone, while the gateway runs open
ANONYMOUS = Principal(tenant="", admin=False, name="anonymous")  # no key, on a public page; owns nothing


@dataclass(frozen=True)
class KeyView:
    """What a request needs of a key row, detached from any database session."""

    id: str
    name: str
    tenant: str
    prefix: str
    admin: bool
    limits: KeyLimits
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyView:
        """Copy a key row."""
        return cls(id=key.id, name=key.name, tenant=key.tenant, prefix=key.prefix, admin=key.admin,
                   limits=KeyLimits(rpm=key.rpm, tpm=key.tpm, max_queued=key.max_queued),
                   expires_at=key.expires_at, revoked_at=key.revoked_at)

    def principal(self, via: str) -> Principal:
        """Return the caller this key proves, or raise 401 if it is revoked or expired."""
        if self.revoked_at is not None:
            raise ApiError("key_revoked", f"The API key {self.prefix}… was revoked on {isoformat(self.revoked_at)}; "
                                          "ask an administrator for a new one.")
        if self.expires_at is not None and self.expires_at <= utcnow():
            raise ApiError("key_expired", f"The API key {self.prefix}… expired on {isoformat(self.expires_at)}; "
                                          "ask an administrator for a new one.")
        return Principal(tenant=self.tenant, admin=self.admin, key_id=self.id, name=self.name, prefix=self.prefix,
                         limits=self.limits, via=via)


def is_loopback(host: str) -> bool:
    """Tell whether a bind address only accepts connections from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    """Return the Redis name part of a cookie token or ticket (the token itself is never stored)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Gate:
    """One app's key checks, with lookups reused for at most ``key_cache_s`` (so revocation bites at once)."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], client: redis.Redis) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.redis = client
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self.always = settings.auth == "required" or not all(is_loopback(h) for h in settings.bind_hosts)

    def _cached(self, name: str, load: Any) -> Any:
        """Return a value computed at most ``key_cache_s`` ago."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and now - hit[0] < self.settings.key_cache_s:
                return hit[1]
        value = load()
        with self._lock:
            if len(self._cache) > 10_000:  # a flood of made-up keys must not grow memory
                self._cache.clear()
            self._cache[name] = (now, value)
        return value

    def required(self) -> bool:
        """Tell whether this request must carry a key."""
        if self.always:
            return True
        return bool(self._cached("any-key", self._any_key))

    def _any_key(self) -> bool:
        with self.session_factory() as db:
            return any_key(db)

    def by_secret(self, secret: str) -> KeyView | None:
        """Return the key of a secret, or None."""
        def load() -> KeyView | None:
            with self.session_factory() as db:
                key = find_key(db, secret)
                return KeyView.of(key) if key else None
        return self._cached("secret:" + token_digest(secret), load)

    def by_id(self, key_id: str) -> KeyView | None:
        """Return a key by id, or None."""
        def load() -> KeyView | None:
            with self.session_factory() as db:
                key = db.get(ApiKey, key_id)
                return KeyView.of(key) if key else None
        return self._cached("id:" + key_id, load)

    def forget(self) -> None:
        """Drop every cached lookup (a key was just made or revoked in this process)."""
        with self._lock:
            self._cache.clear()

    # -- the pages' cookie and WebSocket tickets (random tokens; only their digests are kept, in Redis) --

    def open_session(self, key: KeyView) -> str:
        """Return a new cookie token for a key."""
        token = secrets.token_urlsafe(32)
        self.redis.set(SESSION_PREFIX + token_digest(token), key.id, ex=self.settings.auth_cookie_ttl_s)
        return token

    def close_session(self, token: str) -> None:
        """Forget a cookie token."""
        self.redis.delete(SESSION_PREFIX + token_digest(token))

    def session_key(self, token: str) -> str | None:
        """Return the key id a cookie token stands for."""
        value = self.redis.get(SESSION_PREFIX + token_digest(token))
        return value.decode() if value else None

    def issue_ticket(self, key_id: str) -> str:
        """Return a one-use ticket that opens one WebSocket for a key within ``ws_ticket_ttl_s``."""
        ticket = secrets.token_urlsafe(24)
        self.redis.set(TICKET_PREFIX + token_digest(ticket), key_id, ex=self.settings.ws_ticket_ttl_s)
        return ticket

    def redeem_ticket(self, ticket: str) -> str | None:
        """Use a ticket up (it works once) and return its key id."""
        value = self.redis.getdel(TICKET_PREFIX + token_digest(ticket))
        return value.decode() if value else None


def gate() -> Gate:
    """Return the current app's gate."""
    return current_app.extensions[EXTENSION_KEY]


def presented_secret() -> str | None:
    """Return the key sent as ``Authorization: Bearer …`` or ``X-API-Key``, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def _key_principal(key_id: str | None, via: str) -> Principal:
    view = gate().by_id(key_id) if key_id else None
    if view is None:
        raise ApiError("invalid_api_key", "Your sign-in has expired or its key was deleted; enter the key again.")
    return view.principal(via)


def _check_origin() -> None:
    """Refuse a cookie-authenticated change or socket opened from another site's page."""
    origin = request.headers.get("Origin")
    if origin and origin.rstrip("/") != request.host_url.rstrip("/"):
        raise ApiError("invalid_api_key", "The sign-in cookie is only accepted from this server's own pages.")


def resolve() -> Principal:
    """Prove who is calling, or raise 401 saying what is wrong in plain words."""
    the_gate = gate()
    if not the_gate.required():
        return OPEN
    secret = presented_secret()
    if secret is not None:
        view = the_gate.by_secret(secret)
        if view is None:
            raise ApiError("invalid_api_key", "The API key is not valid: check it for a typo, or ask an "
                                              "administrator for a key.")
        return view.principal("header")
    ticket = request.args.get("ticket") if request.path.startswith("/ws/") else None
    if ticket:
        return _key_principal(the_gate.redeem_ticket(ticket), "ticket")
    token = request.cookies.get(COOKIE)
    if token:
        principal = _key_principal(the_gate.session_key(token), "cookie")
        if request.method not in ("GET", "HEAD") or request.path.startswith("/ws/"):
            _check_origin()
        return principal
    raise ApiError("missing_api_key", "This server requires an API key: send it as 'Authorization: Bearer <key>' "
                                      "or 'X-API-Key: <key>'.")


def _authenticate() -> None:
    """Attach the caller to the request; refuse a request that needs a key and has none that works."""
    if request.method == "OPTIONS":  # a CORS preflight carries no credentials
        g.principal = ANONYMOUS
        return
    try:
        g.principal = resolve()
    except (ApiError, SQLAlchemyError, redis.RedisError):
        # A public page still answers when the key or its check fails (the database may be down): as nobody.
        if request.endpoint in PUBLIC_ENDPOINTS or request.endpoint is None:  # None: a 404 of its own
            g.principal = ANONYMOUS
            return
        raise


def current() -> Principal:
    """Return the caller of this request (outside a request: the open gateway's, for tools and tests)."""
    if not has_request_context():
        return OPEN
    principal = g.get("principal")
    if principal is None:
        raise RuntimeError("no caller was attached to this request")
    return principal


def owned(model: Any) -> ColumnElement[bool]:
    """Return the WHERE clause limiting a lookup of ``model`` rows to the caller's tenant (admins: all)."""
    principal = current()
    return true() if principal.admin else model.tenant == principal.tenant


def visible(row: Any) -> bool:
    """Tell whether the caller may see a loaded row (its tenant's, or any for an admin)."""
    principal = current()
    return principal.admin or row.tenant == principal.tenant


def owner() -> dict[str, Any]:
    """Return the ownership columns of a row the caller makes."""
    principal = current()
    return {"tenant": principal.tenant, "key_id": principal.key_id}


def recheck() -> Principal:
    """Check again that the caller's key still works (a WebSocket outlives its handshake); return the caller."""
    principal = current()
    if principal.key_id is not None:
        g.principal = _key_principal(principal.key_id, principal.via)
    return g.principal if has_request_context() else principal


def require_admin() -> Principal:
    """Return the caller if it holds an admin key, else raise 403."""
    principal = current()
    if not principal.admin:
        raise ApiError("admin_required", "This needs an admin key.")
    return principal


def _bootstrap(settings: Settings, session_factory: sessionmaker[Session]) -> None:
    """Make the deployment's bootstrap admin key, if one is configured."""
    secret = settings.admin_key
    if settings.admin_key_file is not None:
        secret = settings.admin_key_file.read_text().strip()
    if secret:
        with session_factory() as db:
            ensure_key(db, secret)


def init_app(app: Flask, settings: Settings, session_factory: sessionmaker[Session], client: redis.Redis) -> None:
    """Create the app's gate, make the bootstrap key, say which mode runs, and check every request."""
    the_gate = Gate(settings, session_factory, client)
    _bootstrap(settings, session_factory)
    app.extensions[EXTENSION_KEY] = the_gate
    try:
        required = the_gate.required()
    except SQLAlchemyError as exc:  # the database is not there yet: requests will tell
        log.warning("could not tell whether API keys exist yet: %s", exc)
        required = True
    if required:
        log.info("API keys are required on every request but the pages and /api/health")
    else:
        log.warning("vlgate runs OPEN: no API key exists and the web listens only on %s, so anyone on this machine "
                    "may use it; make a key (python -m vlgate_cli keys create) to require keys",
                    ", ".join(settings.bind_hosts))
    app.before_request(_authenticate)
