"""What one client may hold of the running app (chat.web.connections), on real sockets: its
connections, the time it takes to send a request, its requests per second. The attacker connects
from 127.0.0.2 (loopback too, but not the address uvicorn trusts as a proxy), everyone else from
127.0.0.1, and the app must keep answering them."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from gradio_client import Client

from chat.conversation.turns import strip_note
from tests.reliability import ARGS, HEALTHY_TEXT, app_on_double, settled

ATTACKER = "127.0.0.2"
REQUEST_TIMEOUT_S = 1.0
CONNECTIONS = 8


@pytest.fixture(scope="module")
def app():
    with app_on_double(
        tokens_per_second=20,  # a reply takes 2 s: longer than the request timeout
        request_timeout_s=REQUEST_TIMEOUT_S,
        connections_per_client=CONNECTIONS,
        requests_per_second=5,
    ) as served:
        yield served


def connect(url: str, source: str = ATTACKER) -> socket.socket:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    sock.settimeout(REQUEST_TIMEOUT_S * 4)
    return sock


def closed_by_the_server(sock: socket.socket) -> bool:
    """Whether the server ended the connection (within the socket's timeout)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def healthy(url: str) -> bool:
    return httpx.get(url + "healthz", timeout=10).status_code == 200


def test_a_client_holds_a_few_connections_and_a_silent_one_is_closed_after_the_request_timeout(app):
    """Before, 5,000 slow connections from one client stayed open for as long as it liked, and at
    the file-descriptor limit nobody else was answered."""
    url, _ = app
    held = []
    try:
        for _ in range(3 * CONNECTIONS):
            sock = connect(url)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: falcon\r\n")  # headers begun, never ended
            held.append(sock)
        refused = [sock for sock in held[CONNECTIONS:] if closed_by_the_server(sock)]
        assert len(refused) == 2 * CONNECTIONS  # one over the limit: closed at once
        assert healthy(url)
        assert all(closed_by_the_server(sock) for sock in held[:CONNECTIONS])  # after the timeout
        fresh = connect(url)  # its connections are gone: it may connect again
        held.append(fresh)
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: falcon\r\nConnection: close\r\n\r\n")
        assert fresh.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_a_body_that_trickles_is_cut_off_at_the_request_timeout(app):
    url, _ = app
    sock = connect(url)
    try:
        sock.sendall(
            b"POST /gradio_api/call/chat HTTP/1.1\r\nHost: falcon\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n" + b'{"data": ["'
        )
        started = time.monotonic()
        assert closed_by_the_server(sock)
        assert time.monotonic() - started < REQUEST_TIMEOUT_S * 3
    finally:
        sock.close()
    assert healthy(url)


def test_a_reply_may_stream_for_longer_than_the_request_timeout(app):
    url, _ = app
    reply = Client(url, verbose=False).predict("Tell me a story", *ARGS, api_name="/chat")
    assert strip_note(reply) == HEALTHY_TEXT


def test_a_client_past_its_requests_per_second_is_told_to_wait_and_others_are_not(app):
    """3,000 requests at 88 a second slowed a normal chat to 10 s before."""
    url, _ = app
    transport = httpx.HTTPTransport(local_address=ATTACKER)
    with httpx.Client(base_url=url, transport=transport, timeout=10) as flood:
        statuses = [flood.get("healthz").status_code for _ in range(120)]
    assert statuses.count(200) <= 5 * 10 + 5 * 3  # the burst, and what refills meanwhile
    assert statuses.count(429) >= 40
    assert healthy(url)  # another address
    assert (
        strip_note(Client(url, verbose=False).predict("Still there?", *ARGS, api_name="/chat"))
        == HEALTHY_TEXT
    )


def test_a_request_that_queues_a_reply_counts_as_ten(app):
    """A flood of chat requests is a flood of replies: an address gets a tenth as many of those."""
    url, double = app
    sent = len(double.generate_requests())
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    body = {"data": ["Hello", *ARGS, None]}
    with httpx.Client(base_url=url, transport=transport, timeout=10) as flood:
        statuses = [flood.post("gradio_api/call/chat", json=body).status_code for _ in range(30)]
    assert 4 <= statuses.count(200) <= 7  # a burst of 50, each counting 10 (and a little refill)
    assert settled(lambda: len(double.generate_requests()) == sent + statuses.count(200))
