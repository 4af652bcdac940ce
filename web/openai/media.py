"""Fetch the image behind an ``image_url`` part: allowlisted hosts and public addresses only.

Every hop (the first URL and each redirect) is checked the same way: http or https, no userinfo,
a host on ``VLGATE_ALLOWED_MEDIA_DOMAINS``, and every address it resolves to public or inside
``VLGATE_ALLOWED_MEDIA_NETWORKS``. The connection then goes to the checked address itself, so a DNS
answer that changes between check and connect (rebinding) is never used; the Host header, SNI and
certificate check still name the host. One deadline covers DNS, connect, TLS, every redirect and
every read. Proxy environment variables are ignored on purpose: a proxy would resolve the name again.

The socket work is the standard library's (``socket``, ``ssl``, ``http.client``) rather than
urllib3's so that each receive gets only the time left before the deadline; urllib3 gives every
read the full read timeout, which lets a server that drips a byte at a time run on for ever.
The bytes are returned raw: the caller passes them to :func:`common.images.normalize_image`.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from common.config import Settings
from common.errors import ApiError
from common.images import IMAGE_TOO_LARGE
from web.openai.media_policy import (
    IPAddress,
    IPNetwork,
    address_allowed,
    host_allowed,
    normalize_host,
    parse_networks,
)

log = logging.getLogger(__name__)

INVALID_IMAGE_URL = "invalid_image_url"
IMAGE_URL_TIMEOUT = "image_url_timeout"


DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK_BYTES = 64 * 1024
DISABLED_MESSAGE = (
    "Image URLs are disabled on this server: the operator must set VLGATE_ALLOWED_MEDIA_DOMAINS to the "
    "hosts images may be fetched from. Send the image inline as a base64 data: URL instead."
)

# Characters left as they are in the request target; anything else (spaces, controls, non-ASCII)
# is percent-encoded, so the request line cannot be split or smuggled.
_TARGET_SAFE = "/%:@!$&'()*+,;=?-._~"
# A resolver that hangs keeps its worker; fetches then wait in the queue and time out, never pile up threads.
_RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="media-dns")


def _refuse(message: str) -> ApiError:
    """Build the 400 error for an image URL the gateway will not fetch."""
    return ApiError(INVALID_IMAGE_URL, message, 400)


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str  # the request target: path and query, percent-encoded ASCII

    @property
    def host_header(self) -> str:
        """Return the Host header: the host, bracketed if IPv6, with any non-default port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _parse(url: str, allowed_domains: Iterable[str]) -> _Target:
    """Check a URL's form and host against the allowlist, before any network traffic."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise _refuse(f"Only http and https image URLs are fetched, not {scheme[:16]!r}.")
        if "@" in parts.netloc:
            raise _refuse("Image URLs must not carry a user name or password.")
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
        host = normalize_host(parts.hostname or "")
    except ValueError as exc:
        raise _refuse(f"The image URL's host or port is not valid: {exc}.") from exc
    if not host_allowed(host, allowed_domains):
        raise _refuse(f"The host {host} is not on this server's list of image hosts (VLGATE_ALLOWED_MEDIA_DOMAINS).")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(scheme, host, port, quote(path, safe=_TARGET_SAFE))


class _Deadline:
    """The moment the whole fetch must be over."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Return the seconds left, or raise TimeoutError when none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the image fetch ran out of time")
        return left


def _lookup(host: str, port: int, deadline: _Deadline) -> list[Any]:
    """Resolve in a helper thread, because getaddrinfo has no timeout of its own."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return future.result(timeout=deadline.remaining())  # raises TimeoutError when time is up


def _resolve(target: _Target, networks: list[IPNetwork], deadline: _Deadline) -> list[IPAddress]:
    """Resolve the host and refuse it unless every address it has is allowed."""
    try:
        infos = _lookup(target.host, target.port, deadline)
    except socket.gaierror as exc:
        raise _refuse(f"The host {target.host} could not be resolved.") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    if not addresses:
        raise _refuse(f"The host {target.host} could not be resolved.")
    for address in addresses:
        if not address_allowed(address, networks):
            # The address goes to the log only: telling the client would map the internal network.
            log.warning("refused image host %s: it resolves to non-public address %s", target.host, address)
            raise _refuse(f"The host {target.host} resolves to a private or reserved address; "
                          "image URLs must point to public hosts.")
    return addresses


def _connect(target: _Target, addresses: list[IPAddress], deadline: _Deadline) -> socket.socket:
    """Connect to the first reachable checked address; for https, verify the certificate for the host."""
    error: OSError | None = None
    for address in addresses:
        try:
            sock = socket.create_connection((str(address), target.port), timeout=deadline.remaining())
            break
        except TimeoutError:
            raise
        except OSError as exc:
            error = exc
    else:
        raise error or OSError("no address to connect to")
    if target.scheme == "http":
        return sock
    try:
        sock.settimeout(deadline.remaining())  # the handshake as a whole gets what is left
        # A fresh default context each time: system CAs, hostname checking on, and SSL_CERT_FILE honoured.
        return ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
    except BaseException:
        sock.close()
        raise


class _DeadlineReader(io.RawIOBase):
    """A socket reader that gives each receive only the time left before the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        """Return a buffered stream over this reader (http.client reads a response through this)."""
        return io.BufferedReader(self, CHUNK_BYTES)

    def readable(self) -> bool:
        """Say that this stream can be read."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Receive into the buffer within the time left."""
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)


def _exchange(
    target: _Target, networks: list[IPNetwork], deadline: _Deadline, max_bytes: int
) -> tuple[str | None, bytes]:
    """Make one GET; return (redirect location, b"") or (None, body)."""
    addresses = _resolve(target, networks, deadline)
    with _connect(target, addresses, deadline) as sock:
        request = (f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\nUser-Agent: vlgate\r\n"
                   "Accept: image/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n")
        sock.settimeout(deadline.remaining())
        sock.sendall(request.encode("ascii"))
        response = http.client.HTTPResponse(_DeadlineReader(sock, deadline), method="GET")
        response.begin()
        if response.status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise _refuse(f"{target.host} answered HTTP {response.status} without a Location.")
            return location.strip(), b""
        if not 200 <= response.status < 300:
            raise _refuse(f"The image URL on {target.host} answered HTTP {response.status}.")
        return None, _read_body(response, target.host, max_bytes)


def _read_body(response: http.client.HTTPResponse, host: str, max_bytes: int) -> bytes:
    """Read the body, stopping at the first byte past the limit."""
    if response.length is not None and response.length > max_bytes:
        raise ApiError(IMAGE_TOO_LARGE, f"The image at {host} is {response.length} bytes; "
                       f"the limit is {max_bytes} bytes.", 413)
    chunks: list[bytes] = []
    total = 0
    while chunk := response.read(min(CHUNK_BYTES, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(IMAGE_TOO_LARGE, f"The image at {host} is larger than the {max_bytes}-byte limit.", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: Exception) -> str:
    """Describe a network failure in a few words, without internals."""
    if isinstance(exc, ssl.SSLError):
        return "the TLS handshake failed"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed before the whole image arrived"
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not valid HTTP"
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused"
    return "a network error occurred"


def fetch_image(url: str, settings: Settings) -> bytes:
    """Fetch an image URL's raw bytes from an allowed host within the settings' limits, or raise ApiError."""
    if not settings.allowed_media_domains:
        raise _refuse(DISABLED_MESSAGE)
    networks = parse_networks(settings.allowed_media_networks)
    deadline = _Deadline(settings.media_fetch_timeout_s)
    for _ in range(settings.media_max_redirects + 1):
        target = _parse(url, settings.allowed_media_domains)
        try:
            location, body = _exchange(target, networks, deadline, settings.max_image_bytes)
        except TimeoutError as exc:
            raise ApiError(IMAGE_URL_TIMEOUT, f"Fetching the image from {target.host} took longer than "
                           f"{settings.media_fetch_timeout_s:g} s.", 400) from exc
        except ssl.SSLCertVerificationError as exc:
            log.info("image host %s: certificate not verified: %s", target.host, exc.verify_message)
            raise _refuse(f"The TLS certificate of {target.host} could not be verified.") from exc
        except (OSError, http.client.HTTPException) as exc:
            # Host only: the path and query of an image URL may carry signed tokens.
            log.info("image fetch from %s failed: %r", target.host, exc)
            raise _refuse(f"The image could not be fetched from {target.host}: {_reason(exc)}.") from exc
        if location is None:
            log.debug("fetched %d image bytes from %s", len(body), target.host)
            return body
        url = urljoin(url, location)
    raise _refuse(f"The image URL redirected more than {settings.media_max_redirects} times.")
