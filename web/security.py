"""Hardening of every answer: CORS closed unless origins are listed, security headers, small bodies for small
routes, and no start in production with a default database password (docs/security.md)."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request
from flask_cors import CORS
from werkzeug.exceptions import RequestEntityTooLarge

from common.config import Settings
from common.deployment import check_deployment
from common.errors import ApiError

KIB = 1024
SMALL_BODY_BYTES = 64 * KIB  # a login, a ticket, a cancel: a JSON object of a few fields, or nothing
# The routes whose bodies carry images (base64 in JSON, or a streamed multipart upload with its own limit): they
# keep the app's MAX_CONTENT_LENGTH. Every other route, including any added later, gets SMALL_BODY_BYTES.
LARGE_BODY_ENDPOINTS = frozenset({"api.chat", "api.create_job", "api.seed_batch", "api.create_batch",
                                  "openai.chat_completions", "openai_batches.upload_file"})
API_PREFIXES = ("/api/", "/v1/")

# Defence in depth behind the pages' own escaping: even if model text ever reached the DOM as HTML, no inline
# script, inline handler (onerror=…) or foreign origin could run or be contacted. 'self' covers same-origin
# ws:/wss: in current browsers; data:/blob: are the image previews.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it: no clickjacking frame
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}
CORS_ALLOWED_HEADERS = ["Authorization", "X-API-Key", "Content-Type"]
CORS_EXPOSED_HEADERS = ["Retry-After", "Location"]  # a client must see when to retry and where its job is


def cors_origins(settings: Settings) -> list[str]:
    """Return the allowed origins, normalised; refuse at start-up one that no browser would ever send."""
    origins = [origin.rstrip("/") for origin in settings.cors_origins]
    if "*" in origins and len(origins) > 1:
        raise ValueError("VLGATE_CORS_ORIGINS: '*' allows every origin; list it alone or list exact origins")
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query \
                or parts.fragment or parts.username or not set("*\\]?$^[]()").isdisjoint(origin):
            raise ValueError(f"VLGATE_CORS_ORIGINS: {origin!r} is not an origin like 'https://app.example.com' "
                             "or 'http://localhost:3000' (scheme, host and optional port; no path, no pattern)")
    return origins


def _init_cors(app: Flask, origins: list[str]) -> None:
    """Answer cross-origin calls and preflights of /api and /v1 for the listed origins only."""
    if not origins:  # closed: no Access-Control-* header at all, so browsers keep other sites' pages out
        return
    # Never credentials: keys travel in headers, and the pages' cookie is SameSite=Strict and same-origin only.
    # So '*' (any origin, no cookies) is allowed and a listed origin can never read a signed-in browser's data.
    CORS(app, resources={f"{prefix}*": {} for prefix in API_PREFIXES}, origins=origins,
         send_wildcard=origins == ["*"], supports_credentials=False, always_send=False,
         allow_headers=CORS_ALLOWED_HEADERS, expose_headers=CORS_EXPOSED_HEADERS,
         methods=["GET", "POST", "DELETE"], max_age=600)


def _limit_body() -> None:
    """Give every route but the image-carrying ones a small body limit, refused with 413 before it is used."""
    if request.endpoint in LARGE_BODY_ENDPOINTS:
        return  # the app's MAX_CONTENT_LENGTH, or the upload's own streaming limit
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if not request.content_length and not chunked:
        return
    # One byte over the limit: Werkzeug cuts a chunked body at the limit silently, so reading one byte more is
    # what tells a body at the limit from a longer one. The view reads the cached copy.
    request.max_content_length = SMALL_BODY_BYTES + 1
    try:
        too_large = len(request.get_data(cache=True)) > SMALL_BODY_BYTES
    except RequestEntityTooLarge:  # its Content-Length says so: nothing was read
        too_large = True
    if too_large:
        raise ApiError("payload_too_large", f"The request body is larger than the {SMALL_BODY_BYTES // KIB} KiB "
                                            f"limit of {request.method} {request.path}.")


def _headers(response: Response) -> Response:
    """Add the security headers: all of them on pages, nosniff everywhere, no-store on API answers."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.mimetype == "text/html":
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    elif request.path.startswith(API_PREFIXES) and "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"  # tenant data: no shared or disk cache keeps a copy
    return response


def init_app(app: Flask, settings: Settings) -> None:
    """Refuse an unsafe production start, then register CORS, the body limits and the headers."""
    check_deployment(settings)
    _init_cors(app, cors_origins(settings))
    app.before_request(_limit_body)
    app.after_request(_headers)
