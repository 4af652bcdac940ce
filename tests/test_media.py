"""Tests for web/openai/media.py: image URLs fetched only from allowed hosts and public addresses.

Real sockets are opened on 127.0.0.1 only. Name lookups go through a fake resolver (anything it
does not know fails), and a guard on ``socket.create_connection`` fails the test on any attempt
to connect elsewhere, so a refused URL is proven to have caused no connection at all.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from common.config import Settings
from common.errors import ApiError
from common.images import normalize_image
from web.openai import media
from web.openai.media import address_allowed, fetch_image, host_allowed, normalize_host

KIB = 1024
LIMIT = 256 * KIB


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


@dataclass
class ServerLog:
    """What the test server saw: accepted connections, requests, and how the endless body ended."""

    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    huge_sent: int = 0
    huge_closed: threading.Event = field(default_factory=threading.Event)


class Handler(BaseHTTPRequestHandler):
    """Serve the routes the tests need; the server's ``log`` records every request."""

    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        """Answer one GET by path (the query is ignored)."""
        self.server.log.requests.append((self.path, self.headers.get("Host", "")))
        path = self.path.split("?")[0]
        port = self.server.server_address[1]
        redirects = {
            "/redirect": "/image.png",
            "/redirect-away": f"http://evil.test:{port}/image.png",
            "/redirect-internal": f"http://internal.test:{port}/image.png",
        }
        if path == "/image.png":
            self._answer(200, PNG, {"Content-Type": "image/png"})
        elif path in redirects:
            self._answer(302, b"", {"Location": redirects[path]})
        elif path.startswith("/loop/"):
            self._answer(302, b"", {"Location": f"/loop/{int(path[6:]) + 1}"})
        elif path == "/declared-huge":
            self._answer(200, b"x" * KIB, {"Content-Length": str(10**9)})
        elif path == "/huge":
            self._endless()
        elif path == "/slow":
            self.server.stop.wait(5)
            self._answer(200, PNG, {})
        elif path == "/drip":
            self._drip()
        else:
            self._answer(404, b"not here", {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _endless(self) -> None:
        """Stream 64 KiB chunks, with no Content-Length, until the client hangs up."""
        self.send_response(200)
        self.end_headers()
        try:
            while not self.server.stop.is_set():
                self.wfile.write(b"\0" * (64 * KIB))
                self.server.log.huge_sent += 64 * KIB
        except OSError:
            pass
        self.server.log.huge_closed.set()

    def _drip(self) -> None:
        """Send one byte every 50 ms: each receive is quick, the whole body never ends in time."""
        self.send_response(200)
        self.send_header("Content-Length", str(100 * KIB))
        self.end_headers()
        try:
            while not self.server.stop.wait(0.05):
                self.wfile.write(b"\0")
                self.wfile.flush()
        except OSError:
            pass


class RecordingServer(ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1 that records what reached it."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.log = ServerLog()
        self.stop = threading.Event()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count every accepted connection, whether or not a request follows."""
        self.log.connections += 1
        return True


@pytest.fixture(scope="module")
def _server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(_server: RecordingServer) -> RecordingServer:
    """The module's server, with a fresh log for this test."""
    _server.log = ServerLog()
    return _server


@pytest.fixture
def port(server: RecordingServer) -> int:
    """The test server's port."""
    return server.server_address[1]


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake resolver: names map to address lists (or a callable giving one); localhost and IPs are real."""
    names: dict[str, Any] = {}
    calls: list[str] = []
    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host in names:
            calls.append(host)
            answer = names[host]
            addresses = answer() if callable(answer) else answer
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in addresses]
        if host == "localhost":
            calls.append(host)
            return real(host, port, *args, **kwargs)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            calls.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "unknown name") from None
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    names["_calls"] = calls
    return names


@pytest.fixture(autouse=True)
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the code under test connects to; anything but 127.0.0.1 fails the test."""
    seen: list[str] = []
    real = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        seen.append(address[0])
        if address[0] != "127.0.0.1":
            raise AssertionError(f"the test tried to connect to {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return seen


def settings(domains: tuple[str, ...] = ("localhost",), networks: tuple[str, ...] = ("127.0.0.0/8",),
             **overrides: Any) -> Settings:
    """Settings allowing these hosts and networks, with a one-second fetch limit."""
    values: dict[str, Any] = {
        "allowed_media_domains": list(domains), "allowed_media_networks": list(networks),
        "media_fetch_timeout_s": 1.0, "max_image_bytes": LIMIT, "media_max_redirects": 3,
    }
    return Settings(**(values | overrides))


def refused(url: str, config: Settings, code: str = "invalid_image_url", status: int = 400) -> ApiError:
    """Fetch a URL that must fail, check the error's code and status, and return it."""
    with pytest.raises(ApiError) as caught:
        fetch_image(url, config)
    assert (caught.value.code, caught.value.status) == (code, status), caught.value.message
    return caught.value


def timed(action: Callable[[], Any]) -> float:
    """Return how long an action took."""
    start = time.monotonic()
    action()
    return time.monotonic() - start


# --- the allowlist -------------------------------------------------------------------------------


def test_empty_allowlist_refuses_every_url_and_names_the_setting(server: RecordingServer, port: int, dns: dict) -> None:
    error = refused(f"http://localhost:{port}/image.png", settings(domains=()))
    assert "VLGATE_ALLOWED_MEDIA_DOMAINS" in error.message
    assert dns["_calls"] == [] and server.log.connections == 0


def test_host_not_on_the_list_is_refused_before_any_lookup(server: RecordingServer, port: int, dns: dict) -> None:
    error = refused(f"http://localhost:{port}/image.png", settings(domains=("cdn.example.com",)))
    assert "localhost" in error.message
    assert dns["_calls"] == [] and server.log.connections == 0


def test_localhost_is_refused_because_it_resolves_to_loopback(server: RecordingServer, port: int) -> None:
    error = refused(f"http://localhost:{port}/image.png", settings(networks=()))
    assert "private or reserved" in error.message and "127.0.0.1" not in error.message
    assert server.log.connections == 0 and server.log.requests == []


def test_localhost_inside_an_allowed_network_is_fetched(server: RecordingServer, port: int) -> None:
    raw = fetch_image(f"http://LOCALHOST.:{port}/image.png", settings())
    assert raw == PNG
    assert normalize_image(raw, max_bytes=LIMIT, max_pixels=1024).width == 8  # what the caller does next
    assert server.log.requests == [("/image.png", f"localhost:{port}")]


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://localhost/image.png", "gopher://localhost:70/_", "data:image/png;base64,AAAA",
    "//localhost/image.png", "http://user:secret@localhost:{port}/image.png", "http://user@localhost:{port}/",
    "http://localhost:99999/", "http://exa mple.com/",
])
def test_other_schemes_userinfo_and_broken_urls_are_refused(url: str, port: int, server: RecordingServer,
                                                            dns: dict) -> None:
    refused(url.format(port=port), settings())
    assert dns["_calls"] == [] and server.log.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254", "0x7f000001", "2130706433", "127.1"])
def test_literal_ips_are_refused_unless_listed_as_host(host: str, port: int, server: RecordingServer,
                                                       connects: list) -> None:
    refused(f"http://{host}:{port}/image.png", settings())
    assert connects == [] and server.log.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "169.254.169.254"])
def test_literal_ips_listed_as_host_but_not_network_are_refused(host: str, port: int, connects: list) -> None:
    shown = f"[{host}]" if ":" in host else host
    refused(f"http://{shown}:{port}/image.png", settings(domains=(host,), networks=()))
    assert connects == []


def test_non_dotted_ipv4_is_refused_even_when_listed_and_allowed(port: int, connects: list) -> None:
    error = refused(f"http://0x7f000001:{port}/image.png", settings(domains=("localhost",)))
    assert "a.b.c.d" in error.message and connects == []


def test_a_literal_ip_listed_as_host_and_network_is_fetched(port: int) -> None:
    assert fetch_image(f"http://127.0.0.1:{port}/image.png", settings(domains=("127.0.0.1",))) == PNG


def test_wildcard_host_is_fetched_and_pinned_to_the_checked_address(server: RecordingServer, port: int, dns: dict,
                                                                    connects: list) -> None:
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding resolver: a second lookup would go private
    dns["img.example.test"] = lambda: next(answers)
    assert fetch_image(f"http://img.example.test:{port}/image.png", settings(domains=("*.example.test",))) == PNG
    assert dns["_calls"] == ["img.example.test"] and connects == ["127.0.0.1"]
    assert server.log.requests == [("/image.png", f"img.example.test:{port}")]


def test_every_address_must_be_allowed_not_just_the_first(port: int, dns: dict, connects: list) -> None:
    dns["mixed.test"] = ["127.0.0.1", "10.0.0.1"]
    refused(f"http://mixed.test:{port}/image.png", settings(domains=("mixed.test",)))
    assert connects == []


def test_a_mapped_ipv6_answer_is_judged_as_its_ipv4_address(port: int, dns: dict, connects: list) -> None:
    dns["mapped.test"] = ["::ffff:127.0.0.1"]
    refused(f"http://mapped.test:{port}/image.png", settings(domains=("mapped.test",), networks=()))
    assert connects == []


# --- redirects, statuses, size and time ----------------------------------------------------------


def test_a_redirect_is_followed_and_rechecked(server: RecordingServer, port: int) -> None:
    assert fetch_image(f"http://localhost:{port}/redirect", settings()) == PNG
    assert [path for path, _ in server.log.requests] == ["/redirect", "/image.png"]


def test_a_redirect_to_an_unlisted_host_is_refused_without_a_lookup(server: RecordingServer, port: int,
                                                                     dns: dict) -> None:
    error = refused(f"http://localhost:{port}/redirect-away", settings())
    assert "evil.test" in error.message and "evil.test" not in dns["_calls"]
    assert len(server.log.requests) == 1


def test_a_redirect_to_a_listed_host_with_a_private_address_is_refused(port: int, dns: dict,
                                                                       connects: list) -> None:
    dns["internal.test"] = ["10.0.0.1"]
    refused(f"http://localhost:{port}/redirect-internal", settings(domains=("localhost", "internal.test")))
    assert connects == ["127.0.0.1"]


@pytest.mark.parametrize(("path", "limit", "requests"), [("/loop/0", 2, 3), ("/redirect", 0, 1)])
def test_redirects_beyond_the_limit_are_refused(path: str, limit: int, requests: int, server: RecordingServer,
                                                port: int) -> None:
    error = refused(f"http://localhost:{port}{path}", settings(media_max_redirects=limit))
    assert f"more than {limit}" in error.message and len(server.log.requests) == requests


def test_an_error_status_is_named(port: int) -> None:
    assert "HTTP 404" in refused(f"http://localhost:{port}/missing", settings()).message


def test_a_declared_length_over_the_limit_is_refused_before_reading(port: int) -> None:
    error = refused(f"http://localhost:{port}/declared-huge", settings(), "image_too_large", 413)
    assert str(10**9) in error.message


def test_an_endless_body_is_cut_just_past_the_limit(server: RecordingServer, port: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[int] = []
    real = socket.socket.recv_into

    def counting(sock: socket.socket, *args: Any) -> int:
        count = real(sock, *args)
        try:
            if sock.getpeername()[1] == port:  # the client's side of the connection
                received.append(count)
        except OSError:
            pass
        return count

    monkeypatch.setattr(socket.socket, "recv_into", counting)
    refused(f"http://localhost:{port}/huge", settings(), "image_too_large", 413)
    assert LIMIT < sum(received) <= LIMIT + 2 * media.CHUNK_BYTES
    assert server.log.huge_closed.wait(5), "the client never hung up"


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_the_whole_fetch_ends_at_the_time_limit(path: str, port: int) -> None:
    elapsed = timed(lambda: refused(f"http://localhost:{port}{path}", settings(), "image_url_timeout"))
    assert 0.9 <= elapsed < 1.6


def test_the_query_string_never_reaches_the_logs(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="web.openai.media")
    fetch_image(f"http://localhost:{port}/redirect?token=s3cret", settings())
    error = refused(f"http://localhost:{port}/missing?token=s3cret", settings())
    refused(f"http://localhost:{port}/image.png?token=s3cret", settings(networks=()))
    assert caplog.records and "s3cret" not in caplog.text and "s3cret" not in error.message


# --- https -----------------------------------------------------------------------------------------


def test_https_to_a_plain_http_server_fails_cleanly(port: int) -> None:
    assert "TLS" in refused(f"https://localhost:{port}/image.png", settings()).message


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingServer]:
    """An HTTPS test server on 127.0.0.1 with a self-signed certificate for 'localhost', trusted via SSL_CERT_FILE."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = RecordingServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_https_verifies_the_certificate_for_the_host_while_connecting_to_the_checked_ip(
    tls_server: RecordingServer, dns: dict, connects: list
) -> None:
    tls_port = tls_server.server_address[1]
    assert fetch_image(f"https://localhost:{tls_port}/image.png", settings()) == PNG
    assert tls_server.log.requests == [("/image.png", f"localhost:{tls_port}")]
    dns["other.test"] = ["127.0.0.1"]  # same address, but the certificate does not name this host
    error = refused(f"https://other.test:{tls_port}/image.png", settings(domains=("other.test",)))
    assert "certificate" in error.message and connects == ["127.0.0.1", "127.0.0.1"]


# --- the pure checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("address", [
    "10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "169.254.169.254", "::1", "fe80::1",
    "::ffff:127.0.0.1", "224.0.0.1", "0.0.0.0", "255.255.255.255", "240.0.0.1", "fc00::1", "ff02::1", "::",
    "2002:7f00:1::1", "64:ff9b::a00:1", "::ffff:10.0.0.1", "fec0::1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "1.1.1.1", "::ffff:8.8.8.8"])
def test_public_addresses_are_accepted(address: str) -> None:
    assert address_allowed(address)


@pytest.mark.parametrize(("address", "network"), [
    ("10.1.2.3", "10.0.0.0/8"), ("::ffff:10.1.2.3", "10.0.0.0/8"), ("127.0.0.1", "127.0.0.0/8"),
])
def test_an_allowed_network_admits_private_addresses(address: str, network: str) -> None:
    assert address_allowed(address, [ipaddress.ip_network(network)])
    assert not address_allowed("192.168.0.1", [ipaddress.ip_network(network)])


@pytest.mark.parametrize(("host", "normal"), [
    ("CDN.Example.COM.", "cdn.example.com"), ("bücher.example", "xn--bcher-kva.example"),
    ("[::1]", "::1"), ("0:0::1", "::1"), ("127.0.0.1", "127.0.0.1"),
])
def test_hosts_are_normalised(host: str, normal: str) -> None:
    assert normalize_host(host) == normal


@pytest.mark.parametrize("host", ["", "a..b", "exa mple.com", "0x7f000001", "2130706433", "127.1", "-a.com"])
def test_malformed_hosts_are_rejected(host: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(host)


@pytest.mark.parametrize(("host", "allowed"), [
    ("img.example.com", True), ("a.b.example.com", True), ("example.com", False),
    ("evilexample.com", False), ("example.com.evil.net", False), ("cdn.other.org", True), ("x.cdn.other.org", False),
])
def test_host_allowlist_matching(host: str, allowed: bool) -> None:
    assert host_allowed(host, ["*.example.com", "CDN.other.org."]) is allowed


def test_wildcards_never_match_ip_literals() -> None:
    assert not host_allowed("127.0.0.1", ["*.0.0.1"])


def test_a_bad_allowlist_entry_is_a_configuration_error_not_a_user_error() -> None:
    with pytest.raises(ValueError, match="VLGATE_ALLOWED_MEDIA_DOMAINS"):
        host_allowed("img.example.com", ["bad host"])
    # A malformed network stops the process at start-up, before any request.
    with pytest.raises(ValueError, match="allowed_media_networks"):
        settings(networks=("10.0.0.0/33",))
