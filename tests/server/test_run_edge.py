"""rnnserve.server.run.ReadTimeoutProtocol: EdgeGuard's 429 answered from the raw request head, and
request heads past HeadTurns' bound per event-loop turn kept and answered.

A real uvicorn server on 127.0.0.1 in a thread, an ASGI app behind EdgeGuard whose requests stay in
flight until released, and raw sockets, so the bytes on the wire can be compared.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn

from rnnserve.server.edge import EdgeGuard
from rnnserve.server.run import HEADS_PER_TURN, ReadTimeoutProtocol, make_protocol

POST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
)


class HeldApp:
    """/v1/* requests answer 200 once ``release`` is set; /health answers at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        self.loop = asyncio.get_running_loop()
        if scope["path"] != "/health":
            self.seen += 1
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})


class Counting:
    """The ASGI app uvicorn serves: EdgeGuard, counting the requests uvicorn parsed and passed on."""

    def __init__(self, guard: EdgeGuard) -> None:
        self.guard = guard
        self.calls = 0

    async def __call__(self, scope: dict, receive, send) -> None:
        self.calls += scope["type"] == "http"
        await self.guard(scope, receive, send)


@dataclass
class Served:
    port: int
    app: HeldApp
    guard: EdgeGuard
    counting: Counting
    protocol: type[ReadTimeoutProtocol]

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return sock

    def wait_in_flight(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.guard.in_flight != n:
            assert time.monotonic() < deadline, f"in flight {self.guard.in_flight}, expected {n}"
            time.sleep(0.01)


@contextmanager
def serve(
    early: bool, read_timeout: float = 30.0, max_per_address: int = 1, heads_per_turn: int = HEADS_PER_TURN
) -> Iterator[Served]:
    """One address may hold ``max_per_address`` requests in flight (all addresses ten times that);
    ``early``: the protocol refuses, else EdgeGuard; ``heads_per_turn``: the protocol's HeadTurns."""
    app = HeldApp()
    guard = EdgeGuard(app, max_requests=10 * max_per_address, max_per_address=max_per_address, open_paths=("/health",))
    counting = Counting(guard)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = make_protocol(read_timeout, guard if early else None, heads_per_turn)
    config = uvicorn.Config(counting, log_level="warning", proxy_headers=False, http=protocol)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        yield Served(sock.getsockname()[1], app, guard, counting, protocol)
    finally:
        app.release.set()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset fails the test)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, leaving the connection open."""
    out = b""
    while b"\r\n\r\n" not in out:
        out += sock.recv(65536)
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(65536)
    return out


def without_date(response: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n") if not line.startswith(b"date:")], body


def refused_response(early: bool) -> tuple[bytes, int, int, int]:
    """The bytes a request past the bound gets, the app's requests seen, the guard's refusals, and
    the requests uvicorn parsed into an ASGI call."""
    with serve(early) as s:
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        with s.connect() as sock:
            sock.sendall(POST + b"{}")
            response = read_until_closed(sock)
        s.app.release.set()
        assert read_response(held).startswith(b"HTTP/1.1 200 ")
        held.close()
        s.wait_in_flight(0)
        assert s.guard.in_flight_of("127.0.0.1") == 0
        return response, s.app.seen, s.guard.refused, s.counting.calls


def test_the_protocols_429_is_byte_for_byte_edgeguards_and_the_app_never_sees_it() -> None:
    early, early_seen, early_refused, early_calls = refused_response(early=True)
    late, late_seen, late_refused, late_calls = refused_response(early=False)
    assert (early_calls, late_calls) == (1, 2)  # the protocol answered it: no request reached the ASGI app
    assert early.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert without_date(early) == without_date(late)
    head, body = without_date(early)
    assert b"retry-after: 1" in head and b"connection: close" in head and b"server: uvicorn" in head
    assert any(line.startswith(b"date:") for line in early.split(b"\r\n"))
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert (early_seen, early_refused) == (late_seen, late_refused) == (1, 1)


def test_open_paths_and_other_addresses_pass_while_an_address_is_at_its_bound() -> None:
    with serve(early=True) as s:
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        with s.connect() as sock:
            sock.sendall(b"GET /health?probe=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        other = socket.create_connection(("127.0.0.1", s.port), timeout=10, source_address=("127.0.0.2", 0))
        other.sendall(POST + b"{}")
        s.wait_in_flight(2)  # another address: EdgeGuard admitted it
        s.app.release.set()
        for sock in (held, other):
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
        s.wait_in_flight(0)
        assert s.guard.refused == 0 and s.app.seen == 2


def test_a_keep_alive_connections_next_request_is_refused_and_the_body_is_read_before_closing() -> None:
    with serve(early=True) as s:
        s.app.release.set()
        sock = s.connect()
        sock.sendall(POST + b"{}")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        s.app.release.clear()
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        # The next request on the open connection: its head now, its body in two later pieces.
        sock.sendall(POST.replace(b"Content-Length: 2", b"Content-Length: 4"))
        assert read_response(sock).startswith(b"HTTP/1.1 429 ")
        sock.sendall(b"{}")
        time.sleep(0.1)
        sock.sendall(b"  ")  # still open: the server waits for the announced body before closing
        assert read_until_closed(sock) == b""
        sock.close()
        s.app.release.set()
        read_response(held)
        held.close()
        s.wait_in_flight(0)
        assert s.guard.refused == 1 and s.app.seen == 2 and s.counting.calls == 2


def test_a_head_held_while_at_the_bound_goes_to_the_app_once_there_is_room() -> None:
    with serve(early=True) as s:
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        sock = s.connect()
        sock.sendall(POST[:20])  # the head begins while the address is at its bound
        time.sleep(0.1)
        s.app.release.set()
        assert read_response(held).startswith(b"HTTP/1.1 200 ")
        s.wait_in_flight(0)
        sock.sendall(POST[20:] + b"{}")
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        sock.close()
        held.close()
        assert s.guard.refused == 0 and s.app.seen == 2


@pytest.mark.timeout(60)
def test_a_partial_head_held_at_the_bound_still_times_out() -> None:
    with serve(early=True, read_timeout=0.3) as s:
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        with s.connect() as sock:
            sock.sendall(POST[:30])
            assert read_until_closed(sock) == b""  # closed without an answer
        s.app.release.set()
        read_response(held)
        held.close()
        s.wait_in_flight(0)
        assert s.guard.refused == 0


def test_a_refused_request_waiting_for_100_continue_is_closed_without_its_body() -> None:
    with serve(early=True) as s:
        held = s.connect()
        held.sendall(POST + b"{}")
        s.wait_in_flight(1)
        with s.connect() as sock:
            sock.sendall(POST.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
            assert read_until_closed(sock).startswith(b"HTTP/1.1 429 ")
        s.app.release.set()
        read_response(held)
        held.close()
        s.wait_in_flight(0)
        assert s.guard.refused == 1 and s.counting.calls == 1


def test_heads_ready_in_one_turn_past_its_bound_are_kept_and_all_answered() -> None:
    with serve(early=True, max_per_address=100, heads_per_turn=2) as s:
        s.app.release.set()
        socks = [s.connect() for _ in range(20)]
        with s.connect() as probe:  # accepted after the 20: once it is answered, they are all open
            probe.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            read_response(probe)
        assert s.app.loop is not None
        # Hold the server's loop while every connection sends, so all are readable in one poll.
        go = threading.Event()
        s.app.loop.call_soon_threadsafe(go.wait, 30)
        for sock in socks:
            sock.sendall(POST[:25])
        for sock in socks:
            sock.sendall(POST[25:] + b"{}")  # the rest, in the same read or a later one
        go.set()
        for sock in socks:
            assert read_response(sock).startswith(b"HTTP/1.1 200 ")
            sock.close()
        s.wait_in_flight(0)
        assert s.protocol.heads is not None and s.protocol.heads.deferred >= 18 and s.protocol.heads.waiting == 0
        assert s.app.seen == 20 and s.guard.refused == 0
