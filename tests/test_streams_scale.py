"""What lets one web process hold many open streams (docs/streams.md; measured by bench.streams)."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest
from flask import Flask

from tests import webfixtures
from tests.webfixtures import services_of
from web.openai.sse import client_gone
from web.ws import Doorbell

db_url, app = webfixtures.db_url, webfixtures.app



@pytest.fixture
def high_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair whose server end has a descriptor above 1023, as on a busy server."""
    server, peer = socket.socketpair()
    fd = os.dup2(server.fileno(), 1500)
    server.close()
    high = socket.socket(fileno=fd)
    yield high, peer
    high.close()
    peer.close()


def test_an_sse_stream_on_a_high_descriptor_is_not_mistaken_for_a_gone_client(high_pair) -> None:
    high, peer = high_pair
    assert not client_gone(high)  # select() cannot watch fd 1500: it used to call every such client gone
    peer.close()
    assert client_gone(high)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_one_web_process_holds_more_than_a_hundred_subscriptions(app: Flask) -> None:
    bus = services_of(app).bus
    subscriptions = [bus.subscribe(f"job_{i:024x}") for i in range(105)]  # redis-py's default pool stops at 100
    try:
        assert all(s.connection is not None for s in subscriptions)
    finally:
        for subscription in subscriptions:
            subscription.close()


def test_a_websocket_doorbell_wakes_a_poll_and_is_silenced() -> None:
    bell = Doorbell()
    poller = select.poll()
    poller.register(bell, select.POLLIN)
    assert poller.poll(0) == [] and not bell.wait(0)
    bell.set()
    assert poller.poll(0) and bell.wait(0)
    bell.silence()
    bell.clear()
    assert poller.poll(0) == [] and not bell.is_set()
