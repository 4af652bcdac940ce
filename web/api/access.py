"""Sign the pages in with a key (an HttpOnly same-site cookie), out again, tickets for WebSockets, who am I."""

from __future__ import annotations

from flask import Response, jsonify, request

from common.access import KeyPublic, LoginRequest, Ticket, WhoAmI
from common.errors import ApiError
from web.api import bp
from web.api.body import json_object
from web.auth import COOKIE, Principal, current, gate, presented_secret


def key_public(principal: Principal) -> KeyPublic:
    """Describe the caller's key without its secret."""
    limits = principal.limits
    return KeyPublic(id=principal.key_id, name=principal.name, tenant=principal.tenant, prefix=principal.prefix,
                     admin=principal.admin, rpm=limits.rpm, tpm=limits.tpm, max_queued=limits.max_queued)


def _whoami(principal: Principal) -> WhoAmI:
    required = gate().required()
    signed_in = principal.key_id is not None or not required
    return WhoAmI(auth="required" if required else "open", signed_in=signed_in,
                  key=key_public(principal) if signed_in else None)


@bp.get("/auth/whoami")
def whoami() -> Response:
    """Say whether this server requires keys and which key (if any) this request carries."""
    response = jsonify(_whoami(current()).model_dump())
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/auth/login")
def login() -> Response:
    """Check a key and sign this browser in with it: the key goes into no page storage, only a cookie token."""
    the_gate = gate()
    secret = LoginRequest.model_validate(json_object()).key.strip() if request.content_length else presented_secret()
    view = the_gate.by_secret(secret) if secret else None
    if view is None:
        raise ApiError("invalid_api_key", "That key is not valid: check it for a typo, or ask an administrator "
                                          "for a key.")
    principal = view.principal("cookie")  # a revoked or expired key is refused here, in plain words
    response = jsonify(_whoami(principal).model_dump())
    response.set_cookie(COOKIE, the_gate.open_session(view), max_age=the_gate.settings.auth_cookie_ttl_s,
                        httponly=True, samesite="Strict", secure=request.is_secure, path="/")
    return response


@bp.post("/auth/logout")
def logout() -> Response:
    """Forget this browser's sign-in."""
    token = request.cookies.get(COOKIE)
    if token:
        gate().close_session(token)
    response = jsonify(_whoami(current()).model_copy(update={"signed_in": False, "key": None}).model_dump())
    response.delete_cookie(COOKIE, path="/", samesite="Strict", httponly=True)
    return response


@bp.post("/auth/ticket")
def ticket() -> Response:
    """Return a one-use, short-lived ticket that opens one WebSocket as the caller (``?ticket=…``)."""
    principal = current()
    if principal.key_id is None:  # open gateway: sockets need nothing
        raise ApiError("conflict", "This server runs open: WebSockets need no ticket.")
    the_gate = gate()
    return jsonify(Ticket(ticket=the_gate.issue_ticket(principal.key_id),
                          expires_in=the_gate.settings.ws_ticket_ttl_s).model_dump())
